"""Distillation: cached vs live teachers, two students, classroom logs, resume, clear errors, CLI.

    .venv/bin/pytest tests/test_distill.py -q

Tiny data: a synthetic manifest (150 train rows, K = 3, d = 30) with random confident MLP
teachers, and a 30-image CIFAR-10 folder with random CNN teachers (for views that differ).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cache import CacheConfig, cache_teacher
from pipeline.checkpoint import load_checkpoint
from pipeline.cli import cli
from pipeline.data import build_manifest
from pipeline.errors import UserError
from pipeline.models import load_model
from pipeline.train import DistillConfig, TeacherConfig, distill, evaluate_checkpoint, student_paths, train_teacher
from tests.support.distill import cache, untrained_teacher
from tests.support.stores import synthetic_checkpoint


@pytest.fixture(scope="module")
def syn(synthetic_teacher, tmp_path_factory):
    """Synthetic manifest, two teachers (CE-style random MLPs) and their 2-view caches."""
    root = tmp_path_factory.mktemp("syn")
    manifest, teacher = synthetic_teacher
    peer = synthetic_checkpoint(manifest, root / "peer.pt", torch_seed=1, scale=2.0)
    return {"root": root, "manifest": str(manifest), "teacher": str(teacher), "peer": str(peer),
            "store": str(cache(teacher, manifest, root / "teacher.zarr")),
            "peer_store": str(cache(peer, manifest, root / "peer.zarr"))}


@pytest.fixture(scope="module")
def images(cifar10_root, tmp_path_factory):
    """27 train / 3 val / 8 test CIFAR-10 images, a random CNN teacher and its 2-view cache."""
    root = tmp_path_factory.mktemp("img")
    manifest = build_manifest("cifar10", cifar10_root, root / "c10.parquet", seed=0)
    teacher = untrained_teacher(manifest.path, root / "cnn.pt", arch="cnn", scale=8.0)
    return {"root": root, "manifest": str(manifest.path), "teacher": str(teacher),
            "store": str(cache(teacher, manifest.path, root / "cnn.zarr", rows_per_block=16))}


def _cfg(data: dict, out: Path, **kw) -> DistillConfig:
    base = dict(manifest=data["manifest"], method="kd", student="mlp", out=str(out), mentors=(data["store"],),
                epochs=1, batch_size=16, lr=0.05, device="cpu", progress=False)
    return DistillConfig(**{**base, **kw})


def _run(cfg: DistillConfig) -> tuple[dict, list[float], list[np.ndarray]]:
    losses, rows = [], []

    def on_step(batch, out) -> None:
        losses.append(float(out["loss"].detach()))
        rows.append(batch.rows.copy())

    return distill(cfg, on_step=on_step), losses, rows


def _online(cfg: DistillConfig, teachers: list[str]) -> DistillConfig:
    return replace(cfg, mentors=(), online=True, teachers=tuple(teachers), views=2, out=cfg.out + ".online.pt")


# --- cached targets == live targets ----------------------------------------------------------------


@pytest.mark.parametrize("data_name, student, epochs, method", [("syn", "mlp", 1, "kd"), ("images", "cnn", 2, "uncertainty")])
def test_offline_equals_online_on_the_same_seed_and_views(request, tmp_path, data_name, student, epochs, method):
    """Per-step losses within 1e-2 relative (float16 cache vs float32 live logits), final weights close.
    On images, epoch 1 replays the random view 1: the student must see the pixels the teacher saw."""
    data = request.getfixturevalue(data_name)
    cfg = _cfg(data, tmp_path / "off.pt", student=student, epochs=epochs, method=method,
               batch_size=8 if data_name == "images" else 16)
    _, off_losses, off_rows = _run(cfg)
    _, on_losses, on_rows = _run(_online(cfg, [data["teacher"]]))
    assert len(off_losses) == len(on_losses) > 0
    assert all(np.array_equal(a, b) for a, b in zip(off_rows, on_rows))  # same batches
    np.testing.assert_allclose(off_losses, on_losses, rtol=1e-2)
    a, b = load_checkpoint(cfg.out)["model"], load_checkpoint(cfg.out + ".online.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-2, atol=2e-3)
    # a view that is not the one cached changes the targets: the check above is not vacuous
    if data_name == "images":
        from pipeline.store.reader import StoreGroup

        with StoreGroup([data["store"]]) as room:
            t0, t1 = room.targets(0, np.arange(8))["logits"], room.targets(1, np.arange(8))["logits"]
        assert not torch.allclose(t0, t1, atol=1e-2)


def test_checkpoint_meta_and_evaluate_on_a_student(syn, tmp_path):
    cfg = _cfg(syn, tmp_path / "kd.pt", epochs=2, metrics=str(tmp_path / "kd.json"), options={"T": 2})
    metrics = distill(cfg)
    meta = load_checkpoint(cfg.out)["meta"]
    assert meta["arch"] == "mlp" and meta["num_classes"] == 3 and meta["input_shape"] == (30,)
    assert meta["method"] == "kd" and meta["options"] == {"T": 2.0, "w_ce": 0.5, "w_kd": 0.5}
    store = meta["mentors"][0]
    assert store["store"] == syn["store"] and store["name"] == "teacher" and len(store["checkpoint_sha256"]) == 64
    assert meta["manifest_sha256"] == load_checkpoint(syn["teacher"])["meta"]["manifest_sha256"]
    assert meta["views"]["kind"] == "identity" and meta["num_views"] == 2 and meta["train_split"] == "train"
    assert meta["metrics"] == metrics == json.loads((tmp_path / "kd.json").read_text())
    assert {"train_loss", "train_ce", "train_kd", "train_top1", "val_top1", "val_bayes_mse"} <= set(metrics)
    assert len((tmp_path / "kd.csv").read_text().splitlines()) == 1 + 2
    scores = evaluate_checkpoint(cfg.out, syn["manifest"], "test", device="cpu")
    assert scores["manifest_match"] and 0 < scores["top1"] <= 1
    result = CliRunner().invoke(cli, ["evaluate", cfg.out, "--manifest", syn["manifest"], "--device", "cpu"])
    assert result.exit_code == 0 and "top1" in result.output
    assert "loss" not in meta          # a teacher's training loss (ce | mse); a student has its method


def test_a_student_checkpoint_with_the_older_loss_field_still_evaluates_and_resumes(syn, tmp_path):
    cfg = _cfg(syn, tmp_path / "kd.pt", epochs=1)
    distill(cfg)
    blob = torch.load(cfg.out, weights_only=True)
    blob["meta"]["loss"] = blob["meta"]["method"]      # the layout students were once written with
    old = tmp_path / "old.pt"
    torch.save(blob, old)
    assert evaluate_checkpoint(str(old), syn["manifest"], "test", device="cpu")["manifest_match"]
    resumed = distill(replace(cfg, epochs=1, resume=str(old), out=str(tmp_path / "resumed.pt")))
    assert resumed["epoch"] == 1


# --- two students, classroom ----------------------------------------------------------------------


def test_dual_trains_two_archs_with_separate_optimizers(images, tmp_path):
    cfg = _cfg(images, tmp_path / "dual.pt", method="dual", student="cnn", student_b="resnet8", epochs=2, batch_size=8)
    metrics = distill(cfg)
    a_path, b_path = student_paths(cfg.out, 2)
    assert b_path == tmp_path / "dual_b.pt"
    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    assert (a["meta"]["arch"], b["meta"]["arch"]) == ("cnn", "resnet8") and b["train_state"] is None
    optimizers = a["train_state"]["optimizers"]
    sizes = [sum(len(g["params"]) for g in opt["param_groups"]) for opt in optimizers]
    assert len(optimizers) == 2 and sizes == [len(list(a["model"])) - _buffers(a), len(list(b["model"])) - _buffers(b)]
    assert {"train_top1_0", "train_top1_1", "val_top1_0", "val_top1_1", "train_loss_a", "train_loss_b"} <= set(metrics)
    for path in (a_path, b_path):
        assert evaluate_checkpoint(path, images["manifest"], "test", device="cpu")["n"] == 8


def _buffers(blob: dict) -> int:
    """BatchNorm buffers in a state_dict (not parameters, so not in the optimizer)."""
    return sum(1 for k in blob["model"] if k.endswith(("running_mean", "running_var", "num_batches_tracked")))


def test_classroom_writes_the_mentor_csv(syn, tmp_path):
    cfg = _cfg(syn, tmp_path / "room.pt", method="classroom", mentors=(syn["store"], syn["peer_store"]), epochs=3,
               options={"tau": 4.0})
    distill(cfg)
    lines = (tmp_path / "room_mentors.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert {"epoch", "mentor", "name", "rank", "active", "temperature"} <= set(header) and len(lines) == 1 + 3 * 2
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    assert [(int(r["epoch"]), int(r["mentor"]), r["name"]) for r in rows[:2]] == [(1, 0, "teacher"), (1, 1, "peer")]
    for r in rows:
        assert 0 <= float(r["active"]) <= 1 and float(r["temperature"]) >= 1 and float(r["rank"]) > 0


# --- resume --------------------------------------------------------------------------------------


def test_dml_resume_restores_both_students(syn, tmp_path, monkeypatch):
    full = _cfg(syn, tmp_path / "full.pt", method="dml", student_b="mlp", mentors=(), epochs=3)
    distill(full)
    import pipeline.checkpoint as ckpt

    real_save = ckpt.save_checkpoint

    def save_then_die(path, **kw):
        real_save(path, **kw)
        if kw["meta"]["epoch"] == 1 and kw.get("train_state") is not None:
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
    part = replace(full, out=str(tmp_path / "part.pt"))
    with pytest.raises(KeyboardInterrupt):
        distill(part)
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    distill(replace(part, resume=part.out))
    for a, b in zip(student_paths(full.out, 2), student_paths(part.out, 2)):
        for key, value in load_checkpoint(a)["model"].items():
            assert torch.equal(value, load_checkpoint(b)["model"][key]), (a, key)
    with pytest.raises(UserError, match="setting 'lr' differs"):
        distill(replace(part, lr=0.2, resume=part.out))


def _cli_args(data: dict, out: Path, *extra: str) -> list[str]:
    return ["distill", "--method", "kd", "--mentors", data["store"], "--manifest", data["manifest"], "--student", "mlp",
            "--out", str(out), "--batch-size", "4", "--lr", "0.05", "--device", "cpu", "--no-progress", *extra]


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(syn, tmp_path):
    epochs = ["--epochs", "6", "--metrics"]
    killed = tmp_path / "killed.pt"
    # SIGKILL right after epoch 1's checkpoint: a hard crash at a known point, however loaded the machine is.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KDCACHE_FAULT": "epoch:1"}
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", *_cli_args(syn, killed, *epochs, str(tmp_path / "k.json"))],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()[-2000:]
    assert load_checkpoint(killed)["meta"]["epoch"] == 1 and not (tmp_path / "k.json").exists()
    torch.set_num_threads(1)  # as the killed process, so both halves compute alike
    runner = CliRunner()
    resumed = runner.invoke(cli, _cli_args(syn, killed, *epochs, str(tmp_path / "k.json"), "--resume", str(killed)))
    assert resumed.exit_code == 0, resumed.output
    full = runner.invoke(cli, _cli_args(syn, tmp_path / "full.pt", *epochs, str(tmp_path / "f.json")))
    assert full.exit_code == 0, full.output
    a, b = (json.loads((tmp_path / name).read_text()) for name in ("k.json", "f.json"))
    assert a == b and a["epoch"] == 6
    for key, value in load_checkpoint(tmp_path / "full.pt")["model"].items():
        assert torch.equal(value, load_checkpoint(killed)["model"][key]), key


# --- configuration and clear errors ------------------------------------------------------------------


def test_config_from_params_section_and_errors_name_the_key(syn):
    section = {"manifest": syn["manifest"], "method": "classroom", "student": "mlp", "out": "x.pt",
               "mentors": [syn["store"], syn["peer_store"]], "options": {"tau": 4, "round_ranks": 2}}
    cfg = DistillConfig.from_dict(section)
    assert cfg.mentors == (syn["store"], syn["peer_store"]) and cfg.options["round_ranks"] == 2
    with pytest.raises(UserError, match="unknown key 'lr_max'"):
        DistillConfig.from_dict({**section, "lr_max": 1})
    with pytest.raises(UserError, match="unknown option 'tua'"):
        DistillConfig.from_dict({**section, "options": {"tua": 4}})
    with pytest.raises(UserError, match="'student_b'"):
        DistillConfig.from_dict({**section, "method": "dml", "options": {}})
    with pytest.raises(UserError, match="'epochs'"):
        DistillConfig.from_dict({**section, "epochs": 0})
    with pytest.raises(UserError, match="'teachers'"):
        DistillConfig.from_dict({**section, "teachers": [syn["teacher"]]})


@pytest.fixture(scope="module")
def wrong(syn, tmp_path_factory):
    """Stores that do not fit ``syn``: another manifest, another class count, an incomplete cache."""
    root = tmp_path_factory.mktemp("wrong")
    other = build_manifest("synthetic", root / "d1", root / "other.parquet", seed=1, num_samples=3000)
    four = build_manifest("synthetic", root / "d4", root / "four.parquet", seed=0, num_samples=3000, num_classes=4)
    four_teacher = untrained_teacher(four.path, root / "four.pt")
    cache_teacher(CacheConfig(teacher=syn["teacher"], manifest=syn["manifest"], split="train", views=2,
                              out=root / "half.zarr", rows_per_block=64, shard="0/2", progress=False, device="cpu"))
    return {"other": str(cache(untrained_teacher(other.path, root / "o.pt"), other.path, root / "other.zarr")),
            "four": str(cache(four_teacher, four.path, root / "four.zarr")), "four_teacher": str(four_teacher),
            "half": str(root / "half.zarr")}


@pytest.mark.parametrize("case, expected", [
    ("other_manifest", "field manifest.sha256"),
    ("mentors_disagree", "field manifest.sha256"),
    ("class_count", "field manifest.num_classes"),
    ("one_mentor", "needs at least 2 mentor"),
    ("incomplete", "field status.complete"),
    ("student_classes", "field num_classes"),
    ("online_teacher_classes", "field num_classes"),
    ("bad_option", "--option: expected KEY=VALUE"),
    ("no_student_b", "'student_b'"),
])
def test_cli_errors_are_one_line_exit_2(syn, wrong, tmp_path, case, expected):
    base = ["distill", "--manifest", syn["manifest"], "--student", "mlp", "--out", str(tmp_path / "s.pt"),
            "--epochs", "1", "--device", "cpu", "--no-progress"]
    extra = {
        "other_manifest": ["--method", "kd", "--mentors", wrong["other"]],
        "mentors_disagree": ["--method", "aver", "--mentors", syn["store"], wrong["other"]],
        "class_count": ["--method", "kd", "--mentors", wrong["four"]],
        "one_mentor": ["--method", "ca-wkd", "--mentors", syn["store"]],
        "incomplete": ["--method", "kd", "--mentors", wrong["half"]],
        "student_classes": ["--method", "kd", "--mentors", syn["store"], "--init", wrong["four_teacher"]],
        "online_teacher_classes": ["--method", "kd", "--online", "--teachers", wrong["four_teacher"]],
        "bad_option": ["--method", "kd", "--mentors", syn["store"], "--option", "T4"],
        "no_student_b": ["--method", "dual", "--mentors", syn["store"]],
    }[case]
    result = CliRunner().invoke(cli, base + extra)
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert "Traceback" not in result.output and not (tmp_path / "s.pt").exists()


def test_cli_distill_with_greedy_mentors_and_options(syn, tmp_path):
    out = tmp_path / "room.pt"
    result = CliRunner().invoke(cli, ["distill", "--method", "classroom", "--mentors", syn["store"], syn["peer_store"],
                                      "--manifest", syn["manifest"], "--student", "mlp", "--out", str(out),
                                      "--option", "tau=4", "--option", "round_ranks=~", "--epochs", "1",
                                      "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {out} (1 epochs)")
    meta = load_checkpoint(out)["meta"]
    assert len(meta["mentors"]) == 2 and meta["options"]["tau"] == 4.0 and meta["options"]["round_ranks"] is None
    help_text = CliRunner().invoke(cli, ["distill", "--help"]).output
    for example in ("--method kd", "--method ca-wkd", "--method classroom", "--student-b", "--online", "--resume"):
        assert example in help_text


# --- student size options ---------------------------------------------------------------------------


def _widths(path) -> list[tuple[int, int]]:
    model, _ = load_model(path)
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]


def test_cli_student_options_reach_the_checkpoint_and_evaluate(syn, tmp_path):
    out = tmp_path / "small.pt"
    result = CliRunner().invoke(cli, ["distill", "--method", "kd", "--mentors", syn["store"], "--manifest",
                                      syn["manifest"], "--student", "mlp", "--student-option", "hidden=32",
                                      "--student-option", "depth=1", "--out", str(out), "--epochs", "1",
                                      "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    meta = load_checkpoint(out)["meta"]
    assert meta["arch_options"] == {"hidden": 32, "depth": 1} and meta["config"]["student_options"] == meta["arch_options"]
    assert _widths(out) == [(30, 32), (32, 3)]
    result = CliRunner().invoke(cli, ["evaluate", str(out), "--manifest", syn["manifest"], "--device", "cpu"])
    assert result.exit_code == 0 and "top1" in result.output, result.output
    help_text = CliRunner().invoke(cli, ["distill", "--help"]).output
    assert "--student-option hidden=32" in help_text and "--student-b-option" in help_text


def test_two_students_each_with_their_own_options(syn, tmp_path):
    cfg = _cfg(syn, tmp_path / "dual.pt", method="dual", student_b="mlp", student_options={"hidden": 16},
               student_b_options={"depth": 1})
    distill(cfg)
    a, b = student_paths(cfg.out, 2)
    assert load_checkpoint(a)["meta"]["arch_options"] == {"hidden": 16}
    assert load_checkpoint(b)["meta"]["arch_options"] == {"depth": 1}
    assert _widths(a) == [(30, 16), (16, 16), (16, 3)] and _widths(b) == [(30, 128), (128, 3)]
    for path in (a, b):
        assert 0 < evaluate_checkpoint(path, syn["manifest"], "test", device="cpu")["top1"] <= 1
    # resume keys: another size for either student is another run
    with pytest.raises(UserError, match="setting 'student_b_options' differs: checkpoint has {'depth': 1}, this run {}"):
        distill(replace(cfg, student_b_options={}, resume=cfg.out))


def test_online_teacher_with_arch_options_and_a_sized_student(syn, tmp_path):
    teacher = TeacherConfig(manifest=syn["manifest"], arch="mlp", arch_options={"hidden": 24, "depth": 3},
                            out=str(tmp_path / "t24.pt"), epochs=1, batch_size=32, device="cpu", progress=False)
    train_teacher(teacher)
    store = cache(teacher.out, syn["manifest"], tmp_path / "t24.zarr")
    cfg = _cfg(syn, tmp_path / "off.pt", mentors=(str(store),), student_options={"hidden": 8})
    _, off_losses, _ = _run(cfg)
    _, on_losses, _ = _run(_online(cfg, [teacher.out]))  # the live teacher is rebuilt from its meta
    np.testing.assert_allclose(off_losses, on_losses, rtol=1e-2)
    assert load_checkpoint(cfg.out + ".online.pt")["meta"]["mentors"][0]["arch"] == "mlp"
    assert _widths(cfg.out) == [(30, 8), (8, 8), (8, 3)]


def test_student_option_mistakes_name_the_key(syn, tmp_path):
    with pytest.raises(UserError, match="distill config key 'student_options': model 'mlp': unknown option 'width'; "
                                        "expected one of: depth, hidden"):
        _cfg(syn, tmp_path / "s.pt", student_options={"width": 8})
    with pytest.raises(UserError, match="'student_b_options': expected none without student_b"):
        _cfg(syn, tmp_path / "s.pt", student_b_options={"hidden": 8})
    with pytest.raises(UserError, match=r"^params.yaml: students.room.student_b_options: model 'resnet8': "
                                        r"unknown option 'width'; it takes no options$"):
        DistillConfig.from_dict({"method": "dual", "mentors": [syn["store"]], "manifest": syn["manifest"],
                                 "student": "mlp", "student_b": "resnet8", "student_b_options": {"width": 8},
                                 "out": "s.pt"}, source="params.yaml", prefix="students.room")
    base = ["distill", "--method", "dual", "--mentors", syn["store"], "--manifest", syn["manifest"], "--student", "mlp",
            "--student-b", "mlp", "--out", str(tmp_path / "s.pt"), "--device", "cpu", "--no-progress"]
    for extra, expected in [(["--student-b-option", "hidden=0"], "model 'mlp': option 'hidden': expected an integer >= 1"),
                            (["--student-option", "depth"], "--student-option: expected KEY=VALUE, found 'depth'")]:
        result = CliRunner().invoke(cli, base + extra)
        assert result.exit_code == 2, (result.output, result.exception)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not (tmp_path / "s.pt").exists()
