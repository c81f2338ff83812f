"""The generic loop, teacher training, resume, evaluation and their CLI (fast, tiny data).

    .venv/bin/pytest tests/test_train.py -q
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from pipeline.cache import CacheConfig, cache_teacher
from pipeline.checkpoint import load_checkpoint
from pipeline.cli import cli
from pipeline.data import build_manifest, default_views, open_split
from pipeline.errors import UserError
from pipeline.manifest import load_manifest
from pipeline.methods.teacher_losses import ce_teacher_loss, mse_teacher_loss
from pipeline.models import load_model
from pipeline.runtime import Runtime
from pipeline.store.reader import StoreGroup
from pipeline.train import TeacherConfig, evaluate_checkpoint, train_teacher
from pipeline.train.loop import LoopState, cosine_schedule, fit, restore_train_state, sgd
from pipeline.train.sampling import shuffled_batches

CPU = Runtime(torch.device("cpu"))


def _config(manifest: str, out, **kw) -> TeacherConfig:
    base = dict(manifest=manifest, arch="mlp", out=str(out), epochs=4, batch_size=32, lr=0.1, weight_decay=5e-3,
                progress=False, device="cpu")
    return TeacherConfig(**{**base, **kw})


# --- teacher losses ------------------------------------------------------------------


def test_teacher_losses_known_values() -> None:
    z = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    y = torch.tensor([0, 0])
    assert float(ce_teacher_loss(z, y)) == pytest.approx((np.log(2) + np.log1p(np.exp(-20.0))) / 2)
    # sample 1: p = (.5, .5) -> squared errors .25 + .25; sample 2: ~0; mean over B*C = 0.5 / 4
    assert float(mse_teacher_loss(z, y)) == pytest.approx(0.125, abs=1e-6)


# --- the generic loop ------------------------------------------------------------------


def _tensor_data(n: int = 96, d: int = 6, c: int = 3, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(c, d, generator=g) * 3
    y = torch.randint(0, c, (n,), generator=g)
    return torch.utils.data.TensorDataset(means[y] + torch.randn(n, d, generator=g), y)


def test_shuffled_batches_cover_every_row_once_per_epoch() -> None:
    batches = list(shuffled_batches(10, batch_size=4, seed=1, epoch=0))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(np.concatenate(batches).tolist()) == list(range(10))
    again = shuffled_batches(10, batch_size=4, seed=1, epoch=0)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    assert not np.array_equal(np.concatenate(batches), np.concatenate(list(shuffled_batches(10, batch_size=4, seed=1, epoch=1))))
    ranks = [list(shuffled_batches(11, batch_size=2, seed=0, epoch=0, rank=r, world_size=3)) for r in range(3)]
    assert {len(r) for r in ranks} == {2}
    rows = np.concatenate([np.concatenate(r) for r in ranks])
    assert len(rows) == len(set(rows.tolist())) == 9  # disjoint; 11 mod 3 = 2 trailing rows left out


def test_cosine_schedule_goes_from_lr_to_zero() -> None:
    opt = sgd([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    sched = cosine_schedule(opt, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.2) and lrs[5] == pytest.approx(0.1) and opt.param_groups[0]["lr"] == pytest.approx(0)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_fit_two_students_two_optimizers_logs_every_part() -> None:
    data = _tensor_data()
    torch.manual_seed(0)
    models = [torch.nn.Linear(6, 3), torch.nn.Sequential(torch.nn.Linear(6, 3))]
    opts = [sgd(m.parameters(), lr=0.05) for m in models]

    def step(ms, batch):
        za, zb = ms[0](batch.x), ms[1](batch.x)
        la, lb = F.cross_entropy(za, batch.y), F.cross_entropy(zb, batch.y)
        return {"loss": la + lb, "ce_a": la, "ce_b": lb, "logits": [za, zb], "rank": torch.tensor([1.0, 3.0])}

    seen_epochs = []
    state = fit(models, opts, step=step, dataset=data, epochs=5, runtime=CPU,
                batch_sampler=lambda e: shuffled_batches(len(data), batch_size=16, seed=0, epoch=e),
                on_epoch_start=seen_epochs.append, on_epoch_end=lambda e, row: {"extra": e}, progress=False)
    assert seen_epochs == [0, 1, 2, 3, 4] and state.epoch == 5 and state.step == 30
    first, last = state.history[0], state.history[-1]
    assert {"train_loss", "train_ce_a", "train_ce_b", "train_top1_0", "train_top1_1", "train_rank_0",
            "train_rank_1", "extra", "lr"} <= set(last)
    assert "time_s" not in last and len(state.seconds) == 5     # wall times stay out of the history
    assert last["train_loss"] == pytest.approx(last["train_ce_a"] + last["train_ce_b"], rel=1e-5)
    assert last["train_rank_1"] == pytest.approx(3.0)
    assert last["train_loss"] < first["train_loss"] and last["train_top1_0"] > 0.8


def _dropout_run(data, epochs: int, *, stop_after: int | None = None, resume: dict | None = None):
    """Train an MLP with dropout (so RNG state matters); optionally stop after an epoch or resume."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))
    opt = sgd(model.parameters(), lr=0.1)
    sched = cosine_schedule(opt, total_steps=epochs * len(shuffled_batches(len(data), batch_size=20, seed=5, epoch=0)))
    start = None
    if resume is not None:
        model.load_state_dict(resume["model"])
        start = restore_train_state(resume["train_state"], [opt], [sched])
    saved: dict = {}

    def on_checkpoint(state: LoopState, train_state: dict) -> None:
        saved.update(model={k: v.clone() for k, v in model.state_dict().items()}, train_state=train_state)
        if state.epoch == stop_after:
            raise KeyboardInterrupt

    def step(ms, batch):
        return {"loss": F.cross_entropy(ms[0](batch.x), batch.y)}

    try:
        fit([model], [opt], step=step, dataset=data, epochs=epochs, runtime=CPU, schedulers=[sched], start=start,
            batch_sampler=lambda e: shuffled_batches(len(data), batch_size=20, seed=5, epoch=e),
            on_checkpoint=on_checkpoint, progress=False)
    except KeyboardInterrupt:
        pass
    return model, saved


