"""A catalogue of user mistakes and accidents, each run through the real command line.

    .venv/bin/pytest -q tests/test_bad_inputs.py

Every case builds its inputs from tiny fixtures, spoils one thing (a manifest, a dataset, a
checkpoint, a store, a command-line argument, params.yaml, the disk) and runs ``kdcache``. Each must
end with a non-zero exit, exactly one ``error:`` line naming the file (or option) and the field,
no traceback, and nothing half-written marked complete: a store, if one was created, has
``status.complete`` false, and a training run leaves no checkpoint at ``--out``.

The disk is spoiled without a real full disk or a read-only mount (tests may run as root, for whom
nothing is read-only): a path below a regular file gives ENOTDIR/EEXIST for real, and ENOSPC/EACCES
come from monkeypatched writes (zarr's file writes, the temporary file of an output check).
The tests after the catalogue check the store state around a full disk, NaN targets, NaN weights
and a teacher checkpoint that changed after caching in more detail.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import yaml
import zarr
import zarr.storage._local as zarr_local
from click.testing import CliRunner

import pipeline.files
import pipeline.store.writer as store_writer
from pipeline.cache.teacher import TeacherComputer
from pipeline.cli import cli
from pipeline.data import build_manifest
from pipeline.manifest import load_manifest
from pipeline.store.provenance import changed_teachers
from pipeline.store.schema import read_attrs
from tests.support.data import write_cifar10, write_idx_dataset, write_imagefolder
from tests.support.distill import cache, untrained_teacher
from tests.support.stores import store_files

STAGES = Path(__file__).resolve().parents[1] / "stages"


# --- the world every case starts from ---------------------------------------------------------------------

@dataclass(frozen=True)
class Base:
    """Built once: a synthetic manifest (200 train rows), an untrained teacher, its complete cache."""

    manifest: Path
    teacher: Path
    store: Path


@pytest.fixture(scope="session")
def base(synthetic: str, tmp_path_factory: pytest.TempPathFactory) -> Base:
    root = tmp_path_factory.mktemp("bad_inputs")
    teacher = untrained_teacher(synthetic, root / "t.pt")
    store = cache(teacher, synthetic, root / "t.zarr", views=1)
    return Base(Path(synthetic), teacher, store)


@dataclass
class Case:
    """What to run, what the one error line must name, and what must not be left complete."""

    args: list[str]
    needles: tuple[str, ...]
    store: Path | None = None          # a store that must not be marked complete (if it exists)
    checkpoint: Path | None = None     # a checkpoint that must not exist
    run: Callable[[], tuple[int, str]] | None = None   # instead of the CLI (params.yaml: a stage script)


@dataclass
class World:
    base: Base
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    extra: dict[str, Any] = field(default_factory=dict)

    def copy_store(self) -> Path:
        out = self.tmp / "copy.zarr"
        shutil.copytree(self.base.store, out)
        return out

    def a_file(self, name: str = "file") -> Path:
        path = self.tmp / name
        path.write_text("a regular file, not a folder\n")
        return path

    def teacher_with(self, name: str, change: Callable[[dict], None]) -> Path:
        """A copy of the base teacher with its checkpoint dict changed by ``change``."""
        blob = torch.load(self.base.teacher, weights_only=True)
        change(blob)
        out = self.tmp / name
        torch.save(blob, out)
        return out


CASES: dict[str, Callable[[World], Case]] = {}


def case(name: str) -> Callable:
    def register(fn: Callable[[World], Case]) -> Callable[[World], Case]:
        assert name not in CASES, name
        CASES[name] = fn
        return fn
    return register


def _train(w: World, *extra: str, out: str = "t_out.pt") -> list[str]:
    return ["train-teacher", "--manifest", str(w.base.manifest), "--arch", "mlp", "--epochs", "1",
            "--no-progress", "--out", str(w.tmp / out), *extra]


def _distill(w: World, *extra: str, mentors: tuple[str, ...] | None = None, out: str = "s_out.pt") -> list[str]:
    given = ["--mentors", *(mentors if mentors is not None else (str(w.base.store),))] if mentors != () else []
    return ["distill", "--method", "kd", *given, "--manifest", str(w.base.manifest), "--student", "mlp",
            "--epochs", "1", "--no-progress", "--device", "cpu", "--out", str(w.tmp / out), *extra]


def _cache(w: World, *extra: str, teacher: Path | None = None, out: Path | None = None) -> list[str]:
    return ["cache", "--teacher", str(teacher or w.base.teacher), "--manifest", str(w.base.manifest),
            "--split", "train", "--out", str(out or w.tmp / "c.zarr"), "--rows-per-block", "64",
            "--micro-batch", "32", "--threads", "1", "--device", "cpu", "--no-progress", *extra]


# --- manifests --------------------------------------------------------------------------------------------

@case("manifest: file missing")
def _(w):
    return Case(["manifest", "check", str(w.tmp / "nope.parquet")], ("nope.parquet", "not found"))


@case("manifest: not parquet")
def _(w):
    bad = w.tmp / "m.parquet"
    bad.write_bytes(b"PAR1 this is not parquet at all")
    return Case(["manifest", "check", str(bad)], ("m.parquet", "Parquet"))


@case("manifest: a parquet file without kdcache metadata")
def _(w):
    import pyarrow as pa
    import pyarrow.parquet as pq
    bad = w.tmp / "plain.parquet"
    pq.write_table(pa.table({"sample_id": [1, 2], "label": [0, 1]}), bad)
    return Case(["manifest", "check", str(bad)], ("plain.parquet", "metadata field"))


@case("manifest: a column missing")
def _(w):
    import pyarrow.parquet as pq
    table = pq.read_table(w.base.manifest)
    bad = w.tmp / "nolabel.parquet"
    pq.write_table(table.drop(["label"]), bad)
    return Case(["manifest", "check", str(bad)], ("nolabel.parquet", "'label'"))


@case("manifest: a split that is not there")
def _(w):
    return Case(_cache(w, "--split", "nosuch"), ("nosuch",), store=w.tmp / "c.zarr")


@case("manifest: a val split typo")
def _(w):
    return Case(_train(w, "--val-split", "vall"), ("'vall'",), checkpoint=w.tmp / "t_out.pt")


@case("manifest build: unknown option for the dataset")
def _(w):
    return Case(["manifest", "build", "--dataset", "cifar10", "--root", str(w.tmp), "--num-samples", "5",
                 "--out", str(w.tmp / "m.parquet")], ("num_samples",))


# --- datasets ----------------------------------------------------------------------------------------------

@case("dataset: cifar10 root without its batches")
def _(w):
    (w.tmp / "empty").mkdir()
    return Case(["manifest", "build", "--dataset", "cifar10", "--root", str(w.tmp / "empty"),
                 "--out", str(w.tmp / "m.parquet")], ("empty",))


@case("dataset: a truncated cifar10 batch")
def _(w):
    root = write_cifar10(w.tmp / "cifar")
    batch = next(root.rglob("data_batch_1"))
    batch.write_bytes(batch.read_bytes()[:100])
    return Case(["manifest", "build", "--dataset", "cifar10", "--root", str(root),
                 "--out", str(w.tmp / "m.parquet")], ("data_batch_1",))


@case("dataset: fashion-mnist without its label file")
def _(w):
    root = write_idx_dataset(w.tmp / "fm")
    (root / "train-labels-idx1-ubyte.gz").unlink()
    return Case(["manifest", "build", "--dataset", "fashion-mnist", "--root", str(root),
                 "--out", str(w.tmp / "m.parquet")], ("train-labels-idx1-ubyte",))


@case("dataset: imagefolder without a train folder")
def _(w):
    (w.tmp / "imgs" / "val" / "cat").mkdir(parents=True)
    return Case(["manifest", "build", "--dataset", "imagefolder", "--root", str(w.tmp / "imgs"),
                 "--out", str(w.tmp / "m.parquet")], ("train",))


@case("dataset: imagefolder --classes names a class that is not there")
def _(w):
    root = write_imagefolder(w.tmp / "imgs", dirs={"train": 2, "val": 1}, classes=("cat", "dog"))
    (w.tmp / "classes.txt").write_text("cat\nzebra\n")
    return Case(["manifest", "build", "--dataset", "imagefolder", "--root", str(root), "--classes",
                 str(w.tmp / "classes.txt"), "--out", str(w.tmp / "m.parquet")], ("zebra",))


def _image_world(w: World) -> tuple[Path, Path, Path]:
    root = write_imagefolder(w.tmp / "imgs", dirs={"train": 3, "val": 2}, classes=("cat", "dog"))
    manifest = w.tmp / "img.parquet"
    build_manifest("imagefolder", root, manifest, image_size=32)
    teacher = untrained_teacher(manifest, w.tmp / "cnn.pt", arch="cnn")
    return root, manifest, teacher


@case("dataset: an image deleted after the manifest was built")
def _(w):
    root, manifest, teacher = _image_world(w)
    (root / "train" / "dog" / "img_2.png").unlink()
    return Case(["cache", "--teacher", str(teacher), "--manifest", str(manifest), "--split", "train",
                 "--out", str(w.tmp / "c.zarr"), "--no-progress"], ("img_2.png",), store=w.tmp / "c.zarr")


@case("dataset: an image that does not decode")
def _(w):
    root, manifest, teacher = _image_world(w)
    (root / "train" / "cat" / "img_0.png").write_bytes(b"\x89PNG not really")
    return Case(["cache", "--teacher", str(teacher), "--manifest", str(manifest), "--split", "train",
                 "--out", str(w.tmp / "c.zarr"), "--no-progress", "--device", "cpu"], ("img_0.png",),
                store=w.tmp / "c.zarr")


# --- checkpoints -------------------------------------------------------------------------------------------

@case("checkpoint: --teacher missing")
def _(w):
    return Case(_cache(w, teacher=w.tmp / "gone.pt"), ("gone.pt", "not found"), store=w.tmp / "c.zarr")


@case("checkpoint: --teacher is not a torch file")
def _(w):
    bad = w.tmp / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    return Case(_cache(w, teacher=bad), ("junk.pt", "unreadable checkpoint"), store=w.tmp / "c.zarr")


@case("checkpoint: --teacher is a bare state_dict")
def _(w):
    bare = w.tmp / "bare.pt"
    torch.save(torch.load(w.base.teacher, weights_only=True)["model"], bare)
    return Case(_cache(w, teacher=bare), ("bare.pt", "'format'"), store=w.tmp / "c.zarr")


@case("checkpoint: teacher meta without input_shape")
def _(w):
    bad = w.teacher_with("nometa.pt", lambda b: b["meta"].pop("input_shape"))
    return Case(_cache(w, teacher=bad), ("nometa.pt", "'meta'"), store=w.tmp / "c.zarr")


@case("checkpoint: teacher of another class count")
def _(w):
    bad = w.teacher_with("k5.pt", lambda b: b["meta"].update(num_classes=5))
    return Case(_cache(w, teacher=bad), ("k5.pt", "num_classes"), store=w.tmp / "c.zarr")


@case("checkpoint: teacher of another input shape")
def _(w):
    bad = w.teacher_with("d31.pt", lambda b: b["meta"].update(input_shape=[31]))
    return Case(_cache(w, teacher=bad), ("d31.pt", "input_shape"), store=w.tmp / "c.zarr")


@case("checkpoint: teacher weights of another shape")
def _(w):
    def change(blob: dict) -> None:
        key = next(iter(blob["model"]))
        blob["model"][key] = torch.zeros(3, 3)
    bad = w.teacher_with("shape.pt", change)
    return Case(_cache(w, teacher=bad), ("shape.pt", "expected shape"), store=w.tmp / "c.zarr")


def _nan_weights(blob: dict) -> None:
    key = [k for k, v in blob["model"].items() if v.is_floating_point()][0]
    blob["model"][key] = blob["model"][key].clone()
    blob["model"][key].view(-1)[:3] = float("nan")


@case("checkpoint: teacher with NaN weights, cached")
def _(w):
    bad = w.teacher_with("nan.pt", _nan_weights)
    return Case(_cache(w, teacher=bad), ("nan.pt", "'model.", "finite"), store=w.tmp / "c.zarr")


@case("checkpoint: evaluate with NaN weights")
def _(w):
    bad = w.teacher_with("nan.pt", _nan_weights)
    return Case(["evaluate", str(bad), "--manifest", str(w.base.manifest), "--device", "cpu"],
                ("nan.pt", "'model.", "finite"))


@case("checkpoint: evaluate with another class count")
def _(w):
    bad = w.teacher_with("k5.pt", lambda b: b["meta"].update(num_classes=5))
    return Case(["evaluate", str(bad), "--manifest", str(w.base.manifest)], ("k5.pt", "'net.5.weight'", "(5, 128)"))


@case("checkpoint: evaluate --strict on another manifest")
def _(w):
    other = w.teacher_with("other.pt", lambda b: b["meta"].update(manifest_sha256="0" * 64))
    return Case(["evaluate", str(other), "--manifest", str(w.base.manifest), "--strict", "--device", "cpu"],
                ("other.pt", "'manifest_sha256'"))


@case("checkpoint: live teacher with NaN weights")
def _(w):
    bad = w.teacher_with("nan.pt", _nan_weights)
    return Case(_distill(w, "--online", "--teachers", str(bad), mentors=()), ("nan.pt", "'model.", "finite"),
                checkpoint=w.tmp / "s_out.pt")


@case("checkpoint: live teacher whose logits overflow to NaN")
def _(w):
    def huge(blob: dict) -> None:  # finite weights, NaN logits: inf - inf in the last layer
        blob["model"] = {k: v * 1e30 if v.ndim == 2 else v for k, v in blob["model"].items()}
    bad = w.teacher_with("huge.pt", huge)
    return Case(_distill(w, "--online", "--teachers", str(bad), mentors=()),
                ("huge.pt", "field logits", "expected finite values", "rows [0, 1, 2,", "of view 0"),
                checkpoint=w.tmp / "s_out.pt")


@case("checkpoint: --init with weights of another model")
def _(w):
    other = w.tmp / "cnn_like.pt"
    torch.save({"conv.weight": torch.zeros(3, 3)}, other)
    return Case(_distill(w, "--init", str(other)), ("cnn_like.pt", "missing keys"), checkpoint=w.tmp / "s_out.pt")


@case("checkpoint: --init with NaN weights")
def _(w):
    bad = w.teacher_with("nan_init.pt", _nan_weights)
    return Case(_distill(w, "--init", str(bad)), ("nan_init.pt", "'model.", "finite"),
                checkpoint=w.tmp / "s_out.pt")


@case("checkpoint: distill --resume from a teacher checkpoint")
def _(w):
    return Case(_distill(w, "--resume", str(w.base.teacher)), ("t.pt", "'method'"), checkpoint=w.tmp / "s_out.pt")


@case("checkpoint: train-teacher --resume without a train state")
def _(w):
    return Case(_train(w, "--resume", str(w.base.teacher)), ("t.pt", "train state"), checkpoint=w.tmp / "t_out.pt")


# --- stores ------------------------------------------------------------------------------------------------

@case("store: --mentors not there")
def _(w):
    return Case(_distill(w, mentors=(str(w.tmp / "gone.zarr"),)), ("gone.zarr",), checkpoint=w.tmp / "s_out.pt")


@case("store: --mentors is not a store")
def _(w):
    (w.tmp / "folder.zarr").mkdir()
    return Case(_distill(w, mentors=(str(w.tmp / "folder.zarr"),)), ("folder.zarr",), checkpoint=w.tmp / "s_out.pt")


@case("store: incomplete (another shard still missing)")
def _(w):
    out = w.tmp / "half.zarr"
    cache(w.base.teacher, w.base.manifest, out, views=1, shard="0/2")
    return Case(_distill(w, mentors=(str(out),)), ("half.zarr", "status.complete"), store=out,
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
    return Case(_distill(w, "--views", "3"), ("t.zarr", "views.count"), checkpoint=w.tmp / "s_out.pt")


@case("store: --train-split other than the store's")
def _(w):
    return Case(_distill(w, "--train-split", "val"), ("t.zarr", "manifest.split"), checkpoint=w.tmp / "s_out.pt")


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
    return Case(_distill(w, mentors=(str(store),)), ("copy.zarr", "done"), checkpoint=w.tmp / "s_out.pt")


def _edit_array_meta(w: World, name: str, **changes: Any) -> Path:
    """A copy of the base store with keys of ``name``'s zarr.json changed (as by hand)."""
    store = w.copy_store()
    meta = store / name / "zarr.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), **changes}))
    return store


