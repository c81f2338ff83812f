"""Dask workers that share no filesystem with the caller: the teachers' checkpoints and manifests
travel with the tasks, and the workers reach only the bucket and the data.

    .venv/bin/pytest tests/test_ship.py -q

The caller's folder (its manifest and teacher checkpoint) is moved away once the job is under
way (after the client read what it ships, before any task runs), so a worker that opened one of
its paths would fail; the store in the bucket must still be the store cached locally, object by
object.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

pytestmark = pytest.mark.distributed
distributed = pytest.importorskip("distributed")
pytest.importorskip("moto.server", reason="the S3 tests need moto's server (pip install 'kdcache[s3,dev]')")
pytest.importorskip("s3fs", reason="the S3 tests need s3fs (pip install 'kdcache[s3]')")

from pipeline.cache import CacheConfig, cache_teacher, run  # noqa: E402
from pipeline.cache.ship import ship_factory, unship  # noqa: E402
from pipeline.cache.teacher import TeacherFactory  # noqa: E402
from pipeline.cli import cli  # noqa: E402
from pipeline.data import build_manifest  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.teachers import teacher_source  # noqa: E402
from tests.support.distill import untrained_teacher  # noqa: E402
from tests.support.s3 import bucket_objects, bucket_session, local_objects  # noqa: E402

BUCKET = "kdcache-ship"


@pytest.fixture(scope="module")
def cluster():
    """Two dask worker processes that see the bucket's variables (started inside the session)."""
    with bucket_session(BUCKET), distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                                          dashboard_address=None) as cluster:
        yield cluster


@pytest.fixture
def caller(cifar10_root, tmp_path, monkeypatch):
    """``tmp_path`` as the caller's working folder: ``data/`` (CIFAR-10), ``caller/`` (a manifest whose
    root is relative to it, and a CNN teacher checkpoint)."""
    monkeypatch.chdir(tmp_path)
    data = shutil.copytree(cifar10_root, tmp_path / "data")
    manifest = build_manifest("cifar10", data, tmp_path / "caller" / "c10.parquet", seed=0)
    teacher = untrained_teacher(manifest.path, tmp_path / "caller" / "cnn.pt", arch="cnn", scale=8.0)
    return tmp_path, Path(manifest.path), teacher


def _config(manifest: Path, teacher: Path, out: str, **kw) -> CacheConfig:
    return CacheConfig(teacher=str(teacher), manifest=str(manifest), out=out, views=2, rows_per_block=8,
                       micro_batch=4, threads=1, device="cpu", progress=False, **kw)


def _move_away_once_under_way(monkeypatch, *folders: Path) -> None:
    """Rename ``folders`` the first time the job groups its blocks into tasks (in ``run_dask``: after
    the client has read and scattered what it ships, before the first task is submitted)."""
    by_block = run.by_block

    def moving(*args, **kwargs):
        for folder in folders:
            if folder.exists():
                folder.rename(folder.with_name(folder.name + ".away"))
        return by_block(*args, **kwargs)

    monkeypatch.setattr(run, "by_block", moving)


def _back(*folders: Path) -> None:
    for folder in folders:
        folder.with_name(folder.name + ".away").rename(folder)


@pytest.mark.parametrize("worker_root", [False, True], ids=["callers-data-root", "worker-data-root"])
def test_workers_without_the_callers_files_cache_the_local_store(cluster, caller, monkeypatch, worker_root):
    root, manifest, teacher = caller
    gone = [root / "caller"]
    extra = {}
    if worker_root:   # the workers' copy of the data is elsewhere, the caller's is gone too
        extra["worker_data_root"] = str(shutil.copytree(root / "data", root / "worker_data"))
        gone.append(root / "data")
    name = "w" if worker_root else "c"
    out = f"s3://{BUCKET}/caches/{name}.zarr"
    _move_away_once_under_way(monkeypatch, *gone)
    result = cache_teacher(_config(manifest, teacher, out, scheduler=cluster.scheduler_address, **extra))
    assert result.complete and result.computed == 2 * 4 and not (root / "caller").exists()
    monkeypatch.undo()
    _back(*gone)
    monkeypatch.chdir(root)
    local = cache_teacher(_config(manifest, teacher, f"caches/{name}.zarr"))
    assert local.complete and local.computed == 2 * 4
    objects = bucket_objects(out)
    assert objects == local_objects(local.store)


def test_without_shipping_the_workers_need_the_callers_paths(cluster, caller, monkeypatch):
    root, manifest, teacher = caller
    _move_away_once_under_way(monkeypatch, root / "caller")
    with pytest.raises(UserError, match="c10.parquet"):
        cache_teacher(_config(manifest, teacher, f"s3://{BUCKET}/caches/unshipped.zarr",
                              scheduler=cluster.scheduler_address, ship_inputs=False))


def test_a_worker_data_root_the_workers_lack_is_one_error_naming_it(cluster, caller):
    root, manifest, teacher = caller
    missing = root / "not_mounted"
    with pytest.raises(UserError, match=str(missing)) as err:
        cache_teacher(_config(manifest, teacher, f"s3://{BUCKET}/caches/unmounted.zarr",
                              scheduler=cluster.scheduler_address, worker_data_root=str(missing)))
    assert "\n" not in str(err.value)


def test_shipped_paths_name_contents_and_a_worker_keeps_one_checked_copy(caller, tmp_path):
    root, manifest, teacher = caller
    factory = TeacherFactory(teacher=teacher_source(teacher), manifest=str(manifest), split="train", views="{}")
    shipped, files = ship_factory(run.OneStore(factory))
    inner = shipped.factory
    assert inner.manifest.startswith("shipped:") and inner.manifest.endswith("/c10.parquet")
    assert inner.teacher.spec.startswith("shipped:") and inner.teacher.spec.endswith("/cnn.pt")
    assert inner.data_root == str(root / "data") and sorted(files.values()) == sorted([str(manifest), str(teacher)])
    payloads = {sha: Path(path).read_bytes() for sha, path in files.items()}
    local = unship(shipped, payloads, folder=tmp_path / "worker").factory
    assert Path(local.manifest).read_bytes() == manifest.read_bytes()
    assert Path(local.teacher.spec).read_bytes() == teacher.read_bytes()
    assert Path(local.manifest).parent.name == inner.manifest.split("/")[0].removeprefix("shipped:")
    tampered = {sha: data + b"x" for sha, data in payloads.items()}
    with pytest.raises(UserError, match="expected the shipped bytes"):
        unship(shipped, tampered, folder=tmp_path / "other")


@pytest.mark.parametrize("args, expected", [
    (["--ship-inputs"], "--ship-inputs: expected --scheduler or --local-workers"),
    (["--worker-data-root", "/data"], "--worker-data-root: expected inputs shipped"),
    (["--local-workers", "1", "--worker-data-root", "/data"], "--worker-data-root: expected inputs shipped"),
])
def test_shipping_options_without_workers_to_ship_to_are_one_line(caller, args, expected):
    root, manifest, teacher = caller
    result = CliRunner().invoke(cli, ["cache", "--teacher", str(teacher), "--manifest", str(manifest), "--out",
                                      "caches/t.zarr", "--device", "cpu", "--no-progress", *args])
    assert result.exit_code == 2 and expected in result.output, result.output
    assert not (root / "caches" / "t.zarr").exists()
