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
import time

import numpy as np
import pytest
import torch
import zarr
from _store_fixtures import make_synthetic_teacher, store_files

from pipeline.errors import UserError
from pipeline.store import schema
from pipeline.store.reader import StoreGroup
from pipeline.store.verify import verify_store
from pipeline.cache import CacheConfig, cache_teacher

SPLIT, VIEWS, RPB, MB = "test", 2, 128, 16           # 2700 rows: 22 blocks x 2 views
ARGS = ["--split", SPLIT, "--views", str(VIEWS), "--rows-per-block", str(RPB), "--micro-batch", str(MB),
        "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    manifest, ckpt = make_synthetic_teacher(root)
    _, other = make_synthetic_teacher(root, torch_seed=1, name="other.pt")
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
    from pipeline.models import load_model
    from pipeline.data import open_split
    from pipeline.manifest import load_manifest

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
    from pipeline.data import build_manifest

    other_manifest = tmp_path / "other.parquet"
    build_manifest("synthetic", tmp_path / "syn", other_manifest, num_samples=3000, seed=1)
    with pytest.raises(UserError, match=r"manifest\.sha256"):
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


@pytest.mark.distributed
def test_sigkill_part_way_then_rerun_gives_the_same_bytes(teacher, reference, tmp_path):
    manifest, ckpt, _, _ = teacher
    out = tmp_path / "d.zarr"
    proc = subprocess.Popen(_cli(manifest, ckpt, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    markers = out / "done"
    deadline = time.time() + 120
    while not (markers.exists() and any(p.name.startswith("c.") and "partial" not in p.name for p in markers.iterdir())):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first block"
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = zarr.open_group(str(out), mode="r")["done"][:]
    assert 0 < done.sum() < done.size, "killed too late to test a resume"
    assert not zarr.open_group(str(out), mode="r").attrs["status"]["complete"]
    assert not verify_store(out).ok
    with pytest.raises(UserError, match="status.complete"):
        StoreGroup([out])
    run = subprocess.run(_cli(manifest, ckpt, out), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"{2 * 22 - int(done.sum())} blocks computed" in run.stdout
    assert verify_store(out).ok
    assert store_files(out) == store_files(reference)


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