@case("store: logits dtype edited in its zarr.json")
def _(w):
    store = _edit_array_meta(w, "logits", data_type="float32")
    return Case(_distill(w, mentors=(str(store),)), ("copy.zarr", "field logits", "dtype", "float32"),
                checkpoint=w.tmp / "s_out.pt")


@case("store: logits dtype edited to one of the same size")
def _(w):  # the chunk files keep their sizes and checksums: only the metadata check sees it
    store = _edit_array_meta(w, "logits", data_type="int16", fill_value=0)
    return Case(_distill(w, mentors=(str(store),)), ("copy.zarr", "field logits", "dtype", "int16"),
                checkpoint=w.tmp / "s_out.pt")


@case("store: NaN logits written by a teacher")
def _(w):
    out = _nan_store(w, rows=(5, 77))
    return Case(_distill(w, mentors=(str(out),)),
                ("nan.zarr", "field logits", "expected finite values, found NaN in rows [5, 77] of view 0"),
                checkpoint=w.tmp / "s_out.pt")


@case("store: reopened with other --views")
def _(w):
    out = w.tmp / "c.zarr"
    cache(w.base.teacher, w.base.manifest, out, views=1, shard="0/2")
    return Case(_cache(w, "--views", "2", out=out), ("c.zarr", "views"), store=out)


