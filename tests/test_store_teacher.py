"""A real synthetic cache: the same store from one process, 3 concurrent shards, a dask
LocalCluster, and a run killed with SIGKILL then rerun.

    .venv/bin/pytest tests/test_store_teacher.py -q            # -m "not distributed" skips the multi-process ones

Every run uses --threads 1 and the same rows-per-block / micro-batch, so the stores must be
byte-identical (the batches of a block are fixed by the layout, not by who computes it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from pipeline.cache import CacheConfig, cache_teacher
from pipeline.checkpoint import load_checkpoint
from pipeline.data import build_manifest
from pipeline.errors import UserError
from pipeline.store import schema
from pipeline.store.reader import StoreGroup
from pipeline.store.verify import verify_store
from tests.support.stores import store_files, synthetic_checkpoint

SPLIT, VIEWS, RPB, MB = "test", 2, 128, 16           # 2700 rows: 22 blocks x 2 views
ARGS = ["--split", SPLIT, "--views", str(VIEWS), "--rows-per-block", str(RPB), "--micro-batch", str(MB),
        "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def teacher(synthetic_teacher, tmp_path_factory):
    """(manifest, teacher, another teacher of the same manifest, this module's folder for outputs)."""
    root = tmp_path_factory.mktemp("teacher")
    manifest, ckpt = synthetic_teacher
    other = synthetic_checkpoint(manifest, root / "other.pt", torch_seed=1)
    return manifest, ckpt, other, root


@pytest.fixture(scope="module")
def reference(teacher):
    """(a) one process, in this interpreter."""
    manifest, ckpt, _, root = teacher
    threads = torch.get_num_threads()
    result = cache_teacher(CacheConfig(teacher=ckpt, manifest=manifest, split=SPLIT, views=VIEWS, out=root / "a.zarr",
                                       rows_per_block=RPB, micro_batch=MB, threads=1, progress=False))
    assert torch.get_num_threads() == threads          # the thread count is the job's, not the process's
    assert result.complete and result.computed == 2 * 22
    return root / "a.zarr"


def _cli(manifest, ckpt, out, *extra) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "cache", "--teacher", str(ckpt), "--manifest", str(manifest),
            "--out", str(out), *ARGS, *extra]


