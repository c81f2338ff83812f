"""The experiment around the library: a run that learned nothing says so, reruns write the same
bytes, the report's verdicts, manifest subsets, and the DVC pipeline end to end on reduced params.

    .venv/bin/pytest -q tests/test_experiment.py
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from pipeline.cache import CacheConfig, cache_teacher
from pipeline.cli import cli
from pipeline.data import build_manifest
from pipeline.errors import UserError
from pipeline.manifest import load_manifest
from pipeline.report import FAILS, HOLDS, WITHIN_NOISE, Claim, check_claim, markdown, summarize, write_report
from pipeline.train import DistillConfig, TeacherConfig, distill, train_teacher
from pipeline.train.loop import learning_problem
from pipeline.train.teacher import lr_hint

from tests.support.dvc import dvc_repo, run_dvc

REPO = Path(__file__).resolve().parents[1]


# --- a run that did not learn ---------------------------------------------------------------------

def _rows(*pairs: tuple[float, float]) -> list[dict]:
    return [{"epoch": i + 1, "train_loss": loss, "val_top1": top1} for i, (loss, top1) in enumerate(pairs)]


def test_learning_problem_names_chance_accuracy_and_a_flat_loss() -> None:
    at_chance = learning_problem(_rows((2.3, 0.1), (1.9, 0.11)), num_classes=10, what="distill aver", hint="lower lr")
    assert at_chance.startswith("distill aver ended at chance accuracy (val_top1 0.1100; chance is 0.1000")
    assert at_chance.endswith("lower lr")
    flat = learning_problem(_rows((1.0, 0.6), (0.999, 0.6), (0.995, 0.6)), num_classes=3, what="t", hint="h")
    assert flat.startswith("t: train_loss did not move over 3 epochs (1.0000 -> 0.9950)")
    assert learning_problem(_rows((1.0, 0.6), (0.8, 0.7), (0.7, 0.75)), num_classes=3, what="t", hint="h") is None
    assert learning_problem(_rows((1.0, 0.6), (0.999, 0.6)), num_classes=3, what="t", hint="h") is None  # 2 epochs
    assert learning_problem([], num_classes=3, what="t", hint="h") is None


def test_the_teachers_hint_follows_what_its_loss_did() -> None:
    assert "rose (2.3 -> 9.1): try a smaller lr (this run: 5.0)" in lr_hint(_rows((2.3, 0.1), (9.1, 0.1)), 5.0)
    assert "try a smaller lr" in lr_hint(_rows((2.3, 0.1), (float("nan"), 0.1)), 5.0)
    assert lr_hint(_rows((2.3, 0.1), (2.3, 0.1), (2.299, 0.1)), 1e-9).startswith(
        "the train_loss barely moved: try a larger lr (this run: 1e-09)")
    assert lr_hint(_rows((2.3, 0.1), (1.9, 0.1)), 0.1).startswith("try more epochs")


def test_a_student_that_does_not_learn_ends_with_a_warning_not_a_success_line(synthetic: str, tmp_path: Path) -> None:
    args = ["distill", "--method", "nokd", "--manifest", synthetic, "--student", "mlp", "--epochs", "3",
            "--lr", "1e-9", "--out", str(tmp_path / "s.pt")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    out, err = result.stdout.strip().splitlines(), result.stderr.strip().splitlines()
    assert out[-1].startswith(f"wrote {tmp_path / 's.pt'}")
    assert err[-1].startswith("warning: distill nokd ended at chance accuracy (val_top1 0.")   # the very last line
    assert "it did not learn; the lr (1e-09)" in err[-1] and "Recommended settings" in err[-1]
    assert sum("warning:" in line for line in err) == 1
    with pytest.warns(UserWarning, match="it did not learn"):
        metrics = distill(DistillConfig(method="nokd", manifest=synthetic, student="mlp", epochs=3, lr=1e-9,
                                        out=str(tmp_path / "api.pt"), progress=False))
    assert metrics["warning"].startswith("distill nokd ended at chance accuracy")
    learned = distill(DistillConfig(method="nokd", manifest=synthetic, student="mlp", epochs=3,
                                    out=str(tmp_path / "ok.pt"), progress=False))
    assert "warning" not in learned


# --- the same inputs write the same bytes ---------------------------------------------------------

def test_rerunning_teacher_cache_and_student_rewrites_identical_files(synthetic: str, tmp_path: Path) -> None:
    teacher = TeacherConfig(manifest=synthetic, arch="mlp", epochs=2, out=str(tmp_path / "t.pt"),
                            history=str(tmp_path / "t.csv"), progress=False)
    cache = CacheConfig(teacher=teacher.out, manifest=synthetic, out=str(tmp_path / "t.zarr"), overwrite=True,
                        progress=False)
    student = DistillConfig(method="kd", mentors=(cache.out,), manifest=synthetic, student="mlp", epochs=2,
                            out=str(tmp_path / "s.pt"), history=str(tmp_path / "s.csv"), progress=False)

    def run_all() -> dict[str, bytes]:
        train_teacher(teacher)
        cache_teacher(cache)
        distill(student)
        files = [p for p in sorted(tmp_path.rglob("*")) if p.is_file()]
        return {str(p.relative_to(tmp_path)): p.read_bytes() for p in files}

    first = run_all()
    again = run_all()
    assert sorted(first) == sorted(again)
    changed = [name for name in first if first[name] != again[name]]
    assert changed == [], changed
    assert any(name.startswith("t.zarr/") for name in first) and "s.pt" in first


# --- the report ----------------------------------------------------------------------------------

def _student(method: str, *accuracies: float, mse: float | None = None) -> dict:
    runs = [{"seed": i, "accuracy": a, "nll": 1.0 - a, **({"mse_to_bayes": mse} if mse is not None else {})}
            for i, a in enumerate(accuracies)]
    return {"method": method, "mentors": ["ce"], "runs": runs}


def test_claims_hold_clearly_within_noise_or_not() -> None:
    models = {"ce": {"loss": "ce", "accuracy": 0.80, "mse_to_bayes": 0.02},
              "mse": {"loss": "mse", "accuracy": 0.81, "mse_to_bayes": 0.01},
              "kd": _student("kd", 0.800, 0.802, 0.801), "clear": _student("x", 0.810, 0.812, 0.811),
              "close": _student("x", 0.795, 0.812, 0.800), "worse": _student("x", 0.790, 0.791, 0.792)}
    verdict = {name: check_claim(Claim(text="t", metric="accuracy", compare=(name, "kd")), models)["verdict"]
               for name in ("clear", "close", "worse")}
    assert verdict == {"clear": HOLDS, "close": WITHIN_NOISE, "worse": FAILS}
    lower = check_claim(Claim(text="t", metric="mse_to_bayes", compare=("mse", "ce")), models)
    assert lower["verdict"] == HOLDS and lower["figures"]["mse"] == {"mean": 0.01, "std": 0.0, "runs": 1}
    several = check_claim(Claim(text="t", metric="accuracy", compare=("clear", "kd", "worse", "close")), models)
    assert several["verdict"] == WITHIN_NOISE                    # clearly above two, within noise of one
    assert check_claim(Claim(text="t", metric="mse_to_bayes", compare=("kd", "ce")), models)["verdict"] \
        .startswith("not measured (kd has no mse_to_bayes)")
    with pytest.raises(UserError, match="no teacher or student named 'nope'"):
        check_claim(Claim(text="t", metric="accuracy", compare=("kd", "nope")), models)


def test_a_claim_is_checked_like_every_config() -> None:
    with pytest.raises(UserError, match="report.claims\\[0\\].metric: expected one of accuracy, nll, mse_to_bayes"):
        Claim.from_dict({"text": "t", "metric": "top1", "compare": ["a", "b"]}, source="params.yaml",
                        prefix="report.claims[0]")
    with pytest.raises(UserError, match="'compare': expected a list of at least two model names, found \\['a'\\]"):
        Claim.from_dict({"text": "t", "metric": "accuracy", "compare": ["a"]})


def test_summary_tables_and_figures(tmp_path: Path) -> None:
    teachers = {"ce": {"loss": "ce", "arch": "mlp", "accuracy": 0.8, "nll": 0.5}}
    students = {"kd": _student("kd", 0.78, 0.79), "dual": _student("dual", 0.79, 0.80)}
    students["dual"]["runs"] = [{**r, "accuracy_b": 0.7} for r in students["dual"]["runs"]]
    students["kd"]["stored_bytes_per_sample"] = 48
    summary = summarize(teachers, students, [Claim(text="dual beats kd", metric="accuracy", compare=("dual", "kd"))])
    assert summary["students"]["kd"] == {"method": "kd", "mentors": ["ce"], "stored_bytes_per_sample": 48,
                                         "seeds": [0, 1], "accuracy_mean": 0.785,
                                         "accuracy_std": pytest.approx(0.007071, abs=1e-6),
                                         "nll_mean": 0.215}
    assert summary["students"]["dual"]["accuracy_b_mean"] == 0.7
    text = markdown(summary)
    assert "| kd | kd | ce | 48 | 2 | 78.50 ± 0.71 |" in text and "| dual | dual | ce | — | 2 |" in text and "70.00 ± 0.00" in text
    assert f"- **{WITHIN_NOISE}**: dual beats kd" in text or f"- **{HOLDS}**: dual beats kd" in text
    mentors = tmp_path / "m.csv"
    mentors.write_text("epoch,mentor,name,rank,active,temperature\n1,0,ce,1.1,1.0,2.0\n2,0,ce,1.0,0.5,3.0\n")
    curves = tmp_path / "kd.csv"
    curves.write_text("epoch,train_loss,val_top1\n1,1.0,0.5\n2,0.8,0.6\n")
    written = write_report(summary, tmp_path / "r", curves={"kd": curves}, mentor_stats={"room": mentors})
    names = sorted(p.name for p in written)
    assert names == ["bytes.png", "curves.png", "mentors_room.png", "methods.png", "summary.json", "summary.md"]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["claims"][0]["text"] == "dual beats kd"
    assert all((tmp_path / "r" / "figures" / n).read_bytes()[:4] == b"\x89PNG" for n in names if n.endswith(".png"))
    with pytest.raises(UserError, match="names used by a teacher and a student: kd"):
        summarize({"kd": teachers["ce"]}, students, [])


# --- subsets of a real dataset --------------------------------------------------------------------

def test_a_subset_keeps_n_random_rows_of_a_split(tmp_path: Path) -> None:
    full = build_manifest("synthetic", tmp_path / "d", tmp_path / "full.parquet", seed=0, num_samples=2000)
    part = build_manifest("synthetic", tmp_path / "d", tmp_path / "part.parquet", seed=0, num_samples=2000,
                          subset={"train": 30, "val": 10})
    assert part.split_sizes() == {**full.split_sizes(), "train": 30, "val": 10}
    train = part.split("train").sample_id
    assert set(train) <= set(full.split("train").sample_id) and np.all(np.diff(train) > 0)
    again = build_manifest("synthetic", tmp_path / "d", tmp_path / "again.parquet", seed=0, num_samples=2000,
                           subset={"train": 30, "val": 10})
    assert np.array_equal(again.split("train").sample_id, train)
    assert load_manifest(tmp_path / "part.parquet").sha256 != full.sha256
    with pytest.raises(UserError, match=r"subset.train: expected a number of rows in \[1, 100\], found 101"):
        build_manifest("synthetic", tmp_path / "d", tmp_path / "x.parquet", num_samples=2000, subset={"train": 101})
    with pytest.raises(UserError, match="subset: no split 'dev'"):
        build_manifest("synthetic", tmp_path / "d", tmp_path / "x.parquet", num_samples=2000, subset={"dev": 1})
    assert not (tmp_path / "x.parquet").exists()


# --- the pipeline, end to end ---------------------------------------------------------------------

REDUCED_STUDENTS = ("nokd", "kd", "soft_ce", "soft_mse", "dual", "classroom")


def _reduced_params() -> dict:
    """params.yaml with little data, one epoch and two seeds; three teachers and six students."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["options"] = {"num_samples": 1200}
    params["teachers"] = {name: {**params["teachers"][name], "epochs": 1} for name in ("ce", "mse", "peer_s")}
    params["caches"] = {name: params["caches"][name] for name in params["teachers"]}
    params["student_defaults"] = {**params["student_defaults"], "epochs": 1, "seeds": [0, 1]}
    params["students"] = {name: params["students"][name] for name in REDUCED_STUDENTS}
    params["students"]["classroom"]["mentors"] = ["ce", "peer_s"]
    keep = set(params["teachers"]) | set(params["students"])
    params["report"]["claims"] = [c for c in params["report"]["claims"] if set(c["compare"]) <= keep]
    return params