@case("store: inspect two stores of different splits")
def _(w):
    val = w.tmp / "val.zarr"
    args = _cache(w, out=val)
    args[args.index("--split") + 1] = "val"
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return Case(["inspect", str(w.base.store), str(val)], ("val.zarr", "manifest.split"))


# --- command-line arguments ------------------------------------------------------------------------------

@case("args: --option without =")
def _(w):
    return Case(_distill(w, "--option", "T"), ("--option", "KEY=VALUE"), checkpoint=w.tmp / "s_out.pt")


@case("args: --option key twice")
def _(w):
    return Case(_distill(w, "--option", "T=4", "--option", "T=5"), ("--option", "'T'"),
                checkpoint=w.tmp / "s_out.pt")


@case("args: --option unknown to the method")
def _(w):
    return Case(_distill(w, "--option", "tempurature=4"), ("tempurature",), checkpoint=w.tmp / "s_out.pt")


@case("args: a two-student method without --student-b")
def _(w):
    return Case(["distill", "--method", "dml", "--manifest", str(w.base.manifest), "--student", "mlp",
                 "--out", str(w.tmp / "s_out.pt")], ("student_b",), checkpoint=w.tmp / "s_out.pt")


@case("args: --teachers without --online")
def _(w):
    return Case(_distill(w, "--teachers", str(w.base.teacher), mentors=()), ("teachers", "online"),
                checkpoint=w.tmp / "s_out.pt")


