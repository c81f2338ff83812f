"""Mistakes users make and accidents that happen: each ends in one clear line and leaves nothing half-done.

A truncated chunk file, a missing image before caching, a typo in --val-split, stores of two
splits given to inspect, and Ctrl-C in the middle of a run.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pipeline.checkpoint import load_checkpoint
from pipeline.cli import cli
from pipeline.data import build_manifest
from pipeline.errors import UserError
from pipeline.store.reader import StoreGroup
from pipeline.store.verify import verify_store
from pipeline.train import TeacherConfig, train_teacher
from tests.support.cli import one_error_line
from tests.support.data import write_imagefolder
from tests.support.distill import cache, untrained_teacher
from tests.support.stores import make_fake_store


def test_a_truncated_chunk_is_reported_by_verify_and_refused_by_readers(tmp_path):
    store = tmp_path / "s.zarr"
    make_fake_store(store, num_samples=600, num_classes=5, views=2, rows_per_block=128)
    assert verify_store(store).ok
    chunk = store / "logits" / "c.1.2.0"
    chunk.write_bytes(chunk.read_bytes()[:1000])
    report = verify_store(store)
    assert not report.ok and any("logits" in p and "view 1 block 2" in p for p in report.problems)
    with pytest.raises(UserError, match="logits"):
        StoreGroup([store])
    one_error_line(CliRunner().invoke(cli, ["inspect", str(store)]), "s.zarr", "logits")


def test_cache_checks_image_files_before_creating_the_store(tmp_path):
    root = write_imagefolder(tmp_path / "imgs", dirs={"train": 3, "val": 2}, classes=("cat", "dog"))
    manifest = tmp_path / "m.parquet"
    build_manifest("imagefolder", root, manifest)
    teacher = untrained_teacher(manifest, tmp_path / "t.pt", arch="cnn")
    (root / "train" / "dog" / "img_2.png").unlink()
    out = tmp_path / "c.zarr"
    result = CliRunner().invoke(cli, ["cache", "--teacher", str(teacher), "--manifest", str(manifest),
                                      "--split", "train", "--out", str(out)])
    one_error_line(result, "img_2.png")
    assert not out.exists()


def test_a_val_split_typo_is_an_error_not_a_silent_skip(synthetic, tmp_path):
    result = CliRunner().invoke(cli, ["train-teacher", "--manifest", str(synthetic), "--arch", "mlp", "--epochs", "1",
                                      "--val-split", "vall", "--out", str(tmp_path / "t.pt")])
    one_error_line(result, "'vall'")


def test_inspect_names_the_split_when_stores_disagree(synthetic, tmp_path):
    teacher = untrained_teacher(synthetic, tmp_path / "t.pt")
    stores = []
    for split in ("train", "val"):
        out = tmp_path / f"{split}.zarr"
        result = CliRunner().invoke(cli, ["cache", "--teacher", str(teacher), "--manifest", str(synthetic),
                                          "--split", split, "--out", str(out), "--threads", "1"])
        assert result.exit_code == 0, result.output
        stores.append(str(out))
    one_error_line(CliRunner().invoke(cli, ["inspect", *stores]), "manifest.split", "val")


def test_ctrl_c_keeps_finished_epochs_and_says_how_to_resume(synthetic, tmp_path):
    out = tmp_path / "t.pt"
    args = ["train-teacher", "--manifest", str(synthetic), "--arch", "mlp", "--epochs", "4", "--threads", "1",
            "--no-progress", "--out", str(out)]
    # Ctrl-C right after epoch 2's checkpoint, wherever the machine's load puts that moment.
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "KDCACHE_FAULT": "epoch:2:interrupt"})
    assert run.returncode == 130, run.stderr
    assert "interrupted" in run.stderr and "--resume" in run.stderr and "Traceback" not in run.stderr
    blob = load_checkpoint(out)
    assert blob["meta"]["epoch"] == 2 and blob["train_state"]["epoch"] == 2   # the last finished epoch, resumable
    assert [row["epoch"] for row in blob["train_state"]["history"]] == [1, 2]
    assert list(tmp_path.glob(".t.pt.tmp-*")) == []
    resumed = CliRunner().invoke(cli, [*args, "--resume", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert load_checkpoint(out)["meta"]["epoch"] == 4


def test_resuming_distill_from_a_teacher_checkpoint_names_the_mistake(synthetic, tmp_path):
    teacher = untrained_teacher(synthetic, tmp_path / "t.pt")
    store = cache(teacher, synthetic, tmp_path / "t.zarr", views=1)
    trained = tmp_path / "trained.pt"
    train_teacher(TeacherConfig(manifest=str(synthetic), arch="mlp", out=str(trained), epochs=1, progress=False))
    result = CliRunner().invoke(cli, ["distill", "--method", "kd", "--mentors", str(store), "--manifest", str(synthetic),
                                      "--student", "mlp", "--epochs", "1", "--out", str(tmp_path / "s.pt"),
                                      "--resume", str(trained)])
    one_error_line(result, "trained.pt", "'method'", "teacher checkpoint")
