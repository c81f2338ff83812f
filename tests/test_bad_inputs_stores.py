"""The bad-input catalogue, part 2: mistakes and accidents around stores and the disk, each run through
the real command line (the machinery and the checks: tests/support/bad_inputs.py; part 1:
tests/test_bad_inputs.py).

    .venv/bin/pytest -q tests/test_bad_inputs_stores.py

The disk is spoiled without a real full disk or a read-only mount (tests may run as root, for whom
nothing is read-only): a path below a regular file gives ENOTDIR/EEXIST for real, and ENOSPC/EACCES
come from monkeypatched writes (zarr's file writes, the temporary file of an output check).
The tests after the catalogue check the store state around a full disk, NaN targets, NaN weights
and a teacher checkpoint that changed after caching in more detail.
"""

from __future__ import annotations

import errno
import gc
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import zarr
import zarr.storage._local as zarr_local
from click.testing import CliRunner

import pipeline.checkpoint
import pipeline.files
from pipeline.cli import cli
from pipeline.data import build_manifest
from pipeline.manifest import load_manifest
from pipeline.store.provenance import changed_teachers
from pipeline.store.schema import read_attrs
from tests.support.bad_inputs import (
    Base,
    Case,
    Catalogue,
    World,
    cache_args,
    check_case,
    distill_args,
    make_base,
    nan_store,
    store_complete,
    train_args,
)
from tests.support.distill import cache, untrained_teacher
from tests.support.stores import duplicate_block, move_chunk, store_files, swap_blocks

CASES = Catalogue()
case = CASES.case

@pytest.fixture(scope="module")
def base(synthetic: str, tmp_path_factory: pytest.TempPathFactory) -> Base:
    return make_base(synthetic, tmp_path_factory.mktemp("bad_inputs"))


# --- stores ------------------------------------------------------------------------------------------------

@case("store: --mentors not there")
def _(w):
    return Case(distill_args(w, mentors=(str(w.tmp / "gone.zarr"),)), ("gone.zarr",), checkpoint=w.tmp / "s_out.pt")


@case("store: --mentors is not a store")
def _(w):
    (w.tmp / "folder.zarr").mkdir()
    return Case(distill_args(w, mentors=(str(w.tmp / "folder.zarr"),)), ("folder.zarr",), checkpoint=w.tmp / "s_out.pt")


@case("store: incomplete (another shard still missing)")
def _(w):
    out = w.tmp / "half.zarr"
    cache(w.base.teacher, w.base.manifest, out, views=1, shard="0/2")
    return Case(distill_args(w, mentors=(str(out),)), ("half.zarr", "status.complete"), store=out,
                checkpoint=w.tmp / "s_out.pt")


@case("store: of another manifest")
def _(w):
    other = w.tmp / "other.parquet"
    build_manifest("synthetic", w.tmp / "syn2", other, seed=1, num_samples=4000)
    return Case(["distill", "--method", "kd", "--mentors", str(w.base.store), "--manifest", str(other),
                 "--student", "mlp", "--epochs", "1", "--out", str(w.tmp / "s_out.pt")],
                ("t.zarr", "manifest.sha256"), checkpoint=w.tmp / "s_out.pt")


@case("store: --views other than the store's")
def _(w):
    return Case(distill_args(w, "--views", "3"), ("t.zarr", "views.count"), checkpoint=w.tmp / "s_out.pt")


@case("store: --train-split other than the store's")
def _(w):
    return Case(distill_args(w, "--train-split", "val"), ("t.zarr", "manifest.split"), checkpoint=w.tmp / "s_out.pt")


@case("store: a truncated chunk")
def _(w):
    store = w.copy_store()
    chunk = store / "logits" / "c.0.1.0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    return Case(["inspect", str(store)], ("copy.zarr", "logits"))


@case("store: a deleted done marker")
def _(w):
    store = w.copy_store()
    group = zarr.open_group(str(store), mode="r+")
    group["done"][0, 1] = False
    return Case(distill_args(w, mentors=(str(store),)), ("copy.zarr", "done"), checkpoint=w.tmp / "s_out.pt")


def _edit_array_meta(w: World, name: str, **changes: Any) -> Path:
    """A copy of the base store with keys of ``name``'s zarr.json changed (as by hand)."""
    store = w.copy_store()
    meta = store / name / "zarr.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), **changes}))
    return store