@case("args: --arch unknown")
def _(w):
    return Case(["train-teacher", "--manifest", str(w.base.manifest), "--arch", "resnet9000",
                 "--out", str(w.tmp / "t_out.pt")], ("'arch'", "resnet9000"), checkpoint=w.tmp / "t_out.pt")


@case("args: --lr negative")
def _(w):
    return Case(_train(w, "--lr", "-1"), ("'lr'", "> 0"), checkpoint=w.tmp / "t_out.pt")


@case("args: --epochs 0")
def _(w):
    return Case(_train(w, "--epochs", "0"), ("'epochs'",), checkpoint=w.tmp / "t_out.pt")


@case("args: --views 0 for cache")
def _(w):
    return Case(_cache(w, "--views", "0"), ("'views'",), store=w.tmp / "c.zarr")


@case("args: --storage topk without --k")
def _(w):
    return Case(_cache(w, "--storage", "topk"), ("k",), store=w.tmp / "c.zarr")


@case("args: --shard out of range")
def _(w):
    return Case(_cache(w, "--shard", "3/2"), ("--shard", "3/2"), store=w.tmp / "c.zarr")


@case("args: --overwrite with --shard")
def _(w):
    return Case(_cache(w, "--shard", "0/2", "--overwrite"), ("--overwrite", "--shard"), store=w.tmp / "c.zarr")