@pytest.mark.slow
def test_the_pipeline_runs_reports_and_a_second_repro_does_nothing(tmp_path: Path) -> None:
    if shutil.which("dvc", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("dvc is not installed in this environment (pip install -e .[dev])")
    repo = dvc_repo(tmp_path / "repo", _reduced_params())
    first = run_dvc(repo, "repro")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "# Results (test split)" in first.stdout and "The papers' claims, here" in first.stdout

    summary = json.loads((repo / "reports" / "summary.json").read_text())
    assert sorted(summary["teachers"]) == ["ce", "mse", "peer_s"]
    assert sorted(summary["students"]) == sorted(REDUCED_STUDENTS)
    assert {"loss", "accuracy", "mse_to_bayes", "nll"} <= set(summary["teachers"]["mse"])
    assert summary["teachers"]["mse"]["loss"] == "mse"
    for student in summary["students"].values():
        assert student["seeds"] == [0, 1]
        assert {"method", "mentors", "accuracy_mean", "accuracy_std", "mse_to_bayes_mean"} <= set(student)
    assert summary["students"]["classroom"]["mentors"] == ["ce", "peer_s"]
    classroom = json.loads((repo / "results" / "students" / "classroom.json").read_text())
    assert classroom["mentors"] == ["ce", "peer_s"]
    stored = {name: s["stored_bytes_per_sample"] for name, s in summary["students"].items()}
    assert stored["kd"] > 0 and stored["nokd"] == 0
    assert abs(stored["classroom"] - 2 * stored["kd"]) <= 2     # two stores of one layout (attrs differ a little)
    assert "accuracy_b_mean" in summary["students"]["dual"]
    assert [c["verdict"] for c in summary["claims"]] and all(c["verdict"] for c in summary["claims"])
    assert sorted(p.name for p in (repo / "reports" / "figures").iterdir()) == \
        ["bytes.png", "curves.png", "mentors_classroom.png", "methods.png"]
    assert (repo / "models" / "students" / "dual" / "seed1_b.pt").is_file()
    assert json.loads((repo / "logs" / "students" / "kd.json").read_text())["seconds"] > 0

    shown = run_dvc(repo, "metrics", "show")
    assert shown.returncode == 0, shown.stderr
    header, *rows = [line.split() for line in shown.stdout.strip().splitlines()]
    assert header == ["Path", "accuracy", "accuracy_std", "mse_to_bayes", "nll"]     # one narrow table
    paths = {row[0] for row in rows}
    assert paths == {f"metrics/teachers/{n}.json" for n in summary["teachers"]} | \
        {f"metrics/students/{n}.json" for n in summary["students"]}

    lock = (repo / "dvc.lock").read_text()
    again = run_dvc(repo, "repro")
    assert again.returncode == 0 and "Data and pipelines are up to date." in again.stdout, again.stdout
    assert (repo / "dvc.lock").read_text() == lock
    forced = run_dvc(repo, "repro", "--force", "--single-item", "teacher@ce", "cache@ce", "student@kd")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert (repo / "dvc.lock").read_text() == lock              # the same inputs wrote the same bytes


@pytest.mark.parametrize("params_file", sorted(str(p.relative_to(REPO)) for p in
                                               [REPO / "params.yaml", *REPO.glob("experiments/*/params.yaml")]))
def test_every_student_of_a_params_set_sees_the_views_its_teachers_saw(params_file: str) -> None:
    # a student without a cache (nokd, dml) gets no views from one: it must ask for the cache's count,
    # or its baseline trains on unaugmented images while the distilled students train on the views
    # (one of the stores' counts, where the stores differ in views)
    params = yaml.safe_load((REPO / params_file).read_text())
    views = {entry.get("views", params["cache"]["views"]) for entry in params["caches"].values()}
    defaults = params.get("student_defaults", {})
    for name, entry in params["students"].items():
        entry = {**defaults, **entry}
        if not entry.get("mentors"):
            assert entry.get("views", 1) in views, (params_file, name)


def test_a_checkout_in_another_folder_writes_the_same_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # stores record their manifest and teacher relative to themselves: a fresh clone elsewhere
    # reproduces the store byte for byte (and dvc.lock stays as committed)
    first = tmp_path / "a" / "repo"
    first.mkdir(parents=True)
    monkeypatch.chdir(first)
    build_manifest("synthetic", "data/synthetic", "data_manifests/m.parquet", seed=0, num_samples=600)
    train_teacher(TeacherConfig(manifest="data_manifests/m.parquet", arch="mlp", epochs=1, out="models/t.pt",
                                progress=False))
    second = tmp_path / "elsewhere" / "clone"
    shutil.copytree(first, second)
    stores = []
    for repo in (first, second):
        monkeypatch.chdir(repo)
        cache_teacher(CacheConfig(teacher="models/t.pt", manifest="data_manifests/m.parquet", out="caches/t.zarr",
                                  progress=False))
        stores.append({str(p.relative_to(repo)): p.read_bytes() for p in sorted((repo / "caches").rglob("*"))
                       if p.is_file()})
    assert stores[0] == stores[1] and any(name.endswith("zarr.json") for name in stores[0])
    result = CliRunner().invoke(cli, ["inspect", "caches/t.zarr", "--samples", "s.parquet"])   # finds the manifest
    assert result.exit_code == 0 and "not found" not in result.output, result.output