@case("store: logits dtype edited in its zarr.json")
def _(w):
    store = _edit_array_meta(w, "logits", data_type="float32")
    return Case(distill_args(w, mentors=(str(store),)), ("copy.zarr", "field logits", "dtype", "float32"),
                checkpoint=w.tmp / "s_out.pt")


@case("store: logits dtype edited to one of the same size")
def _(w):  # the chunk files keep their sizes and checksums: only the metadata check sees it
    store = _edit_array_meta(w, "logits", data_type="int16", fill_value=0)
    return Case(distill_args(w, mentors=(str(store),)), ("copy.zarr", "field logits", "dtype", "int16"),
                checkpoint=w.tmp / "s_out.pt")


@case("store: NaN logits written by a teacher")
def _(w):
    out = nan_store(w, rows=(5, 77))
    return Case(distill_args(w, mentors=(str(out),)),
                ("nan.zarr", "field logits", "expected finite values, found NaN in rows [5, 77] of view 0"),
                checkpoint=w.tmp / "s_out.pt")


@case("store: reopened with other --views")
def _(w):
    out = w.tmp / "c.zarr"
    cache(w.base.teacher, w.base.manifest, out, views=1, shard="0/2")
    return Case(cache_args(w, "--views", "2", out=out), ("c.zarr", "views"), store=out)


@case("store: inspect two stores of different splits")
def _(w):
    val = w.tmp / "val.zarr"
    args = cache_args(w, out=val)
    args[args.index("--split") + 1] = "val"
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return Case(["inspect", str(w.base.store), str(val)], ("val.zarr", "manifest.split"))


def _edit_attrs(w: World, section: str, key: str, value: Any = None, *, drop: bool = False) -> Path:
    """A copy of the base store with one attrs field changed (or dropped), as by hand."""
    store = w.copy_store()
    group = zarr.open_group(str(store), mode="r+")
    part = dict(group.attrs[section])
    if drop:
        del part[key]
    else:
        part[key] = value
    group.attrs[section] = part
    return store


def _three_commands(w: World, store: Path) -> dict[str, list[str]]:
    return {"inspect": ["inspect", str(store)], "verify": ["verify", str(store)],
            "distill": distill_args(w, mentors=(str(store),))}


for _command in ("inspect", "verify", "distill"):
    @case(f"store: attrs without storage.kind ({_command})")
    def _(w, command=_command):
        store = _edit_attrs(w, "storage", "kind", drop=True)
        return Case(_three_commands(w, store)[command],
                    ("copy.zarr", "field storage.kind: expected a string, found none"), checkpoint=w.tmp / "s_out.pt")

    @case(f"store: attrs storage.rows_per_block of the wrong type ({_command})")
    def _(w, command=_command):
        store = _edit_attrs(w, "storage", "rows_per_block", "64")
        return Case(_three_commands(w, store)[command],
                    ("copy.zarr", "field storage.rows_per_block: expected a positive integer, found '64'"),
                    checkpoint=w.tmp / "s_out.pt")


@case("store: attrs storage.kind not a registered kind")
def _(w):
    store = _edit_attrs(w, "storage", "kind", "bf16")
    return Case(["inspect", str(store)], ("copy.zarr", "field storage.kind: expected one of", "found 'bf16'"))


def _flip(path: Path, at: int, bit: int = 0x10) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= bit
    path.write_bytes(bytes(raw))


@case("store: inspect a store with a byte flipped in a chunk")
def _(w):
    store = w.copy_store()
    _flip(store / "p_gt" / "c.0.2", 40)
    return Case(["inspect", str(store), "--out", str(w.tmp / "report")],
                ("copy.zarr", "field checksum: p_gt view 0 block 2: expected crc32"),
                unchanged=(store / "p_gt" / "c.0.2",))


@case("store: inspect a store with a byte flipped in label")
def _(w):
    store = w.copy_store()
    _flip(store / "label" / "c.0", 8, 0x80)
    return Case(["inspect", str(store)], ("copy.zarr", "field checksums.label: expected crc32"))


@case("store: inspect a store with two blocks swapped")
def _(w):
    store = w.copy_store()
    swap_blocks(store, view=0, a=0, b=1)
    return Case(["inspect", str(w.base.store), str(store)], ("copy.zarr", "field checksum: ", "view 0 block 0"))


