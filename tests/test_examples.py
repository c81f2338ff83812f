"""The examples in examples/ run as a user runs them, on tiny data.

    .venv/bin/pytest tests/test_examples.py -q

``examples/distill_loop.py`` distils a student from two cached teachers in a plain loop: it must
exit 0, print one loss line per epoch, and its loss must fall from the first epoch to the last.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

from pipeline.manifest import load_manifest
from pipeline.models import create_model
from tests.support.distill import cache
from tests.support.stores import synthetic_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^epoch (\d+) loss ([0-9.]+)$")


def test_distill_loop_runs_and_its_loss_falls(synthetic_teacher, tmp_path: Path) -> None:
    manifest, teacher = synthetic_teacher
    second = synthetic_checkpoint(manifest, tmp_path / "second.pt", torch_seed=1)
    stores = [cache(teacher, manifest, tmp_path / "a.zarr"), cache(second, manifest, tmp_path / "b.zarr")]
    out = tmp_path / "models" / "student.pt"
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "distill_loop.py"), "--manifest", str(manifest),
                           "--stores", *map(str, stores), "--epochs", "3", "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    found = [LINE.match(line) for line in done.stdout.splitlines()]
    losses = {int(m.group(1)): float(m.group(2)) for m in found if m}
    assert sorted(losses) == [1, 2, 3], done.stdout
    assert losses[3] < losses[1], losses
    student = create_model("mlp", num_classes=load_manifest(manifest).num_classes, input_shape=(30,))
    student.load_state_dict(torch.load(out, weights_only=True))          # --out holds the student's weights