def test_cache_verifies_and_targets_match_the_teacher(teacher, reference):
    manifest, ckpt, _, _ = teacher
    report = verify_store(reference)
    assert report.ok, str(report)
    assert report.rows_recomputed >= 2700
    from pipeline.data import open_split
    from pipeline.manifest import load_manifest
    from pipeline.models import load_model

    model, _ = load_model(ckpt)
    ds = open_split(load_manifest(manifest), SPLIT, view=1)
    x, y = ds.get_batch(np.arange(len(ds)))
    with torch.no_grad():
        z = model(x).numpy()
    group = zarr.open_group(str(reference), mode="r")
    want = schema.target_stats(z, y.numpy())
    np.testing.assert_allclose(group["logits"][1].astype(np.float32), z, rtol=2e-3, atol=1e-3)
    np.testing.assert_allclose(group["entropy"][1], want["entropy"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(group["p_gt"][1], want["p_gt"], rtol=1e-5, atol=1e-7)
    assert (group["pred"][1] == want["pred"]).mean() > 0.999
    assert (group["label"][:] == y.numpy()).all()
    assert group.attrs["status"]["stats"]["accuracy"] == pytest.approx((want["pred"] == y.numpy()).mean(), abs=1e-3)


def test_reopening_with_another_checkpoint_or_manifest_is_refused(teacher, reference, tmp_path):
    manifest, ckpt, other, root = teacher
    with pytest.raises(UserError, match=r"teacher\.checkpoint_sha256"):
        cache_teacher(CacheConfig(teacher=other, manifest=manifest, split=SPLIT, views=VIEWS, out=reference,
                                  rows_per_block=RPB, micro_batch=MB, progress=False))
    other_manifest = tmp_path / "other.parquet"
    build_manifest("synthetic", tmp_path / "syn", other_manifest, num_samples=3000, seed=1)
    # the teacher was trained on the first manifest: a warning, then the store's own manifest refuses
    with pytest.raises(UserError, match=r"manifest\.sha256"), pytest.warns(UserWarning, match="manifest_sha256"):
        cache_teacher(CacheConfig(teacher=ckpt, manifest=other_manifest, split=SPLIT, views=VIEWS, out=reference,
                                  rows_per_block=RPB, micro_batch=MB, progress=False))
    cmd = _cli(manifest, other, reference)
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "teacher.checkpoint_sha256" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.distributed
def test_three_concurrent_shards_write_the_same_store(teacher, reference, tmp_path):
    manifest, ckpt, _, _ = teacher
    out = tmp_path / "b.zarr"
    procs = [subprocess.Popen(_cli(manifest, ckpt, out, "--shard", f"{i}/3"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert sum(": complete (" in o for o, _ in outputs) >= 1   # whoever sees every marker finalizes
    assert verify_store(out).ok
    assert store_files(out) == store_files(reference)


@pytest.mark.distributed
def test_local_dask_cluster_writes_the_same_store(teacher, reference, tmp_path):
    manifest, ckpt, _, _ = teacher
    out = tmp_path / "c.zarr"
    run = subprocess.run(_cli(manifest, ckpt, out, "--local-workers", "2"), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert verify_store(out).ok
    assert store_files(out) == store_files(reference)


def _run_with_fault(cmd: list[str], fault: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` with ``KDCACHE_FAULT=fault``; it must die there by SIGKILL."""
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "KDCACHE_FAULT": fault})
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    return run


@pytest.mark.distributed
@pytest.mark.parametrize("fault, markers, recomputed", [
    ("block:1", 1, 2 * 22 - 1),        # right after the first block's data and marker
    ("marker:1", 0, 2 * 22),           # the first block's data written, its marker not: it is computed again
    ("finalize:1", 2 * 22, 0),         # every block written and checked, status.complete not yet set
])
def test_sigkill_part_way_then_rerun_gives_the_same_bytes(teacher, reference, tmp_path, fault, markers, recomputed):
    manifest, ckpt, _, _ = teacher
    out = tmp_path / "d.zarr"
    _run_with_fault(_cli(manifest, ckpt, out), fault)
    group = zarr.open_group(str(out), mode="r")
    done = group["done"][:]
    assert int(done.sum()) == markers and bool(done[0, 0]) == (markers > 0)
    assert (out / schema.chunk_key("logits", 3, 0, 0)).is_file()     # the first block's data is there in every case
    assert not group.attrs["status"]["complete"]
    assert not verify_store(out).ok
    with pytest.raises(UserError, match="status.complete"):
        StoreGroup([out])
    run = subprocess.run(_cli(manifest, ckpt, out), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f": complete ({recomputed} blocks computed by this run)" in run.stdout
    assert verify_store(out).ok
    assert store_files(out) == store_files(reference)


def _train_teacher_cmd(manifest, out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "train-teacher", "--manifest", str(manifest), "--arch", "mlp",
            "--epochs", "3", "--threads", "1", "--no-progress", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def trained(teacher):
    """An uninterrupted 3-epoch train-teacher run on the same manifest."""
    manifest, _, _, root = teacher
    out = root / "trained.pt"
    run = subprocess.run(_train_teacher_cmd(manifest, out), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return load_checkpoint(out)


@pytest.mark.parametrize("nth", [1, 2])
def test_sigkill_while_a_checkpoint_is_written_keeps_the_previous_one(teacher, trained, tmp_path, nth):
    manifest = teacher[0]
    out = tmp_path / "t.pt"
    _run_with_fault(_train_teacher_cmd(manifest, out), f"checkpoint:{nth}")
    assert len(list(tmp_path.glob(".t.pt.tmp-*"))) == 1      # killed with the new file whole but not yet renamed
    if nth == 1:
        assert not out.exists()                              # no checkpoint yet, never half of one
        resume: list[str] = []
    else:
        blob = load_checkpoint(out)                          # the previous epoch's file, intact
        assert blob["meta"]["epoch"] == 1 and blob["train_state"]["epoch"] == 1
        resume = ["--resume", str(out)]
    run = subprocess.run(_train_teacher_cmd(manifest, out, *resume), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    final = load_checkpoint(out)
    assert final["meta"]["epoch"] == 3
    for key, value in trained["model"].items():
        assert torch.equal(final["model"][key], value), key


def test_topk_store_of_the_teacher_reproduces_exact_targets(teacher, reference, tmp_path):
    manifest, ckpt, _, _ = teacher
    cache_teacher(CacheConfig(teacher=ckpt, manifest=manifest, split=SPLIT, views=VIEWS, out=tmp_path / "top.zarr",
                              storage="topk", k=2, rows_per_block=RPB, micro_batch=MB, threads=1, progress=False))
    assert verify_store(tmp_path / "top.zarr").ok
    dense, top = (zarr.open_group(str(p), mode="r") for p in (reference, tmp_path / "top.zarr"))
    for name in ("entropy", "p_gt", "pred"):
        np.testing.assert_array_equal(top[name][:], dense[name][:])
    z = dense["logits"][:].astype(np.float32)          # fp16 from the same float32 logits
    order = np.take_along_axis(z, top["topk_index"][:].astype(np.int64), axis=2)
    np.testing.assert_array_equal(top["topk_values"][:], order.astype(np.float16))