def test_fit_resume_ends_with_the_uninterrupted_weights() -> None:
    data = _tensor_data()
    full, _ = _dropout_run(data, 5)
    _, saved = _dropout_run(data, 5, stop_after=2)
    torch.manual_seed(123)  # the resumed process starts from another RNG state
    resumed, _ = _dropout_run(data, 5, resume=saved)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


# --- teachers -------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_train_teacher_on_tiny_synthetic(synthetic, tmp_path, loss: str) -> None:
    cfg = _config(synthetic, tmp_path / f"{loss}.pt", loss=loss, epochs=8, metrics=str(tmp_path / "m.json"))
    metrics = train_teacher(cfg)
    assert metrics["epoch"] == 8 and metrics["val_top1"] > 0.6
    other = "mse" if loss == "ce" else "ce"
    assert {"train_loss", f"train_{other}", "train_top1", "val_ce", "val_bayes_mse", "val_bayes_top1"} <= set(metrics)
    assert json.loads((tmp_path / "m.json").read_text()) == metrics
    assert len((tmp_path / "m.csv").read_text().splitlines()) == 1 + 8
    blob = load_checkpoint(cfg.out)
    meta = blob["meta"]
    assert meta["loss"] == loss and meta["arch"] == "mlp" and meta["num_classes"] == 3 and meta["input_shape"] == (30,)
    assert meta["views"]["kind"] == "identity" and meta["dataset"] == "synthetic" and meta["epoch"] == 8
    assert len(meta["manifest_sha256"]) == 64 and blob["train_state"]["epoch"] == 8
    scores = evaluate_checkpoint(cfg.out, synthetic, "test", device="cpu")
    assert scores["n"] == 3600 and scores["manifest_match"]
    assert 0.6 < scores["top1"] <= 1 and 0.6 < scores["bayes_top1"] < 1
    assert scores["bayes_mse"] > 0 and scores["bayes_ce"] > 0 and "top5" not in scores


