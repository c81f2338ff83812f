"""Several teachers cached in one pass: every store is the same bytes as caching its teacher alone,
each image is decoded once per block for all its views, and a killed pass, shards and dask finish the same stores.

    .venv/bin/pytest tests/test_cache_one_pass.py -q        # -m "not distributed" skips the dask one

The synthetic val split (150 rows) in blocks of 32 rows: 5 blocks x 2 views per store.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zarr
from click.testing import CliRunner

from pipeline.cache import CacheConfig, cache_teacher, cache_teachers, one_pass_configs
from pipeline.checkpoint import save_checkpoint
from pipeline.cli import cli
from pipeline.data import build_manifest, imagefolder
from pipeline.data.views import IMAGENET_MEAN, IMAGENET_STD
from pipeline.errors import UserError
from pipeline.manifest import load_manifest
from pipeline.models import create_model
from pipeline.store.provenance import recorded_path
from pipeline.store.verify import verify_store
from tests.support.cli import one_error_line
from tests.support.data import write_imagefolder
from tests.support.stores import store_files, synthetic_checkpoint

SPLIT, VIEWS, RPB, MB = "val", 2, 32, 8
UNITS = VIEWS * 5
SETTINGS = dict(split=SPLIT, views=VIEWS, rows_per_block=RPB, micro_batch=MB, threads=1, progress=False)
ARGS = ["--split", SPLIT, "--views", str(VIEWS), "--rows-per-block", str(RPB), "--micro-batch", str(MB),
        "--threads", "1", "--no-progress"]


def all_files(store: Path) -> dict[str, bytes]:
    """Every file of a store, zarr.json included (it holds no time: equal stores are equal files), with the
    manifest and teacher paths it records (relative to the store's folder) made absolute, so that stores
    in other folders compare."""
    meta = json.loads((store / "zarr.json").read_text())
    for section in ("manifest", "teacher"):
        recorded = meta["attributes"][section]
        recorded["path"] = str(recorded_path(recorded["path"], store))
    return {**store_files(store), "zarr.json": json.dumps(meta, sort_keys=True).encode()}


@pytest.fixture(scope="module")
def teachers_pass(synthetic_teacher, tmp_path_factory):
    """(manifest, [teacher.pt, other.pt], {stem: store cached alone}) on the synthetic val split."""
    root = tmp_path_factory.mktemp("teachers_pass")
    manifest, first = synthetic_teacher
    teachers = [first, synthetic_checkpoint(manifest, root / "other.pt", torch_seed=1)]
    alone = {}
    for ckpt in teachers:
        alone[ckpt.stem] = root / "alone" / f"{ckpt.stem}.zarr"
        assert cache_teacher(CacheConfig(teacher=str(ckpt), manifest=str(manifest), out=str(alone[ckpt.stem]),
                                         **SETTINGS)).complete
    return manifest, teachers, alone


def _cmd(manifest, teachers, *extra: str) -> list[str]:
    return ["cache", "--teacher", *map(str, teachers), "--manifest", str(manifest), *ARGS, *extra]


def _same_as_alone(out_dir: Path, alone: dict[str, Path]) -> None:
    for stem, reference in alone.items():
        assert verify_store(out_dir / f"{stem}.zarr").ok
        assert all_files(out_dir / f"{stem}.zarr") == all_files(reference), stem


def test_one_pass_writes_each_store_as_caching_its_teacher_alone(teachers_pass, tmp_path):
    manifest, teachers, alone = teachers_pass
    run = CliRunner().invoke(cli, _cmd(manifest, teachers, "--out-dir", str(tmp_path)))
    assert run.exit_code == 0, run.output
    assert run.output.count(f": complete ({UNITS} blocks computed by this run)") == 2
    _same_as_alone(tmp_path, alone)
    # the same with one --out per teacher, in order, the flag repeated
    outs = [tmp_path / "x" / "b.zarr", tmp_path / "x" / "a.zarr"]
    args = ["--teacher", str(teachers[1]), "--teacher", str(teachers[0]), "--out", str(outs[0]), "--out", str(outs[1])]
    run = CliRunner().invoke(cli, ["cache", "--manifest", str(manifest), *ARGS, *args])
    assert run.exit_code == 0, run.output
    assert all_files(outs[0]) == all_files(alone["other"]) and all_files(outs[1]) == all_files(alone["teacher"])


def test_a_pass_computes_only_the_blocks_each_store_misses(teachers_pass, tmp_path):
    manifest, teachers, alone = teachers_pass
    # cached here, not copied: a store records its teacher and manifest relative to its own folder
    cache_teacher(CacheConfig(teacher=str(teachers[0]), manifest=str(manifest), out=str(tmp_path / "teacher.zarr"),
                              **SETTINGS))
    group = zarr.open_group(str(tmp_path / "teacher.zarr"), mode="r+")
    group["done"][1, 3] = False
    group.attrs["status"] = {"complete": False}
    configs = one_pass_configs([str(t) for t in teachers], out_dir=str(tmp_path), manifest=str(manifest), **SETTINGS)
    results = cache_teachers(configs)
    assert [(r.computed, r.complete) for r in results] == [(1, True), (UNITS, True)]
    _same_as_alone(tmp_path, alone)
    again = cache_teachers(configs)
    assert [(r.computed, r.complete) for r in again] == [(0, True), (0, True)]


def _subprocess(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


@pytest.mark.parametrize("fault, markers", [
    ("block:3", {"teacher": 2, "other": 1}),      # unit 0 written into both stores, unit 1 into the first
    ("marker:2", {"teacher": 1, "other": 0}),     # unit 0's data in the second store, its marker not
])
def test_a_killed_pass_reruns_to_the_same_stores(teachers_pass, tmp_path, fault, markers):
    manifest, teachers, alone = teachers_pass
    killed = _subprocess(_cmd(manifest, teachers, "--out-dir", str(tmp_path)), KDCACHE_FAULT=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    for stem, count in markers.items():
        assert int(zarr.open_group(str(tmp_path / f"{stem}.zarr"), mode="r")["done"][:].sum()) == count
    run = _subprocess(_cmd(manifest, teachers, "--out-dir", str(tmp_path)))
    assert run.returncode == 0, run.stderr[-2000:]
    for stem, count in markers.items():
        assert f"{stem}.zarr: complete ({UNITS - count} blocks computed by this run)" in run.stdout
    _same_as_alone(tmp_path, alone)


def test_shards_of_a_pass_write_the_same_stores(teachers_pass, tmp_path):
    manifest, teachers, alone = teachers_pass
    first = CliRunner().invoke(cli, _cmd(manifest, teachers, "--out-dir", str(tmp_path), "--shard", "0/2"))
    assert first.exit_code == 0 and first.output.count(f"{UNITS // 2} blocks computed by this run, "
                                                       f"{UNITS // 2} still missing") == 2, first.output
    second = CliRunner().invoke(cli, _cmd(manifest, teachers, "--out-dir", str(tmp_path), "--shard", "1/2"))
    assert second.exit_code == 0 and second.output.count(f": complete ({UNITS // 2} blocks") == 2, second.output
    _same_as_alone(tmp_path, alone)


@pytest.mark.distributed
def test_a_pass_on_a_local_dask_cluster_writes_the_same_stores(teachers_pass, tmp_path):
    manifest, teachers, alone = teachers_pass
    run = _subprocess(_cmd(manifest, teachers, "--out-dir", str(tmp_path), "--local-workers", "2"))
    assert run.returncode == 0, run.stderr[-2000:]
    _same_as_alone(tmp_path, alone)


def _cnn_checkpoint(out: Path, manifest: Path, *, input_shape: tuple[int, int, int], seed: int) -> Path:
    torch.manual_seed(seed)
    net = create_model("cnn", num_classes=3, input_shape=input_shape, width=4)
    save_checkpoint(out, model=net, meta={"arch": "cnn", "num_classes": 3, "input_shape": input_shape,
                                          "arch_options": {"width": 4}, "loss": "ce",
                                          "manifest_sha256": load_manifest(manifest).sha256})
    return out


def test_images_are_decoded_once_for_every_view_and_teacher_of_other_preprocessing(tmp_path, monkeypatch):
    root = write_imagefolder(tmp_path / "imgs", dirs={"train": 4, "val": 2})
    manifest = tmp_path / "m.parquet"
    build_manifest("imagefolder", root, manifest, image_size=32)
    small = {"kind": "rrc_flip_jitter", "seed": 0,
             "params": {"size": 24, "resize": 27, "mean": IMAGENET_MEAN[::-1], "std": IMAGENET_STD}}
    teachers = [(_cnn_checkpoint(tmp_path / "a.pt", manifest, input_shape=(3, 32, 32), seed=0), None),
                (_cnn_checkpoint(tmp_path / "b.pt", manifest, input_shape=(3, 32, 32), seed=1), None),
                (_cnn_checkpoint(tmp_path / "c.pt", manifest, input_shape=(3, 24, 24), seed=2), small)]
    settings = dict(manifest=str(manifest), split="train", views=3, rows_per_block=4, micro_batch=3, device="cpu",
                    threads=1, progress=False)
    alone = [cache_teacher(CacheConfig(teacher=str(t), view_spec=spec, out=str(tmp_path / "alone" / t.name),
                                       **settings)).store for t, spec in teachers]
    decoded = []
    real = imagefolder.LazyImages.__call__
    monkeypatch.setattr(imagefolder.LazyImages, "__call__", lambda self, i: decoded.append(i) or real(self, i))
    results = cache_teachers([CacheConfig(teacher=str(t), view_spec=spec, out=str(tmp_path / "pass" / t.name),
                                          **settings) for t, spec in teachers])
    rows = len(load_manifest(manifest).split("train").sample_id)
    assert sorted(decoded) == list(range(rows))      # each image once, for the three views of all three teachers
    for result, reference in zip(results, alone):
        assert result.complete and verify_store(result.store).ok
        assert all_files(result.store) == all_files(reference), result.store.name
    shapes = [zarr.open_group(str(r.store), mode="r").attrs["teacher"]["preprocessing"]["input_shape"] for r in results]
    assert shapes == [[3, 32, 32], [3, 32, 32], [3, 24, 24]]


@pytest.mark.parametrize("extra, needles", [
    (["--out", "x.zarr"], ["--out: expected one store per --teacher (2), found 1"]),
    ([], ["--out: expected one store per --teacher (2), found 0", "--out-dir"]),
    (["--out", "a.zarr", "--out-dir", "d"], ["--out/--out-dir: expected one of them, found both"]),
    (["--out", "a.zarr", "--out", "a.zarr"], ["--out a.zarr: expected one store per teacher"]),
    (["--out-dir", "d", "--weights", "w.pt"], ["--weights: expected none or one per teacher (2 teachers), found 1"]),
    (["--out-dir", "d", "--dtype", "float32", "--name", "n"], ["--name: expected none or one per teacher"]),
])
def test_mistakes_in_a_one_pass_command_are_one_line_and_create_nothing(teachers_pass, tmp_path, monkeypatch, extra, needles):
    manifest, teachers, _ = teachers_pass
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pt").write_bytes(b"")
    one_error_line(CliRunner().invoke(cli, _cmd(manifest, teachers, *extra)), *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]


def test_two_teachers_of_one_stem_under_out_dir_are_refused(teachers_pass, tmp_path):
    manifest, teachers, _ = teachers_pass
    (tmp_path / "copy").mkdir()
    twin = shutil.copy(teachers[0], tmp_path / "copy" / teachers[0].name)
    line = one_error_line(CliRunner().invoke(cli, _cmd(manifest, [teachers[0], twin], "--out-dir", str(tmp_path / "d"))),
                          "--out-dir", "'teacher'", "give one --out per teacher")
    assert str(twin) in line and not (tmp_path / "d").exists()


def test_settings_other_than_the_teachers_are_one_for_the_whole_pass(teachers_pass, tmp_path):
    manifest, teachers, _ = teachers_pass
    configs = [CacheConfig(teacher=str(t), manifest=str(manifest), out=str(tmp_path / f"{t.stem}.zarr"),
                           dtype=dtype, **SETTINGS) for t, dtype in zip(teachers, ("float16", "float32"))]
    with pytest.raises(UserError, match=r"^dtype: expected one setting for every teacher of a pass, found "
                                        r"'float16' \(--teacher .*teacher\.pt\) and 'float32'"):
        cache_teachers(configs)
    assert list(tmp_path.iterdir()) == []
