"""A catalogue of user mistakes and accidents, each run through the real command line.

    .venv/bin/pytest -q tests/test_bad_inputs.py

Every case builds its inputs from tiny fixtures, spoils one thing (a manifest, a dataset, a
checkpoint, a store, a command-line argument, params.yaml, the disk) and runs ``kdcache``. Each must
end with a non-zero exit, exactly one ``error:`` line naming the file (or option) and the field,
no traceback, and nothing half-written marked complete: a store, if one was created, has
``status.complete`` false, and a training run leaves no checkpoint at ``--out``.

This part: manifests, datasets, checkpoints; command-line arguments and params.yaml are
tests/test_bad_inputs_options.py, stores and the disk tests/test_bad_inputs_stores.py; the machinery
and the checks tests/support/bad_inputs.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.data import build_manifest
from tests.support.bad_inputs import (
    Base,
    Case,
    Catalogue,
    World,
    cache_args,
    check_case,
    distill_args,
    make_base,
    train_args,
)
from tests.support.data import write_cifar10, write_idx_dataset, write_imagefolder
from tests.support.distill import untrained_teacher

CASES = Catalogue()
case = CASES.case


@pytest.fixture(scope="module")
def base(synthetic: str, tmp_path_factory: pytest.TempPathFactory) -> Base:
    return make_base(synthetic, tmp_path_factory.mktemp("bad_inputs"))


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
    return Case(cache_args(w, "--split", "nosuch"), ("nosuch",), store=w.tmp / "c.zarr")


@case("manifest: a val split typo")
def _(w):
    return Case(train_args(w, "--val-split", "vall"), ("'vall'",), checkpoint=w.tmp / "t_out.pt")


@case("manifest build: unknown option for the dataset")
def _(w):
    return Case(["manifest", "build", "--dataset", "cifar10", "--root", str(w.tmp), "--num-samples", "5",
                 "--out", str(w.tmp / "m.parquet")], ("num_samples",))


def _rewritten_synthetic(w: World, *, source: dict[int, str] | None = None, class_names: list[str] | None = None) -> Path:
    """A copy of the base synthetic manifest (same data file, a valid hash) with some ``source``
    values or its class names changed."""
    from pipeline.manifest import load_manifest, make_table, write_manifest
    m = load_manifest(w.base.manifest)
    columns = {name: m.table.column(name).to_numpy(zero_copy_only=False).copy()
               for name in ("sample_id", "label", "split", "source")}
    for row, value in (source or {}).items():
        columns["source"][row] = value
    out = w.tmp / "rewritten.parquet"
    write_manifest(out, make_table(**columns), dataset=m.dataset, class_names=class_names or list(m.class_names),
                   root=m.root, meta=m.meta, splits=m.splits)
    return out


@case("manifest: a source index past the end of the synthetic data")
def _(w):
    bad = _rewritten_synthetic(w, source={0: "99999999"})
    return Case(["manifest", "check", str(bad)], ("rewritten.parquet", "'99999999'", "row index"))


@case("manifest: cache with a source index past the end of the synthetic data")
def _(w):
    bad = _rewritten_synthetic(w, source={0: "99999999"})
    return Case(cache_args(w, "--manifest", str(bad)), ("'99999999'", "row index"), store=w.tmp / "c.zarr")


@case("manifest: 1000 class names for the 3 classes of the synthetic data")
def _(w):
    bad = _rewritten_synthetic(w, class_names=[f"c{i}" for i in range(1000)])
    return Case(["manifest", "check", str(bad)], ("'class_names'", "expected 3", "found 1000"))


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


@case("dataset: manifest check --files finds a truncated PNG")
def _(w):
    root = write_imagefolder(w.tmp / "imgs", dirs={"train": 2, "val": 1}, classes=("cat", "dog"))
    manifest = w.tmp / "m.parquet"
    build_manifest("imagefolder", root, manifest)
    image = root / "train" / "dog" / "img_0.png"
    image.write_bytes(image.read_bytes()[:200])
    return Case(["manifest", "check", str(manifest)], ("m.parquet", "img_0.png", "expected a readable image"))


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
    return Case(cache_args(w, teacher=w.tmp / "gone.pt"), ("gone.pt", "not found"), store=w.tmp / "c.zarr")


@case("checkpoint: --teacher is not a torch file")
def _(w):
    bad = w.tmp / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    return Case(cache_args(w, teacher=bad), ("junk.pt", "unreadable checkpoint"), store=w.tmp / "c.zarr")


@case("checkpoint: --teacher is a bare state_dict")
def _(w):
    bare = w.tmp / "bare.pt"
    torch.save(torch.load(w.base.teacher, weights_only=True)["model"], bare)
    return Case(cache_args(w, teacher=bare), ("bare.pt", "'format'"), store=w.tmp / "c.zarr")


@case("checkpoint: teacher meta without input_shape")
def _(w):
    bad = w.teacher_with("nometa.pt", lambda b: b["meta"].pop("input_shape"))
    return Case(cache_args(w, teacher=bad), ("nometa.pt", "'meta'"), store=w.tmp / "c.zarr")


class _RunsCode:
    """A pickled object whose loading would run a shell command (touching ``marker``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


@case("checkpoint: weights whose unpickling would run code (a torch file)")
def _(w):
    weights, marker = w.tmp / "evil.pt", w.tmp / "ran"
    torch.save({"state_dict": _RunsCode(marker)}, weights)
    return Case(cache_args(w, "--weights", str(weights), teacher="mlp"),
                ("evil.pt", "refused", "posix.system", "will not run it", "state_dict"), checkpoint=marker)


@case("checkpoint: weights whose unpickling would run code (a plain pickle)")
def _(w):
    import pickle
    weights, marker = w.tmp / "evil.pkl", w.tmp / "ran"
    weights.write_bytes(pickle.dumps({"state_dict": _RunsCode(marker)}))
    return Case(cache_args(w, "--weights", str(weights), teacher="mlp"),
                ("evil.pkl", "refused", "will not run it", "state_dict"), checkpoint=marker)


@case("checkpoint: teacher of another class count")
def _(w):
    bad = w.teacher_with("k5.pt", lambda b: b["meta"].update(num_classes=5))
    return Case(cache_args(w, teacher=bad), ("k5.pt", "num_classes"), store=w.tmp / "c.zarr")


@case("checkpoint: teacher of another input shape")
def _(w):
    bad = w.teacher_with("d31.pt", lambda b: b["meta"].update(input_shape=[31]))
    return Case(cache_args(w, teacher=bad), ("d31.pt", "input_shape"), store=w.tmp / "c.zarr")


@case("checkpoint: teacher weights of another shape")
def _(w):
    def change(blob: dict) -> None:
        key = next(iter(blob["model"]))
        blob["model"][key] = torch.zeros(3, 3)
    bad = w.teacher_with("shape.pt", change)
    return Case(cache_args(w, teacher=bad), ("shape.pt", "expected shape"), store=w.tmp / "c.zarr")


def _nan_weights(blob: dict) -> None:
    key = [k for k, v in blob["model"].items() if v.is_floating_point()][0]
    blob["model"][key] = blob["model"][key].clone()
    blob["model"][key].view(-1)[:3] = float("nan")


@case("checkpoint: teacher with NaN weights, cached")
def _(w):
    bad = w.teacher_with("nan.pt", _nan_weights)
    return Case(cache_args(w, teacher=bad), ("nan.pt", "'model.", "finite"), store=w.tmp / "c.zarr")


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
    return Case(distill_args(w, "--online", "--teachers", str(bad), mentors=()), ("nan.pt", "'model.", "finite"),
                checkpoint=w.tmp / "s_out.pt")


@case("checkpoint: live teacher whose logits overflow to NaN")
def _(w):
    def huge(blob: dict) -> None:  # finite weights, NaN logits: inf - inf in the last layer
        blob["model"] = {k: v * 1e30 if v.ndim == 2 else v for k, v in blob["model"].items()}
    bad = w.teacher_with("huge.pt", huge)
    return Case(distill_args(w, "--online", "--teachers", str(bad), mentors=()),
                ("huge.pt", "field logits", "expected finite values", "rows [0, 1, 2,", "of view 0"),
                checkpoint=w.tmp / "s_out.pt")


@case("checkpoint: --init with weights of another model")
def _(w):
    other = w.tmp / "cnn_like.pt"
    torch.save({"conv.weight": torch.zeros(3, 3)}, other)
    return Case(distill_args(w, "--init", str(other)), ("cnn_like.pt", "missing keys"), checkpoint=w.tmp / "s_out.pt")


@case("checkpoint: --init with NaN weights")
def _(w):
    bad = w.teacher_with("nan_init.pt", _nan_weights)
    return Case(distill_args(w, "--init", str(bad)), ("nan_init.pt", "'model.", "finite"),
                checkpoint=w.tmp / "s_out.pt")


@case("checkpoint: distill --resume from a teacher checkpoint")
def _(w):
    return Case(distill_args(w, "--resume", str(w.base.teacher)), ("t.pt", "'method'"), checkpoint=w.tmp / "s_out.pt")


@case("checkpoint: train-teacher --resume without a train state")
def _(w):
    return Case(train_args(w, "--resume", str(w.base.teacher)), ("t.pt", "train state"), checkpoint=w.tmp / "t_out.pt")


def _exiting_teacher(w: World, module: str, where: str) -> str:
    """``module:build``, a teacher callable written to ``w.tmp`` that calls ``sys.exit(5)`` ``where``:
    at import, when called, or in its forward pass."""
    body = {"import": "sys.exit(5)\n", "call": "", "forward": ""}[where]
    build = "    sys.exit(5)\n" if where == "call" else "    return Exits()\n"
    (w.tmp / f"{module}.py").write_text(
        "import sys\nimport torch\n" + body
        + "class Exits(torch.nn.Module):\n    def forward(self, x):\n        sys.exit(5)\n"
        + "def build():\n" + build)
    w.monkeypatch.syspath_prepend(str(w.tmp))
    return f"{module}:build"


for _where in ("import", "call", "forward"):
    @case(f"checkpoint: a module:function teacher that calls sys.exit(5) ({_where})")
    def _(w, where=_where):
        spec = _exiting_teacher(w, f"kd_exit_teacher_{where}", where)
        return Case(cache_args(w, teacher=spec), (spec, "SystemExit: 5"), store=w.tmp / "c.zarr",
                    absent=(w.tmp / "c.zarr",))


def test_the_catalogue_is_large() -> None:
    assert len(CASES) >= 20


@pytest.mark.parametrize("name", list(CASES))
def test_a_mistake_ends_in_one_line(name: str, base: Base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    check_case(CASES[name], World(base, tmp_path, monkeypatch, {"capsys": capsys}))
