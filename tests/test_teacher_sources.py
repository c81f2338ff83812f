"""Teacher sources (``pipeline.teachers``): each form of ``--teacher`` parsed into its typed source
and named, a test-only form (tests/plugin_teacher_source.py) cached, verified and run live through
the normal API, and no code outside the teachers module deciding a teacher's form.

    .venv/bin/pytest tests/test_teacher_sources.py -q
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache import CacheConfig, cache_teacher
from pipeline.checkpoint import load_checkpoint
from pipeline.errors import UserError
from pipeline.models import state_sha256
from pipeline.store import schema
from pipeline.store.verify import verify_store
from pipeline.teachers import (SOURCES, ArchSource, CallableSource, CheckpointSource, teacher_name,
                               teacher_source)
from pipeline.train import DistillConfig, distill
from tests.plugin_teacher_source import FixedSource   # importing it registers the "fixed" source

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"


def test_each_form_is_parsed_into_its_source_and_named(synthetic_teacher, tmp_path):
    _, checkpoint = synthetic_teacher
    weights = tmp_path / "r18.pt"
    torch.save({}, weights)
    source = teacher_source(checkpoint)
    assert type(source) is CheckpointSource and source.spec == str(checkpoint.resolve()) and source.weights is None
    assert source.weights_file == source.spec and teacher_name(source) == checkpoint.stem
    for text in ("resnet18", "torchvision:resnet18", "mlp"):
        source = teacher_source(text, weights)
        assert type(source) is ArchSource and source.spec == text and source.weights == str(weights.resolve())
        assert teacher_name(source) == "r18"
    source = teacher_source("my_pkg.models:build_teacher")
    assert type(source) is CallableSource and source.weights_file is None and teacher_name(source) == "build_teacher"
    assert teacher_name(teacher_source("my_pkg.models:build_teacher", weights)) == "r18"
    # a path that names no file is a checkpoint, so that loading it says the file is not found
    missing = teacher_source("models/none.pt")
    assert type(missing) is CheckpointSource and missing.spec == str(Path("models/none.pt").resolve())
    assert type(teacher_source("fixed:3")) is FixedSource  # the plugin's rank puts it before module:function


@pytest.mark.parametrize("teacher, weights, needle", [
    ("CHECKPOINT", "WEIGHTS", "expected no --weights with the checkpoint"),
    ("resnet18", None, "expected --weights FILE with an architecture name"),
    ("resnet18", "missing.pt", "--weights missing.pt: weights file not found"),
    ("fixed:x", None, "expected fixed:SEED"),
    ("not_a_model", None, "expected a kdcache checkpoint file, an architecture name"),
])
def test_a_spec_no_form_takes_is_one_line(synthetic_teacher, tmp_path, teacher, weights, needle):
    _, checkpoint = synthetic_teacher
    weights_file = tmp_path / "w.pt"
    torch.save({}, weights_file)
    teacher = str(checkpoint) if teacher == "CHECKPOINT" else teacher
    weights = str(weights_file) if weights == "WEIGHTS" else weights
    with pytest.raises(UserError) as err:
        teacher_source(teacher, weights)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_the_unknown_form_message_names_every_registered_form():
    with pytest.raises(UserError) as err:
        teacher_source("not_a_model")
    for kind in SOURCES.names():
        assert SOURCES.get(kind).form() in str(err.value)


@pytest.fixture(scope="module")
def fixed_store(synthetic, tmp_path_factory):
    """The plugin teacher ``fixed:3`` cached (float32, 1 view) on the synthetic train split."""
    out = tmp_path_factory.mktemp("fixed") / "fixed3.zarr"
    result = cache_teacher(CacheConfig(teacher="fixed:3", manifest=synthetic, split="train", views=1, dtype="float32",
                                       out=str(out), rows_per_block=64, device="cpu", threads=1, progress=False))
    assert result.complete
    return out


def test_a_plugin_source_is_cached_verified_and_recorded(synthetic, fixed_store):
    report = verify_store(fixed_store)
    assert report.ok, report
    teacher = schema.read_attrs(fixed_store)["teacher"]
    model, _ = FixedSource("fixed:3").build(num_classes=3, input_shape=(30,))
    assert teacher["source"] == "fixed" and teacher["arch"] == "linear" and teacher["name"] == "3"
    assert teacher["checkpoint_sha256"] == state_sha256(model) and teacher["path"] is None
    assert teacher["preprocessing"]["input_shape"] == [30]


@pytest.mark.filterwarnings("ignore::pipeline.train.loop.TrainingWarning")   # one epoch of a random teacher
def test_a_plugin_source_teaches_live_as_its_cache_does(synthetic, fixed_store, tmp_path):
    def run(**kw) -> list[float]:
        losses: list[float] = []
        distill(DistillConfig(manifest=synthetic, method="kd", student="mlp", epochs=1, batch_size=32, lr=0.05,
                              device="cpu", progress=False, **kw),
                on_step=lambda batch, out: losses.append(float(out["loss"].detach())))
        return losses

    cached = run(mentors=(str(fixed_store),), out=str(tmp_path / "off.pt"))
    live = run(online=True, teachers=("fixed:3",), views=1, out=str(tmp_path / "on.pt"))
    other = run(online=True, teachers=("fixed:4",), views=1, out=str(tmp_path / "other.pt"))
    assert len(cached) == len(live) > 0
    np.testing.assert_allclose(live, cached, rtol=1e-5)
    assert not np.allclose(other, cached, rtol=1e-3)          # another seed is another teacher: not vacuous
    mentor = load_checkpoint(tmp_path / "on.pt")["meta"]["mentors"][0]
    assert mentor["source"] == "fixed" and mentor["checkpoint"] is None
    assert mentor["checkpoint_sha256"] == schema.read_attrs(fixed_store)["teacher"]["checkpoint_sha256"]


# --- one home: nothing outside pipeline/teachers.py decides a teacher's form ----------------------

_SUFFIXES = (".pt", ".pth", ".ckpt")   # a checkpoint told by its name (a weights file's format is checkpoint.py's)


def _form_checks(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, text) of each comparison or prefix/suffix test on a source's kind, a ``prefix:`` or a
    weights suffix: the ways code decides which form a teacher spec is."""
    kinds = set(SOURCES.names()) | {"checkpoint", "arch", "callable"}
    found = []
    for node in ast.walk(tree):
        values: list[ast.expr] = []
        if isinstance(node, ast.Compare):
            values = [node.left, *node.comparators]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "endswith", "removeprefix")):
            values = [a for arg in node.args for a in (arg.elts if isinstance(arg, ast.Tuple) else [arg])]
        for value in values:
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                text = value.value
                if text in kinds or text == ":" or (text.endswith(":") and len(text) > 1) or text in _SUFFIXES:
                    found.append((node.lineno, text))
    return found


def test_no_teacher_form_is_decided_outside_the_teachers_module():
    decided = {str(path.relative_to(PACKAGE.parent)): checks for path in sorted(PACKAGE.rglob("*.py"))
               if path.name != "teachers.py" and (checks := _form_checks(ast.parse(path.read_text())))}
    assert decided == {}


def test_the_form_finder_finds_form_checks():
    code = ('if spec.source == "checkpoint": pass\nif text.startswith(("timm:", "x")): pass\n'
            'if ":" in text: pass\nif name.endswith(".pt"): pass\n')
    assert [text for _, text in _form_checks(ast.parse(code))] == ["checkpoint", "timm:", ":", ".pt"]
