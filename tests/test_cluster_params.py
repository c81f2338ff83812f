"""The cluster experiments (experiments/cifar100, experiments/imagenet100) through the repository's
dvc.yaml, on tiny fakes of their datasets in the real file formats, and every entry of their params
checked by the configs the stages build.

    .venv/bin/pytest -q tests/test_cluster_params.py            # the config checks
    .venv/bin/pytest -q tests/test_cluster_params.py -m slow    # dvc repro of both, a few minutes on 2 cores

The DVC runs copy the experiment folder (params.yaml, the dvc.yaml link) into a git + dvc repository
laid out like this one, so that ``code: ../..`` and ``data.classes: ../../data_manifests/...``
resolve as they do here, and override only what a CPU run of seconds needs (``_tiny``).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.cache import CacheConfig
from pipeline.checkpoint import load_checkpoint
from pipeline.data.config import DataConfig
from pipeline.manifest import load_manifest
from pipeline.models import create_model
from pipeline.report import Claim
from pipeline.train import DistillConfig, EvaluateConfig, TeacherConfig
from tests.support.data import write_cifar100
from tests.support.dvc import dvc_repo, run_dvc

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = {"cifar100": "cifar100", "imagenet100": "imagefolder"}     # folder: dataset
METHOD_KEYS = ["adaptive_alpha", "aver", "alpha_guided", "ca_wkd", "classroom", "dml", "dual", "kd", "nokd",
               "soft_ce", "soft_mse", "uncertainty"]
WNIDS = (REPO / "data_manifests" / "imagenet100.txt").read_text().split()


def _load_params_helper() -> ModuleType:
    """``stages/_params.py``, the stages' reader of params.yaml (the stages are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("cluster_stage_params", REPO / "stages" / "_params.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["cluster_stage_params"] = module
    spec.loader.exec_module(module)
    return module


Section = _load_params_helper().Section


# --- every entry of each params file passes its stage's config checks ----------------------------

@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_entry_builds_the_config_its_stage_builds(name: str) -> None:
    folder = REPO / "experiments" / name
    path = folder / "params.yaml"
    params = yaml.safe_load(path.read_text())
    assert (folder / "dvc.yaml").resolve() == (REPO / "dvc.yaml").resolve()
    assert (folder / params["code"]).resolve() == REPO
    data = Section.read("data", path=path).config(DataConfig)
    assert data.dataset == EXPERIMENTS[name]
    if data.classes is not None:              # a class-list file, read from the experiment folder
        assert (folder / data.classes).resolve() == REPO / "data_manifests" / "imagenet100.txt"
    cache = Section.read("cache", path=path).config(CacheConfig, teacher="t.pt", manifest="m.parquet", out="t.zarr")
    assert cache.views > 1 and cache.workers > 0
    assert Section.read("evaluate", path=path).config(EvaluateConfig).split == "test"
    teacher_defaults = Section.read("teacher_defaults", path=path)
    for teacher in params["teachers"]:
        section = Section.read("teachers", teacher, path=path)
        section = section.with_values(**{**teacher_defaults.values, **section.values})
        cfg = section.config(TeacherConfig, manifest="m.parquet", out="t.pt", history="t.csv")
        assert cfg.epochs >= 90 and cfg.batch_size >= 64, teacher
    assert sorted(params["students"]) == sorted(METHOD_KEYS)
    defaults = Section.read("student_defaults", path=path)
    for student in params["students"]:
        section = Section.read("students", student, path=path)
        merged = {**defaults.values, **section.values}
        seeds = merged.pop("seeds")
        assert seeds == [0, 1, 2]
        assert set(merged.get("mentors", [])) <= set(params["caches"]), student
        merged["mentors"] = [f"caches/{m}.zarr" for m in merged.get("mentors", [])]
        cfg = section.with_values(**merged).config(DistillConfig, manifest="m.parquet", out="s.pt", history="s.csv")
        assert cfg.epochs == params["student_defaults"]["epochs"], student
    lr, aver = params["student_defaults"]["lr"], params["students"]["aver"]
    assert aver["lr"] == pytest.approx(lr / len(aver["mentors"]))          # aver sums K KD terms
    assert params["students"]["classroom"]["lr"] < lr
    names = set(params["teachers"]) | set(params["students"])
    for i, claim in enumerate(params["report"]["claims"]):
        checked = Claim.from_dict(claim, source=str(path), prefix=f"report.claims[{i}]")
        assert set(checked.compare) <= names, claim


INPUT_SHAPES = {"cifar100": (3, 32, 32), "imagenet100": (3, 224, 224)}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_arch_of_the_file_builds_for_its_images_and_gives_100_logits(name: str) -> None:
    params = yaml.safe_load((REPO / "experiments" / name / "params.yaml").read_text())
    entries = [*params["teachers"].values(), params["student_defaults"], *params["students"].values()]
    archs = {e[key] for e in entries for key in ("arch", "student", "student_b") if key in e}
    for arch in sorted(archs):
        model = create_model(arch, num_classes=100, input_shape=INPUT_SHAPES[name]).eval()
        with torch.no_grad():
            assert model(torch.zeros(1, *INPUT_SHAPES[name])).shape == (1, 100), arch


def test_the_data_roots_are_placeholders_the_user_edits() -> None:
    for name in EXPERIMENTS:
        text = (REPO / "experiments" / name / "params.yaml").read_text()
        root_line = next(line for line in text.splitlines() if line.strip().startswith("root:"))
        assert "/path/to/" in root_line and "EDIT" in root_line


# --- dvc repro on tiny fakes ----------------------------------------------------------------------