def _second_mentor_of_aver(w: World, damage: Any) -> Case:
    """``distill --method aver`` with the base store first and a copy damaged by ``damage`` second."""
    store = w.copy_store()
    damage(store)
    return Case(distill_args(w, mentors=(str(w.base.store), str(store)), method="aver"),
                ("copy.zarr", "field checksum: ", "view 0 block ", "or its place changed"),
                checkpoint=w.tmp / "s_out.pt", unchanged=(store / "zarr.json", w.base.manifest))


@case("store: two blocks swapped, data and checksum chunks together (second mentor of aver)")
def _(w):
    return _second_mentor_of_aver(w, lambda s: swap_blocks(s, view=0, a=1, b=2))


@case("store: a block duplicated over another (second mentor of aver)")
def _(w):
    return _second_mentor_of_aver(w, lambda s: duplicate_block(s, view=0, source=0, target=3))


@case("store: a chunk moved to another block with its checksum (second mentor of aver)")
def _(w):
    return _second_mentor_of_aver(w, lambda s: move_chunk(s, "entropy", view=0, block=2, to=("entropy", 0, 1)))


@case("store: a byte flipped in label (second mentor of aver)")
def _(w):
    store = w.copy_store()
    chunk = store / "label" / "c.1"
    raw = bytearray(chunk.read_bytes())
    raw[8] ^= 0x80
    chunk.write_bytes(bytes(raw))
    return Case(distill_args(w, mentors=(str(w.base.store), str(store)), method="aver"),
                ("copy.zarr", "field checksums.label: expected crc32"), checkpoint=w.tmp / "s_out.pt",
                unchanged=(chunk, w.base.manifest))


# --- several stores of one pass, and the device: every check before the first store is created -------------

def _other_teacher(w: World) -> Path:
    return untrained_teacher(w.base.manifest, w.tmp / "other.pt", seed=1)


@case("pass: the second --out holds another teacher's store")
def _(w):
    held = w.copy_store()
    args = cache_args(w, "--teacher", str(_other_teacher(w)), "--out", str(held))
    return Case(args, ("copy.zarr", "field teacher.checkpoint_sha256", "--overwrite"),
                absent=(w.tmp / "c.zarr", w.tmp / ".c.zarr.creating-*"), unchanged=(held / "zarr.json",))


@case("pass: the second --out is a folder that is not a store")
def _(w):
    (w.tmp / "stuff").mkdir()
    (w.tmp / "stuff" / "notes.txt").write_text("mine\n")
    args = cache_args(w, "--teacher", str(_other_teacher(w)), "--out", str(w.tmp / "stuff"))
    return Case(args, ("stuff", "zarr.json"), absent=(w.tmp / "c.zarr", w.tmp / ".c.zarr.creating-*"))


@case("pass: the second --out is below a regular file")
def _(w):
    w.a_file()
    args = cache_args(w, "--teacher", str(_other_teacher(w)), "--out", str(w.tmp / "file" / "b.zarr"))
    return Case(args, ("file", "not a folder", "ENOTDIR"), absent=(w.tmp / "c.zarr", w.tmp / ".c.zarr.creating-*"))


@case("pass: --device cuda without CUDA")
def _(w):
    w.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = cache_args(w)
    args[args.index("--device") + 1] = "cuda"
    return Case(args, ("--device", "'cuda'", "CUDA is not available"),
                absent=(w.tmp / "c.zarr", w.tmp / ".c.zarr.creating-*"))


@case("pass: --device cuda without CUDA, two teachers")
def _(w):
    w.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = cache_args(w, "--teacher", str(_other_teacher(w)), "--out", str(w.tmp / "b.zarr"))
    args[args.index("--device") + 1] = "cuda"
    return Case(args, ("--device", "CUDA is not available"), absent=(w.tmp / "c.zarr", w.tmp / "b.zarr"))


# --- the disk ----------------------------------------------------------------------------------------------

@case("disk: cache --out below a regular file")
def _(w):
    out = w.a_file() / "c.zarr"
    return Case(cache_args(w, out=out), ("file", "not a folder", "--out"), store=out)


