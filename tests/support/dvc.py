"""Running the venv's ``dvc`` on a test repository (the venv's bin first on PATH, so the stages'
``python`` is the one with kdcache installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def run_dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``dvc <args>`` in ``cwd``; stdout and stderr captured as text."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([str(Path(bin_dir) / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def dvc_repo(root: Path, params: dict[str, Any], *, experiment: str | None = None) -> Path:
    """A git + dvc repository at ``root`` laid out like this one (dvc.yaml, stages/, pipeline/ — the
    dependency dvc.yaml names; the code itself is the installed one) running ``params``: at the top
    level, or as ``experiments/<experiment>`` (the top-level params.yaml copied too, since dvc reads
    every dvc.yaml). The folder whose ``dvc repro`` runs ``params``."""
    root.mkdir(parents=True)
    for file in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / file, root / file)
    for folder in ("stages", "pipeline"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    folder = root
    if experiment is not None:
        shutil.copy(REPO / "params.yaml", root / "params.yaml")
        shutil.copytree(REPO / "data_manifests", root / "data_manifests", ignore=shutil.ignore_patterns("*.parquet"))
        folder = root / "experiments" / experiment
        folder.mkdir(parents=True)
        os.symlink(os.readlink(REPO / "experiments" / experiment / "dvc.yaml"), folder / "dvc.yaml")
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    init = run_dvc(root, "init", "-q")
    assert init.returncode == 0, init.stderr
    return folder
