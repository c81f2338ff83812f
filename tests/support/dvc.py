"""Running the venv's ``dvc`` on a test repository (the venv's bin first on PATH, so the stages'
``python`` is the one with kdcache installed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``dvc <args>`` in ``cwd``; stdout and stderr captured as text."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([str(Path(bin_dir) / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)