@case("disk: cache --out two levels below a regular file")
def _(w):
    out = w.a_file() / "deeper" / "c.zarr"
    return Case(cache_args(w, out=out), ("file", "ENOTDIR", "--out"), store=out)


@case("disk: train-teacher --out below a regular file")
def _(w):
    out = w.a_file() / "t.pt"
    return Case(train_args(w, out="file/t.pt"), ("file", "--out"), checkpoint=out)


@case("disk: train-teacher --metrics below a regular file")
def _(w):
    w.a_file()
    return Case(train_args(w, "--metrics", str(w.tmp / "file" / "m.json")), ("file", "--metrics"),
                checkpoint=w.tmp / "t_out.pt")


@case("disk: distill --metrics below a regular file")
def _(w):
    w.a_file()
    return Case(distill_args(w, "--metrics", str(w.tmp / "file" / "m.json")), ("file", "--metrics"),
                checkpoint=w.tmp / "s_out.pt")


@case("disk: distill --out below a regular file")
def _(w):
    w.a_file()
    return Case(distill_args(w, out="file/s.pt"), ("file", "--out"), checkpoint=w.tmp / "file" / "s.pt")


@case("disk: distill --out of the second student is a folder")
def _(w):
    (w.tmp / "dml_b.pt").mkdir()   # where student B would go
    return Case(["distill", "--method", "dml", "--manifest", str(w.base.manifest), "--student", "mlp",
                 "--student-b", "mlp", "--epochs", "1", "--no-progress", "--out", str(w.tmp / "dml.pt")],
                ("dml_b.pt", "--out"), checkpoint=w.tmp / "dml.pt")


@case("disk: evaluate --out below a regular file")
def _(w):
    w.a_file()
    return Case(["evaluate", str(w.base.teacher), "--manifest", str(w.base.manifest), "--device", "cpu",
                 "--out", str(w.tmp / "file" / "e.json")], ("file",))


@case("disk: inspect --out below a regular file")
def _(w):
    w.a_file()
    return Case(["inspect", str(w.base.store), "--out", str(w.tmp / "file" / "report")], ("file",))


@case("disk: manifest build --out below a regular file")
def _(w):
    w.a_file()
    return Case(["manifest", "build", "--dataset", "synthetic", "--root", str(w.tmp / "syn"), "--num-samples", "300",
                 "--out", str(w.tmp / "file" / "m.parquet")], ("file",))


def _fail_zarr_writes(w: World, error: int, *, after: int = 0, match: str = "") -> None:
    """zarr's file writes raise ``OSError(error)`` once ``after`` writes of paths containing ``match`` went through."""
    real = zarr_local._put
    seen = {"n": 0}

    def put(path: Path, value: Any, exclusive: bool = False) -> int:
        if match in str(path):
            seen["n"] += 1
            if seen["n"] > after:
                raise OSError(error, os.strerror(error), str(path))
        return real(path, value, exclusive=exclusive)

    w.monkeypatch.setattr(zarr_local, "_put", put)


@case("disk: full when the store is created")
def _(w):
    _fail_zarr_writes(w, errno.ENOSPC)
    return Case(cache_args(w), ("No space left on device", "ENOSPC", "--out", "c.zarr"), store=w.tmp / "c.zarr")


for _after in (3, 13, 16):   # after the group's and some arrays' metadata, amid the sample ids, amid the labels
    @case(f"disk: full when the store is created, after {_after} of its files")
    def _(w, after=_after):
        _fail_zarr_writes(w, errno.ENOSPC, after=after, match=".c.zarr.creating-")
        return Case(cache_args(w), ("No space left on device", "ENOSPC", "--out", "c.zarr"),
                    absent=(w.tmp / "c.zarr", w.tmp / ".c.zarr.creating-*"))


@case("disk: full after two blocks")
def _(w):
    _fail_zarr_writes(w, errno.ENOSPC, after=2, match="c.zarr/logits/c")
    return Case(cache_args(w), ("c.zarr/logits/c", "No space left on device", "--out"), store=w.tmp / "c.zarr")


@case("disk: a read-only store folder")
def _(w):
    _fail_zarr_writes(w, errno.EACCES, match="c.zarr/entropy/c")
    return Case(cache_args(w), ("c.zarr/entropy/c", "Permission denied", "EACCES"), store=w.tmp / "c.zarr")