@case("args: plan without sizes")
def _(w):
    return Case(["plan"], ("--num-samples", "--manifest"))


@case("args: inspect --bins 1")
def _(w):
    return Case(["inspect", str(w.base.store), "--bins", "1"], ("--bins",))


# --- params.yaml (the DVC stages) --------------------------------------------------------------------------

def _stage(w: World, name: str, params: dict | str, argv: list[str]) -> Callable[[], tuple[int, str]]:
    """Run ``stages/<name>.py`` in-process in ``w.tmp`` with ``params``; returns (status, stderr)."""
    def run() -> tuple[int, str]:
        (w.tmp / "params.yaml").write_text(params if isinstance(params, str) else yaml.safe_dump(params))
        w.monkeypatch.syspath_prepend(str(STAGES))
        w.monkeypatch.chdir(w.tmp)
        spec = importlib.util.spec_from_file_location(f"stage_{name}", STAGES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        w.monkeypatch.setitem(sys.modules, f"stage_{name}", module)
        spec.loader.exec_module(module)
        w.monkeypatch.setattr(sys, "argv", [f"stages/{name}.py", *argv])
        capture = w.extra["capsys"]
        capture.readouterr()
        try:
            module.run(module.main)
            status = 0
        except SystemExit as exit_:
            status = int(exit_.code or 0)
        return status, capture.readouterr().err
    return run


_TEACHER_ARGS = ["--name", "ce", "--manifest", "m.parquet", "--out", "t_out.pt", "--metrics", "t.json"]


@case("params.yaml: a bad value")
def _(w):
    params = {"teachers": {"ce": {"arch": "mlp", "loss": "ce", "epochs": 1, "lr": "fast"}}}
    return Case([], ("params.yaml", "teachers.ce.lr"), checkpoint=w.tmp / "t_out.pt",
                run=_stage(w, "train_teacher", params, _TEACHER_ARGS))


@case("params.yaml: a key typo")
def _(w):
    params = {"teachers": {"ce": {"arch": "mlp", "loss": "ce", "epochs": 1, "lrr": 0.1}}}
    return Case([], ("params.yaml", "'lrr'"), checkpoint=w.tmp / "t_out.pt",
                run=_stage(w, "train_teacher", params, _TEACHER_ARGS))


@case("params.yaml: the section missing")
def _(w):
    return Case([], ("params.yaml", "'teachers.ce'"), checkpoint=w.tmp / "t_out.pt",
                run=_stage(w, "train_teacher", {"teachers": {"mse": {"arch": "mlp"}}}, _TEACHER_ARGS))


@case("params.yaml: not YAML")
def _(w):
    return Case([], ("params.yaml", "YAML"), checkpoint=w.tmp / "t_out.pt",
                run=_stage(w, "train_teacher", "teachers: [unclosed", _TEACHER_ARGS))


# --- the disk ----------------------------------------------------------------------------------------------

@case("disk: cache --out below a regular file")
def _(w):
    out = w.a_file() / "c.zarr"
    return Case(_cache(w, out=out), ("file", "not a folder", "--out"), store=out)


@case("disk: cache --out two levels below a regular file")
def _(w):
    out = w.a_file() / "deeper" / "c.zarr"
    return Case(_cache(w, out=out), ("file", "ENOTDIR", "--out"), store=out)


@case("disk: train-teacher --out below a regular file")
def _(w):
    out = w.a_file() / "t.pt"
    return Case(_train(w, out="file/t.pt"), ("file", "--out"), checkpoint=out)


@case("disk: train-teacher --metrics below a regular file")
def _(w):
    w.a_file()
    return Case(_train(w, "--metrics", str(w.tmp / "file" / "m.json")), ("file", "--metrics"),
                checkpoint=w.tmp / "t_out.pt")


@case("disk: distill --metrics below a regular file")
def _(w):
    w.a_file()
    return Case(_distill(w, "--metrics", str(w.tmp / "file" / "m.json")), ("file", "--metrics"),
                checkpoint=w.tmp / "s_out.pt")


@case("disk: distill --out below a regular file")
def _(w):
    w.a_file()
    return Case(_distill(w, out="file/s.pt"), ("file", "--out"), checkpoint=w.tmp / "file" / "s.pt")


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
    return Case(_cache(w), ("No space left on device", "ENOSPC", "--out", "c.zarr"), store=w.tmp / "c.zarr")


@case("disk: full after two blocks")
def _(w):
    _fail_zarr_writes(w, errno.ENOSPC, after=2, match="c.zarr/logits/c")
    return Case(_cache(w), ("c.zarr/logits/c", "No space left on device", "--out"), store=w.tmp / "c.zarr")


@case("disk: a read-only store folder")
def _(w):
    _fail_zarr_writes(w, errno.EACCES, match="c.zarr/entropy/c")
    return Case(_cache(w), ("c.zarr/entropy/c", "Permission denied", "EACCES"), store=w.tmp / "c.zarr")


@case("disk: a read-only folder for train-teacher --out")
def _(w):
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(w.tmp / "ro"))
    w.monkeypatch.setattr(pipeline.files.tempfile, "mkstemp", refuse)
    return Case(_train(w, out="ro/t.pt"), ("ro", "Permission denied", "--out"), checkpoint=w.tmp / "ro" / "t.pt")