def test_train_teacher_resume_equals_uninterrupted(synthetic, tmp_path, monkeypatch) -> None:
    full = _config(synthetic, tmp_path / "full.pt", epochs=4)
    train_teacher(full)

    import pipeline.checkpoint as ckpt

    real_save = ckpt.save_checkpoint

    def save_then_die(path, **kw):
        real_save(path, **kw)
        if kw["meta"]["epoch"] == 2:
            raise KeyboardInterrupt  # killed right after epoch 2's checkpoint

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
    part = replace(full, out=str(tmp_path / "part.pt"))
    with pytest.raises(KeyboardInterrupt):
        train_teacher(part)
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    assert load_checkpoint(part.out)["meta"]["epoch"] == 2
    train_teacher(replace(part, resume=part.out))
    a, b = load_checkpoint(full.out), load_checkpoint(part.out)
    assert b["meta"]["epoch"] == 4 and len(b["meta"]["history"]) == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    with pytest.raises(UserError, match="setting 'lr' differs"):
        train_teacher(replace(part, lr=0.2, resume=part.out))


def test_teacher_on_tiny_images_with_workers(cifar10_root, tmp_path) -> None:
    manifest = build_manifest("cifar10", cifar10_root, tmp_path / "c10.parquet", seed=0)
    cfg = _config(str(manifest.path), tmp_path / "cnn.pt", arch="cnn", epochs=2, batch_size=8, workers=1)
    metrics = train_teacher(cfg)
    assert metrics["epoch"] == 2 and "train_top5" in metrics and "val_top5" in metrics
    meta = load_checkpoint(cfg.out)["meta"]
    assert meta["input_shape"] == (3, 32, 32) and meta["views"]["kind"] == "pad_crop_flip"
    scores = evaluate_checkpoint(cfg.out, manifest, "test", device="cpu")
    assert scores["n"] == 8 and "bayes_mse" not in scores


def test_config_errors_name_the_key(synthetic) -> None:
    with pytest.raises(UserError, match="'loss'"):
        _config(synthetic, "x.pt", loss="hinge")
    with pytest.raises(UserError, match="'epochs'"):
        _config(synthetic, "x.pt", epochs=0)
    with pytest.raises(UserError, match="unknown key 'lr_max'"):
        TeacherConfig.from_dict({"manifest": synthetic, "arch": "mlp", "out": "x.pt", "lr_max": 1})


def test_evaluate_refuses_another_class_count_and_warns_on_another_manifest(synthetic, tmp_path) -> None:
    cfg = _config(synthetic, tmp_path / "t.pt", epochs=1)
    train_teacher(cfg)
    four = build_manifest("synthetic", tmp_path / "d4", tmp_path / "k4.parquet", seed=0, num_samples=400, num_classes=4)
    with pytest.raises(UserError, match="num_classes"):
        evaluate_checkpoint(cfg.out, four, "test", device="cpu")
    other = build_manifest("synthetic", tmp_path / "d1", tmp_path / "s1.parquet", seed=1, num_samples=400)
    with pytest.warns(UserWarning, match="manifest_sha256"):
        assert not evaluate_checkpoint(cfg.out, other, "test", device="cpu")["manifest_match"]
    with pytest.raises(UserError, match="manifest_sha256"):
        evaluate_checkpoint(cfg.out, other, "test", device="cpu", strict=True)