@case("disk: a read-only folder for train-teacher --out")
def _(w):
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(w.tmp / "ro"))
    w.monkeypatch.setattr(pipeline.files.tempfile, "mkstemp", refuse)
    return Case(train_args(w, out="ro/t.pt"), ("ro", "Permission denied", "--out"), checkpoint=w.tmp / "ro" / "t.pt")


def _full_checkpoint_writes(w: World) -> None:
    """A checkpoint's file takes its first bytes, then the disk is full (``write`` raises ENOSPC)."""
    class Full(io.FileIO):
        def write(self, data: Any) -> int:
            super().write(bytes(memoryview(data)[:10]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)

    w.monkeypatch.setattr(pipeline.checkpoint, "open", lambda path, mode="r": Full(path, mode), raising=False)


@case("disk: full while a teacher checkpoint is written")
def _(w):
    _full_checkpoint_writes(w)
    return Case(train_args(w), ("t_out.pt", "No space left on device", "checkpoint"), checkpoint=w.tmp / "t_out.pt")


@case("disk: full while a student checkpoint is written")
def _(w):
    _full_checkpoint_writes(w)
    return Case(distill_args(w), ("s_out.pt", "No space left on device", "checkpoint"), checkpoint=w.tmp / "s_out.pt")


def test_the_catalogue_is_large() -> None:
    assert len(CASES) >= 20


@pytest.mark.parametrize("name", list(CASES))
def test_a_mistake_ends_in_one_line(name: str, base: Base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    check_case(CASES[name], World(base, tmp_path, monkeypatch, {"capsys": capsys}))


# --- the new checks in detail ------------------------------------------------------------------------------

def test_a_full_disk_leaves_the_store_incomplete_and_a_rerun_completes_it_identically(
        base: Base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean = cache(base.teacher, base.manifest, tmp_path / "clean.zarr", views=2)
    out = tmp_path / "c.zarr"
    args = ["cache", "--teacher", str(base.teacher), "--manifest", str(base.manifest), "--split", "train",
            "--views", "2", "--out", str(out), "--rows-per-block", "64", "--micro-batch", "32", "--no-progress",
            "--device", "cpu"]
    for after in (0, 3):    # at creation (nothing of the store left), then after three blocks
        with monkeypatch.context() as mp:
            _fail_zarr_writes(World(base, tmp_path, mp), errno.ENOSPC, after=after,
                              match="" if after == 0 else "c.zarr/logits/c")
            result = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 2, result.output
        assert result.stderr.count("error:") == 1 and "No space left on device" in result.stderr
        assert store_complete(out) in (None, False)
        if after == 0:
            assert not out.exists() and not list(tmp_path.glob(".c.zarr.creating-*"))
        else:
            assert int(zarr.open_group(str(out), mode="r")["done"][:].sum()) == 3
    result = CliRunner().invoke(cli, args, catch_exceptions=False)   # the disk has room again
    assert result.exit_code == 0, result.output
    assert store_complete(out) is True
    assert store_files(out) == store_files(clean)


def test_a_teacher_trained_on_another_manifest_is_cached_with_a_warning(base: Base, tmp_path: Path) -> None:
    blob = torch.load(base.teacher, weights_only=True)
    blob["meta"]["manifest_sha256"] = "0" * 64
    teacher = tmp_path / "other.pt"
    torch.save(blob, teacher)
    result = CliRunner().invoke(cli, cache_args(World(base, tmp_path, pytest.MonkeyPatch()), teacher=teacher),
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert lines == [f"warning: {teacher.resolve()}: field 'manifest_sha256': trained on {'0' * 64}, caching "
                     f"{base.manifest.resolve()} ({load_manifest(base.manifest).sha256})"]
    plain = CliRunner().invoke(cli, cache_args(World(base, tmp_path, pytest.MonkeyPatch()), out=tmp_path / "p.zarr"),
                               catch_exceptions=False)
    assert plain.exit_code == 0 and "warning:" not in plain.stderr


def test_a_teacher_checkpoint_changed_after_caching_is_named_by_distill_inspect_and_verify(
        base: Base, tmp_path: Path) -> None:
    teacher = tmp_path / "t.pt"
    shutil.copyfile(base.teacher, teacher)
    store = cache(teacher, base.manifest, tmp_path / "t.zarr", views=1)
    assert changed_teachers(read_attrs(store), store=store) == []
    recorded = read_attrs(store)["teacher"]["checkpoint_sha256"]
    untrained_teacher(base.manifest, teacher, seed=1)          # retrained in place
    lines = changed_teachers(read_attrs(store), store=store)
    assert len(lines) == 1 and "field teacher.checkpoint_sha256" in lines[0] and recorded in lines[0]
    world = World(base, tmp_path, pytest.MonkeyPatch())
    for args in (["inspect", str(store)], ["verify", str(store)], distill_args(world, mentors=(str(store),))):
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output      # the store itself is fine
        warned = [line for line in result.stderr.splitlines() if line.startswith("warning:")
                  and "it did not learn" not in line]       # a one-epoch student on tiny data may not learn
        assert warned == [f"warning: {lines[0]}"], result.stderr
    teacher.unlink()                                            # gone (the store was moved): nothing to say
    assert changed_teachers(read_attrs(store), store=store) == []


def _huge_teacher(world: World) -> Path:
    """The base teacher with its weight matrices scaled by 1e30: finite weights, overflowing logits."""
    return world.teacher_with("huge.pt", lambda b: b.update(model={k: v * 1e30 if v.ndim == 2 else v
                                                                  for k, v in b["model"].items()}))


def test_nan_targets_name_the_store_and_finite_ones_keep_the_lr_hint(base: Base, tmp_path: Path) -> None:
    world = World(base, tmp_path, pytest.MonkeyPatch())
    nan = nan_store(world, rows=(3, 150))
    for mode in ("memory", "stream"):
        result = CliRunner().invoke(cli, distill_args(world, "--cache-mode", mode, mentors=(str(nan),)),
                                    catch_exceptions=False)
        assert result.exit_code == 2
        assert result.stderr.strip().splitlines()[-1] == (
            f"error: {nan}: field logits: expected finite values, found NaN in rows [3, 150] of view 0")
    # finite targets, a student that overflows (started from weights scaled by 1e30): the lr hint
    huge = _huge_teacher(world)
    result = CliRunner().invoke(cli, distill_args(world, "--init", str(huge)), catch_exceptions=False)
    assert result.exit_code == 2
    assert "training diverged" in result.stderr and "lower the lr" in result.stderr


def test_evaluate_refuses_nan_logits_from_finite_weights(base: Base, tmp_path: Path) -> None:
    world = World(base, tmp_path, pytest.MonkeyPatch())
    huge = _huge_teacher(world)
    result = CliRunner().invoke(cli, ["evaluate", str(huge), "--manifest", str(base.manifest), "--device", "cpu"],
                                catch_exceptions=False)
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1].startswith(f"error: {huge}: field logits: expected finite values")


def test_a_full_disk_while_a_store_is_created_stops_at_the_failed_write(base: Base, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """At every file of a store's creation in turn: no write after the failed one (none left in flight
    to fill the folder being removed or to report its failure later), nothing left, one line."""
    real, writes = zarr_local._put, []

    def put(path: Path, value: Any, exclusive: bool = False) -> int:
        if ".c.zarr.creating-" in str(path):
            writes.append(str(path))
            if fail_at is not None and len(writes) > fail_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, value, exclusive=exclusive)

    monkeypatch.setattr(zarr_local, "_put", put)
    world = World(base, tmp_path, monkeypatch)
    fail_at = None
    args = cache_args(world, out=tmp_path / "whole" / "c.zarr")
    assert CliRunner().invoke(cli, args).exit_code == 0
    total = len(writes)
    assert total >= 2 * 4 + 9                               # metadata, then 4 chunks of sample ids and of labels
    for fail_at in range(total):
        writes.clear()
        out = tmp_path / f"full{fail_at}" / "c.zarr"
        result = CliRunner().invoke(cli, cache_args(world, out=out))
        gc.collect()                                        # a task failing unseen would be reported now
        assert result.exit_code == 2 and len(writes) == fail_at + 1, (fail_at, writes)
        assert [line for line in result.output.splitlines() if line] == [result.output.strip()], result.output
        assert "No space left on device" in result.output
        assert not list(out.parent.iterdir()), list(out.parent.iterdir())
    assert not [r for r in caplog.records if r.name.startswith("asyncio")], caplog.records