@case("disk: full while a checkpoint is written")
def _(w):
    def full(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), getattr(f, "name", str(f)))
    w.monkeypatch.setattr(torch, "save", full)
    return Case(_train(w), ("t_out.pt", "No space left on device", "checkpoint"), checkpoint=w.tmp / "t_out.pt")


# --- running the catalogue ---------------------------------------------------------------------------------

def _nan_store(w: World, *, rows: tuple[int, ...]) -> Path:
    """A complete cache whose teacher gave NaN logits at ``rows`` (view 0): the writer's finite checks are
    switched off, as a writer without them (or another tool) would have left it."""
    real_call = TeacherComputer.__call__

    def call(self: TeacherComputer, view: int, start: int, stop: int) -> np.ndarray:
        z = real_call(self, view, start, stop)
        for row in rows:
            if start <= row < stop:
                z[row - start] = np.nan
        return z

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TeacherComputer, "__call__", call)
        mp.setattr(store_writer, "np", _FiniteChecksOff())
        out = cache(w.base.teacher, w.base.manifest, w.tmp / "nan.zarr", views=1)
    assert read_attrs(out)["status"]["complete"]
    return out


class _FiniteChecksOff:
    """numpy for the store writer with ``isfinite`` true everywhere (a writer without finite checks)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)

    @staticmethod
    def isfinite(values: Any) -> np.ndarray:
        return np.ones(np.shape(values), dtype=bool)


def _status(store: Path) -> bool | None:
    """``status.complete`` of ``store``, None when there is no store there."""
    try:
        if not (store / "zarr.json").is_file():
            return None
    except OSError:
        return None
    return bool(read_attrs(store)["status"].get("complete"))


def test_the_catalogue_is_large() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_a_mistake_ends_in_one_line(name: str, base: Base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    world = World(base, tmp_path, monkeypatch, {"capsys": capsys})
    got = CASES[name](world)
    if got.run is not None:
        status, stderr = got.run()
    else:
        result = CliRunner().invoke(cli, got.args, catch_exceptions=False)
        status, stderr = result.exit_code, result.stderr
    assert status != 0, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    for needle in got.needles:
        assert needle in errors[0], (needle, errors[0])
    if got.store is not None:
        assert _status(got.store) in (None, False), got.store
    if got.checkpoint is not None:
        assert not got.checkpoint.exists(), got.checkpoint


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
        assert _status(out) in (None, False)
        if after == 0:
            assert not out.exists() and not list(tmp_path.glob(".c.zarr.creating-*"))
        else:
            assert int(zarr.open_group(str(out), mode="r")["done"][:].sum()) == 3
    result = CliRunner().invoke(cli, args, catch_exceptions=False)   # the disk has room again
    assert result.exit_code == 0, result.output
    assert _status(out) is True
    assert store_files(out) == store_files(clean)


def test_a_teacher_trained_on_another_manifest_is_cached_with_a_warning(base: Base, tmp_path: Path) -> None:
    blob = torch.load(base.teacher, weights_only=True)
    blob["meta"]["manifest_sha256"] = "0" * 64
    teacher = tmp_path / "other.pt"
    torch.save(blob, teacher)
    result = CliRunner().invoke(cli, _cache(World(base, tmp_path, pytest.MonkeyPatch()), teacher=teacher),
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert lines == [f"warning: {teacher.resolve()}: field 'manifest_sha256': trained on {'0' * 64}, caching "
                     f"{base.manifest.resolve()} ({load_manifest(base.manifest).sha256})"]
    plain = CliRunner().invoke(cli, _cache(World(base, tmp_path, pytest.MonkeyPatch()), out=tmp_path / "p.zarr"),
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
    for args in (["inspect", str(store)], ["verify", str(store)], _distill(world, mentors=(str(store),))):
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output      # the store itself is fine
        warned = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
        assert warned == [f"warning: {lines[0]}"], result.stderr
    teacher.unlink()                                            # gone (the store was moved): nothing to say
    assert changed_teachers(read_attrs(store), store=store) == []


def test_nan_targets_name_the_store_and_finite_ones_keep_the_lr_hint(base: Base, tmp_path: Path) -> None:
    world = World(base, tmp_path, pytest.MonkeyPatch())
    nan = _nan_store(world, rows=(3, 150))
    for mode in ("memory", "stream"):
        result = CliRunner().invoke(cli, _distill(world, "--cache-mode", mode, mentors=(str(nan),)),
                                    catch_exceptions=False)
        assert result.exit_code == 2
        assert result.stderr.strip().splitlines()[-1] == (
            f"error: {nan}: field logits: expected finite values, found NaN in rows [3, 150] of view 0")
    result = CliRunner().invoke(cli, _distill(world, "--lr", "1e30"), catch_exceptions=False)
    assert result.exit_code == 2
    assert "training diverged" in result.stderr and "lower the lr" in result.stderr


def test_evaluate_refuses_nan_logits_from_finite_weights(base: Base, tmp_path: Path) -> None:
    world = World(base, tmp_path, pytest.MonkeyPatch())
    huge = world.teacher_with("huge.pt", lambda b: b.update(model={k: v * 1e30 if v.ndim == 2 else v
                                                                  for k, v in b["model"].items()}))
    result = CliRunner().invoke(cli, ["evaluate", str(huge), "--manifest", str(base.manifest), "--device", "cpu"],
                                catch_exceptions=False)
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1].startswith(f"error: {huge}: field logits: expected finite values")