def test_cli_train_teacher_and_evaluate(synthetic, tmp_path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli.pt"
    result = runner.invoke(cli, ["train-teacher", "--manifest", synthetic, "--arch", "mlp", "--loss", "mse",
                                 "--out", str(out), "--epochs", "2", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and out.exists()
    result = runner.invoke(cli, ["evaluate", str(out), "--manifest", synthetic, "--split", "test",
                                 "--out", str(tmp_path / "e.json"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "top1" in result.output and "bayes_mse" in result.output
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 3600
    result = runner.invoke(cli, ["evaluate", str(tmp_path / "nope.pt"), "--manifest", synthetic])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {tmp_path / 'nope.pt'}: checkpoint not found"]


def test_resuming_a_finished_run_trains_nothing_and_still_writes_out(synthetic, tmp_path) -> None:
    cfg = _config(synthetic, tmp_path / "a.pt", epochs=2)
    first = train_teacher(cfg)
    again = train_teacher(replace(cfg, out=str(tmp_path / "b.pt"), resume=cfg.out, metrics=str(tmp_path / "b.json")))
    assert again == first
    assert (tmp_path / "b.pt").read_bytes() == (tmp_path / "a.pt").read_bytes()
    assert len((tmp_path / "b.csv").read_text().splitlines()) == 3


# --- size options and fine-tuning ------------------------------------------------------


def test_arch_option_checkpoint_evaluates_and_caches_with_its_architecture(synthetic, tmp_path) -> None:
    out = tmp_path / "small.pt"
    result = CliRunner().invoke(cli, ["train-teacher", "--manifest", synthetic, "--arch", "mlp", "--arch-option",
                                      "hidden=16", "--arch-option", "depth=1", "--out", str(out), "--epochs", "1",
                                      "--batch-size", "64", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    meta = load_checkpoint(out)["meta"]
    assert meta["arch_options"] == {"hidden": 16, "depth": 1} and meta["config"]["arch_options"] == meta["arch_options"]
    model, _ = load_model(out)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(30, 16), (16, 3)]
    scores = evaluate_checkpoint(out, synthetic, "test", device="cpu")
    assert scores["n"] == 3600 and 0 < scores["top1"] <= 1
    store = tmp_path / "small.zarr"
    done = cache_teacher(CacheConfig(teacher=str(out), manifest=synthetic, split="train", views=1, out=str(store),
                                     dtype="float32", progress=False, device="cpu"))
    assert done.complete
    manifest = load_manifest(synthetic)
    x, _ = open_split(manifest, "train", views=default_views(manifest), view=0).get_batch(np.arange(200))
    with torch.no_grad():
        want = model(x)
    with StoreGroup([store]) as room:
        got = room.targets(0, np.arange(200))["logits"][0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_checkpoints_without_arch_options_load_with_the_defaults(synthetic, tmp_path) -> None:
    cfg = _config(synthetic, tmp_path / "t.pt", epochs=1)
    train_teacher(cfg)
    blob = load_checkpoint(cfg.out)
    del blob["meta"]["arch_options"], blob["meta"]["config"]["arch_options"]
    old = tmp_path / "old.pt"
    torch.save(blob, old)
    model, meta = load_model(old)
    assert "arch_options" not in meta
    assert [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)] == [128, 128, 3]
    assert evaluate_checkpoint(old, synthetic, "test", device="cpu")["n"] == 3600
    # resuming it (finished: nothing to train) counts the missing options as the defaults
    train_teacher(replace(cfg, out=str(tmp_path / "again.pt"), resume=str(old)))


def test_arch_options_are_a_resume_key(synthetic, tmp_path) -> None:
    cfg = _config(synthetic, tmp_path / "w8.pt", epochs=2, arch_options={"hidden": 8})
    train_teacher(replace(cfg, epochs=1))
    with pytest.raises(UserError, match="setting 'epochs' differs"):
        train_teacher(replace(cfg, resume=cfg.out))
    with pytest.raises(UserError, match="setting 'arch_options' differs: checkpoint has {'hidden': 8}, this run {}"):
        train_teacher(replace(cfg, epochs=1, arch_options={}, resume=cfg.out))


def test_arch_option_mistakes_name_the_key(synthetic, tmp_path) -> None:
    with pytest.raises(UserError, match="teacher config key 'arch_options': model 'mlp': unknown option 'width'; "
                                        "expected one of: depth, hidden"):
        _config(synthetic, "x.pt", arch_options={"width": 16})
    with pytest.raises(UserError, match=r"^params.yaml: teachers.small.arch_options: model 'cnn': option 'width': "
                                        r"expected an integer >= 1, found 0$"):
        TeacherConfig.from_dict({"manifest": synthetic, "arch": "cnn", "out": "x.pt", "arch_options": {"width": 0}},
                                source="params.yaml", prefix="teachers.small")
    with pytest.raises(UserError, match="'arch_options': expected a mapping"):
        TeacherConfig.from_dict({"manifest": synthetic, "arch": "cnn", "out": "x.pt", "arch_options": 16})
    runner = CliRunner()
    base = ["train-teacher", "--manifest", synthetic, "--arch", "resnet8", "--out", str(tmp_path / "x.pt"),
            "--device", "cpu", "--no-progress"]
    for extra, expected in [(["--arch-option", "width=16"], "model 'resnet8': unknown option 'width'; it takes no options"),
                            (["--arch-option", "width"], "--arch-option: expected KEY=VALUE, found 'width'")]:
        result = runner.invoke(cli, base + extra)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not (tmp_path / "x.pt").exists()
    help_text = runner.invoke(cli, ["train-teacher", "--help"]).output
    assert "--arch-option width=16" in help_text and "--weights" in help_text


def test_weights_fine_tunes_from_the_given_checkpoint(synthetic, tmp_path) -> None:
    source = _config(synthetic, tmp_path / "src.pt", epochs=2, arch_options={"hidden": 32}, seed=1)
    train_teacher(source)
    src = load_checkpoint(source.out)["model"]
    # a tiny lr barely moves the weights: the run starts from the source, not from seed 0's initialisation
    tuned = _config(synthetic, tmp_path / "ft.pt", epochs=1, lr=1e-9, arch_options={"hidden": 32}, weights=source.out)
    train_teacher(tuned)
    got = load_checkpoint(tuned.out)
    assert got["meta"]["config"]["weights"] == source.out
    fresh = _config(synthetic, tmp_path / "fresh.pt", epochs=1, lr=1e-9, arch_options={"hidden": 32})
    train_teacher(fresh)
    init = load_checkpoint(fresh.out)["model"]
    for key, value in src.items():
        torch.testing.assert_close(got["model"][key], value, rtol=0, atol=1e-6)
    assert any(not torch.allclose(init[key], value, atol=1e-3) for key, value in src.items())
    # a bare state_dict works too; the first epoch's loss is the source model's loss on the same batches
    bare = tmp_path / "bare.pt"
    torch.save(src, bare)
    again = train_teacher(replace(tuned, out=str(tmp_path / "ft2.pt"), weights=str(bare)))
    first = load_checkpoint(tuned.out)["meta"]["metrics"]
    assert again == first
    model, _ = load_model(source.out)
    manifest = load_manifest(synthetic)
    x, y = open_split(manifest, "train", views=default_views(manifest), view=1).get_batch(np.arange(200))
    with torch.no_grad():
        assert again["train_loss"] == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-5)
    # strict: weights of another size do not fit
    with pytest.raises(UserError, match="src.pt.*shape"):
        train_teacher(_config(synthetic, tmp_path / "bad.pt", epochs=1, weights=source.out))
    assert not (tmp_path / "bad.pt").exists()
    with pytest.raises(UserError, match="not found"):
        train_teacher(_config(synthetic, tmp_path / "bad.pt", epochs=1, weights=str(tmp_path / "nope.pt")))
