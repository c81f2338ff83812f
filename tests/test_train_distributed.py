"""Teacher training under torchrun (2 CPU processes, gloo) equals one process with the global batch.

    .venv/bin/pytest tests/test_train_distributed.py -m distributed -q
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import load_checkpoint
from pipeline.data import build_manifest
from pipeline.train import TeacherConfig, train_teacher


@pytest.mark.distributed
def test_ddp_two_ranks_match_one_process_with_the_global_batch(tmp_path) -> None:
    manifest = build_manifest("synthetic", tmp_path / "data", tmp_path / "syn.parquet", seed=0, num_samples=4000)
    common = ["--manifest", str(manifest.path), "--arch", "mlp", "--loss", "mse", "--epochs", "2", "--lr", "0.5",
              "--device", "cpu", "--no-progress"]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "pipeline.cli",
                          "train-teacher", *common, "--batch-size", "16", "--out", str(tmp_path / "ddp.pt")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("wrote") == 1  # only rank 0 reports
    train_teacher(TeacherConfig(manifest=str(manifest.path), arch="mlp", loss="mse", epochs=2, lr=0.5, batch_size=32,
                                device="cpu", progress=False, out=str(tmp_path / "one.pt")))
    ddp, one = load_checkpoint(tmp_path / "ddp.pt"), load_checkpoint(tmp_path / "one.pt")
    for key, value in one["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-5)
    a, b = ddp["meta"]["metrics"], one["meta"]["metrics"]
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert a["train_top1"] == pytest.approx(b["train_top1"])