def write_imagenet_folder(root: Path, *, train_per_class: int = 2, val_per_class: int = 1, size: int = 20) -> Path:
    """``root/{train,val}/<wnid>/<wnid>_<k>.JPEG`` for the 100 ImageNet-100 classes, ``size`` px JPEGs."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for wnid in WNIDS:
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / wnid / f"{wnid}_{k}.JPEG", format="JPEG")
    return root


def _tiny(params: dict[str, Any], *, root: Path, teachers: tuple[str, ...], students: tuple[str, ...],
          data: dict[str, Any]) -> dict[str, Any]:
    """The experiment's params for a CPU run of seconds, its methods and mentors kept. Overridden:
    data.root (the fake) and ``data`` (fewer rows, smaller images); a few teachers and students (the
    report reads every entry, so the others are dropped, and the classroom's mentors with them);
    every arch an MLP of 16 units (one ResNet-110 epoch on 100 images takes minutes on 2 busy cores;
    the file's archs are built and run by the config test); 1 epoch, 1 seed, batch 16 and
    1 DataLoader worker everywhere; 2 views."""
    small = {"epochs": 1, "batch_size": 16, "workers": 1}
    mlp = {"hidden": 16, "depth": 1}
    params = {**params, "data": {**params["data"], "root": str(root), **data}}
    params["teachers"] = {name: {**params["teachers"][name], **small, "arch": "mlp", "arch_options": mlp}
                          for name in teachers}
    params["caches"] = {name: entry for name, entry in params["caches"].items() if entry["teacher"] in teachers}
    params["cache"] = {**params["cache"], "views": 2, "workers": 1}
    params["student_defaults"] = {**params["student_defaults"], **small, "seeds": [0], "student": "mlp",
                                  "student_options": mlp}
    params["students"] = {name: dict(params["students"][name]) for name in students}
    for entry in params["students"].values():
        if "mentors" in entry:
            entry["mentors"] = [m for m in entry["mentors"] if m in teachers]
        if "student_b" in entry:
            entry.update(student_b="mlp", student_b_options={"hidden": 8, "depth": 1})
    params["evaluate"] = {**params["evaluate"], "workers": 1}
    keep = set(teachers) | set(students)
    params["report"] = {"claims": [c for c in params["report"]["claims"] if set(c["compare"]) <= keep]}
    return params


def _repro_report(folder: Path, teachers: tuple[str, ...], students: tuple[str, ...]) -> dict:
    """``dvc repro report`` (manifest, teachers, caches, students, report); the summary it wrote."""
    run = run_dvc(folder, "repro", "report")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for stage in ("manifest", *(f"teacher@{t}" for t in teachers), *(f"cache@{t}" for t in teachers),
                  *(f"student@{s}" for s in students), "report"):
        assert f"Running stage '{stage}'" in run.stdout, stage
    summary = json.loads((folder / "reports" / "summary.json").read_text())
    assert sorted(summary["teachers"]) == sorted(teachers)
    assert sorted(summary["students"]) == sorted(students)
    for student in summary["students"].values():
        assert student["seeds"] == [0] and {"accuracy_mean", "accuracy_std", "nll_mean"} <= set(student)
    assert "mse_to_bayes" not in summary["teachers"][teachers[0]]          # real data: no known posterior
    assert run_dvc(folder, "status", "--with-deps", "report").stdout.strip() == "Data and pipelines are up to date."
    return summary


@pytest.mark.slow
def test_cifar100_params_reproduce_on_a_fake_cifar100(tmp_path: Path) -> None:
    params = yaml.safe_load((REPO / "experiments" / "cifar100" / "params.yaml").read_text())
    root = write_cifar100(tmp_path / "cifar", n_train=100, n_test=16)
    teachers, students = ("ce", "peer_s"), ("dual", "classroom")
    folder = dvc_repo(tmp_path / "repo", _tiny(params, root=root, teachers=teachers, students=students, data={}),
                      experiment="cifar100")
    summary = _repro_report(folder, teachers, students)
    assert summary["students"]["classroom"]["mentors"] == ["ce", "peer_s"]
    assert "accuracy_b_mean" in summary["students"]["dual"]
    manifest = load_manifest(folder / "data_manifests" / "cifar100.parquet")
    assert manifest.num_classes == 100 and manifest.split_sizes() == {"train": 98, "val": 2, "test": 16}
    assert (folder / "models" / "students" / "classroom" / "seed0_mentors.csv").is_file()


@pytest.mark.slow
def test_imagenet100_params_reproduce_on_a_fake_imagenet_folder(tmp_path: Path) -> None:
    params = yaml.safe_load((REPO / "experiments" / "imagenet100" / "params.yaml").read_text())
    root = write_imagenet_folder(tmp_path / "imagenet")
    (root / "train" / "n99999999").mkdir()           # a class outside the list: skipped
    teachers, students = ("ce", "peer_s"), ("dual", "classroom")
    # 16 px crops (the file: 224), 32 train and 20 test rows.
    data = {"options": {**params["data"]["options"], "image_size": 16}, "subset": {"train": 32, "test": 20}}
    folder = dvc_repo(tmp_path / "repo", _tiny(params, root=root, teachers=teachers, students=students, data=data),
                      experiment="imagenet100")
    summary = _repro_report(folder, teachers, students)
    assert "accuracy_b_mean" in summary["students"]["dual"]
    manifest = load_manifest(folder / "data_manifests" / "imagefolder.parquet")
    assert manifest.class_names == tuple(WNIDS)           # data.classes resolved from the experiment folder
    assert manifest.split_sizes() == {"train": 32, "val": 2, "test": 20}
    assert load_checkpoint(folder / "models" / "students" / "dual" / "seed0_b.pt")["meta"]["arch_options"] == \
        {"hidden": 8, "depth": 1}
