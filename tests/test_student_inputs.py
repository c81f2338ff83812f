"""A student of its own resolution and normalization, distilled from a 224 px teacher's cache, and
what a student records about the stores it learned from.

    .venv/bin/pytest tests/test_student_inputs.py -q
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from pipeline.cache import CacheConfig, cache_teacher
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.cli import cli
from pipeline.config import ConfigError
from pipeline.data import build_manifest, open_split
from pipeline.data.views import ViewSpec, for_model, view_geometry
from pipeline.manifest import load_manifest
from pipeline.models import create_model
from pipeline.store import schema
from pipeline.train import DistillConfig, distill
from pipeline.train.evaluate import evaluate_checkpoint
from pipeline.train.loader import DistillLoader
from pipeline.train.targets import CachedTargets
from tests.support.cli import one_error_line
from tests.support.data import write_imagefolder

VIEWS = 2
pytestmark = pytest.mark.filterwarnings("ignore::pipeline.train.loop.TrainingWarning")   # untrained on 12 images


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    """An ImageFolder manifest at the default 224 px, a small CNN teacher for it and its 2-view cache."""
    tmp = tmp_path_factory.mktemp("student_inputs")
    root = write_imagefolder(tmp / "imgs", dirs={"train": 4, "val": 2}, size=(64, 48))
    manifest = tmp / "m.parquet"
    build_manifest("imagefolder", root, manifest)
    torch.manual_seed(0)
    teacher = tmp / "t.pt"
    save_checkpoint(teacher, model=create_model("cnn", num_classes=3, input_shape=(3, 224, 224), width=4),
                    meta={"arch": "cnn", "num_classes": 3, "input_shape": (3, 224, 224), "arch_options": {"width": 4},
                          "loss": "ce", "manifest_sha256": load_manifest(manifest).sha256})
    store = tmp / "t.zarr"
    assert cache_teacher(CacheConfig(teacher=str(teacher), manifest=str(manifest), out=str(store), views=VIEWS,
                                     rows_per_block=8, micro_batch=4, device="cpu", threads=1,
                                     progress=False)).complete
    return SimpleNamespace(tmp=tmp, manifest=str(manifest), teacher=str(teacher), store=str(store))


def _cfg(room, out, **changes) -> DistillConfig:
    settings = dict(method="kd", mentors=(room.store,), manifest=room.manifest, student="cnn",
                    student_options={"width": 4}, out=str(out), epochs=2, batch_size=4, device="cpu", progress=False)
    return DistillConfig(**{**settings, **changes})


def test_a_160_px_student_of_a_224_px_teachers_cache(room, tmp_path):
    seen = []
    cfg = _cfg(room, tmp_path / "s160.pt", input_size=160)
    distill(cfg, on_step=lambda batch, out: seen.append((batch.epoch, batch.rows.copy(), batch.x.clone())))
    man = load_manifest(room.manifest)
    teacher_views = ViewSpec.from_dict(schema.read_attrs(room.store)["views"]["spec"])
    student_views = for_model(teacher_views, input_size=160)
    assert {e for e, _, _ in seen} == {0, 1}
    for epoch, rows, x in seen:
        view = epoch % VIEWS
        assert x.shape[1:] == (3, 160, 160)
        big = open_split(man, "train", views=teacher_views, view=view)
        small = open_split(man, "train", views=student_views, view=view)
        assert torch.equal(x, torch.stack([small[int(r)][0] for r in rows]))
        # the teacher's 224 px inputs of the same rows, resized to 160 px: the same crops
        resized = F.interpolate(torch.stack([big[int(r)][0] for r in rows]), size=(160, 160), mode="bilinear",
                                antialias=True, align_corners=False)
        assert float((resized - x).abs().mean()) < 0.06
        for r in rows:
            sid = int(big.sample_ids[r])
            size = big.samples.get(int(r)).size
            assert view_geometry(student_views, size, sample_id=sid, view=view) == \
                view_geometry(teacher_views, size, sample_id=sid, view=view)
    meta = load_checkpoint(cfg.out)["meta"]
    assert meta["input_shape"] == (3, 160, 160) and meta["views"] == student_views.to_dict()
    assert meta["mentors"][0]["preprocessing"]["input_shape"] == [3, 224, 224]     # the teacher's own
    scores = evaluate_checkpoint(cfg.out, room.manifest, "test", device="cpu")   # scored at its own 160 px
    assert scores["n"] == 6


def test_inputs_of_the_same_size_are_the_default_run(room, tmp_path):
    default = _cfg(room, tmp_path / "a.pt", epochs=1)
    same = replace(default, input_size=224, out=str(tmp_path / "b.pt"))
    distill(default)
    distill(same)
    a, b = load_checkpoint(default.out), load_checkpoint(same.out)
    assert a["meta"]["views"] == b["meta"]["views"] == schema.read_attrs(room.store)["views"]["spec"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key])


def test_a_student_normalization_of_its_own(room, tmp_path):
    seen = []
    cfg = _cfg(room, tmp_path / "n.pt", epochs=1, input_size=96, input_mean=(0.5, 0.5, 0.5), input_std=(0.25,) * 3)
    distill(cfg, on_step=lambda batch, out: seen.append((batch.rows.copy(), batch.x.clone())))
    teacher_views = ViewSpec.from_dict(schema.read_attrs(room.store)["views"]["spec"])
    plain = open_split(load_manifest(room.manifest), "train", view=0,
                       views=for_model(teacher_views, input_size=96, mean=[0.0] * 3, std=[1.0] * 3))
    for rows, x in seen:
        torch.testing.assert_close(x, (torch.stack([plain[int(r)][0] for r in rows]) - 0.5) / 0.25)
    assert load_checkpoint(cfg.out)["meta"]["views"]["params"]["mean"] == [0.5] * 3


def test_the_cli_and_params_take_the_input_size(room, tmp_path):
    out = tmp_path / "cli.pt"
    result = CliRunner().invoke(cli, ["distill", "--method", "kd", "--mentors", room.store, "--manifest", room.manifest,
                                      "--student", "cnn", "--student-option", "width=4", "--epochs", "1",
                                      "--batch-size", "6", "--device", "cpu", "--no-progress", "--input-size", "128",
                                      "--input-mean", "0.5,0.5,0.5", "--input-std", "0.25,0.25,0.25",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    meta = load_checkpoint(out)["meta"]
    assert meta["input_shape"] == (3, 128, 128) and meta["views"]["params"]["std"] == [0.25] * 3
    params = {"method": "kd", "student": "cnn", "mentors": [room.store], "manifest": room.manifest, "out": str(out)}
    assert DistillConfig.from_dict({**params, "input_size": 160}).input_size == 160
    assert DistillConfig.from_dict(params).input_size is None
    with pytest.raises(ConfigError, match="input_size"):
        DistillConfig.from_dict({**params, "input_size": "160"}, source="params.yaml", prefix="students.kd")


def test_input_size_mistakes_are_one_line(room, synthetic_teacher, tmp_path):
    base = ["distill", "--method", "kd", "--student", "cnn", "--epochs", "1", "--device", "cpu", "--no-progress",
            "--out", str(tmp_path / "x.pt")]
    runner = CliRunner()
    one_error_line(runner.invoke(cli, base + ["--manifest", room.manifest, "--online", "--teachers", room.teacher,
                                              "--input-size", "160"]),
                   "input_size", "online", "cache the teachers")
    one_error_line(runner.invoke(cli, base + ["--manifest", room.manifest, "--mentors", room.store,
                                              "--input-size", "0"]), "input_size", "an integer >= 1")
    bad = runner.invoke(cli, base + ["--manifest", room.manifest, "--mentors", room.store, "--input-mean", "0.5,x"])
    assert bad.exit_code == 2 and "'--input-mean': expected comma-separated numbers, found '0.5,x'" in bad.output
    manifest, teacher = synthetic_teacher
    one_error_line(runner.invoke(cli, ["distill", "--method", "kd", "--student", "mlp", "--manifest", str(manifest),
                                       "--online", "--teachers", str(teacher), "--input-size", "16", "--epochs", "1",
                                       "--device", "cpu", "--no-progress", "--out", str(tmp_path / "y.pt")]),
                   "input_size", "vector data")
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "y.pt").exists()


# --- what a student records about its stores -------------------------------------------------------


def test_a_students_provenance_holds_each_teachers_source_and_preprocessing(room, tmp_path):
    cfg = _cfg(room, tmp_path / "p.pt", epochs=1)
    distill(cfg)
    teacher = schema.read_attrs(room.store)["teacher"]
    mentor = load_checkpoint(cfg.out)["meta"]["mentors"][0]
    assert mentor["source"] == "checkpoint" and mentor["source"] == teacher["source"]
    assert mentor["preprocessing"] == teacher["preprocessing"]
    assert mentor["preprocessing"]["input_shape"] == [3, 224, 224] and len(mentor["preprocessing"]["mean"]) == 3

    # a store written before stores recorded them still reads: its mentor's are None
    older = room.tmp / "older.zarr"          # next to the original: its store-relative paths still hold
    shutil.rmtree(older, ignore_errors=True)
    shutil.copytree(room.store, older)
    meta_file = older / "zarr.json"
    group = json.loads(meta_file.read_text())
    for key in ("source", "preprocessing"):
        del group["attributes"]["teacher"][key]
    meta_file.write_text(json.dumps(group))
    targets = CachedTargets.open([str(older)], load_manifest(room.manifest))
    try:
        assert targets.provenance[0]["source"] is None and targets.provenance[0]["preprocessing"] is None
        assert targets.provenance[0]["checkpoint_sha256"] == teacher["checkpoint_sha256"]
    finally:
        targets.close()
    old_cfg = replace(cfg, mentors=(str(older),), out=str(tmp_path / "old.pt"))
    distill(old_cfg)
    assert load_checkpoint(old_cfg.out)["meta"]["mentors"][0]["preprocessing"] is None


def test_the_loader_gives_your_own_loop_the_students_resolution(room):
    man = load_manifest(room.manifest)
    with DistillLoader([room.store], man, batch_size=4, input_size=96) as loader:
        assert loader.input_shape == (3, 96, 96)
        for epoch in (0, 1):
            own = open_split(man, "train", views=loader.view_spec, view=epoch % VIEWS)
            for x, _, _ in loader.epoch(epoch):
                assert x.shape[1:] == (3, 96, 96)
            rows = next(iter(loader.epoch(epoch).batches))
            x = next(iter(loader.epoch(epoch)))[0]
            assert torch.equal(x, torch.stack([own[int(i)][0] for i in rows]))
    assert loader.view_spec == for_model(ViewSpec.from_dict(schema.read_attrs(room.store)["views"]["spec"]),
                                         input_size=96)
