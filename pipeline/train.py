"""Teacher training and evaluation; the generic loop lives in ``pipeline.trainer``.

    kdcache train-teacher --manifest data_manifests/synthetic.parquet --arch mlp --loss mse --out models/mse.pt
    kdcache evaluate models/mse.pt --manifest data_manifests/synthetic.parquet --split test

    from pipeline.train import TeacherConfig, train_teacher, evaluate_checkpoint
    metrics = train_teacher(TeacherConfig(manifest="m.parquet", arch="mlp", loss="ce", out="ce.pt"))

Choices (documented here once):
- SGD (momentum 0.9, weight decay on every parameter) with a cosine schedule stepped per
  batch, from ``lr`` to 0 over all epochs.
- Views: epoch ``e`` (0-based) trains on the replayable view ``e + 1`` of the dataset's default
  views (``pipeline.data.views``): fresh augmentation every epoch that can be reproduced exactly;
  validation and ``evaluate`` use view 0, the evaluation transform. The spec is stored in the checkpoint.
- A checkpoint with the train state is written atomically to ``out`` after every epoch, so
  ``resume`` (a checkpoint of the same configuration) continues where it stopped and ends with
  the weights an uninterrupted run ends with (exactly, on CPU). The final file keeps its train state.
- ``metrics`` (JSON: the last epoch's row) and ``history`` (CSV: one row per epoch; default
  ``metrics`` with suffix ``.csv``) are optional; the same figures are in the checkpoint's meta.
- ``evaluate_checkpoint``: a checkpoint whose class count or input shape differs from the
  manifest's is an error; one trained on another manifest (hash) only warns, unless ``strict``.
"""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline.config import FromDict
from pipeline.errors import UserError
from pipeline.files import atomic_path
# The generic loop, re-exported so ``pipeline.train`` is the one entry for teachers and students.
from pipeline.trainer.evaluate import evaluate_model, predict_logits, score_logits
from pipeline.trainer.loop import (Batch, LoopState, StepFn, capture_train_state, cosine_schedule, fit, iter_batches,
                                   restore_train_state, sgd, shuffled_batches, steps_per_epoch)
from pipeline.trainer.runtime import Runtime, seed_everything

__all__ = [
    "TeacherConfig", "train_teacher", "evaluate_checkpoint", "write_json", "write_history",
    "Batch", "LoopState", "StepFn", "Runtime", "fit", "iter_batches", "sgd", "cosine_schedule", "shuffled_batches",
    "steps_per_epoch", "capture_train_state", "restore_train_state", "seed_everything",
    "evaluate_model", "predict_logits", "score_logits",
]

LOSSES = ("ce", "mse")
# Settings that must match for --resume to continue the same run.
RESUME_KEYS = ("arch", "loss", "epochs", "batch_size", "lr", "momentum", "weight_decay", "seed", "views_seed",
               "train_split")


@dataclass(frozen=True)
class TeacherConfig(FromDict):
    """Settings of ``train_teacher`` (also the ``teacher`` section of params.yaml)."""

    section: ClassVar[str] = "teacher"

    manifest: str
    arch: str
    out: str
    loss: str = "ce"
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    views_seed: int = 0
    train_split: str = "train"
    val_split: str | None = "val"  # the default is skipped when the manifest has no such split
    workers: int = 0
    device: str = "auto"
    threads: int | None = None  # torch CPU threads; keep it fixed for bit-identical CPU runs
    eval_batch_size: int = 512
    resume: str | None = None
    metrics: str | None = None
    history: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        from pipeline.models import MODELS

        self.check_training()
        if self.loss not in LOSSES:
            raise self.bad("loss", " or ".join(LOSSES))
        if self.arch not in MODELS:
            raise self.bad("arch", "one of " + ", ".join(MODELS.names()))
        self.check_ints(("threads",), minimum=1, optional=True)
        if not self.train_split:
            raise self.bad("train_split", "a non-empty string")


def write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as indented JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_history(path: str | Path, rows: list[dict]) -> None:
    """One CSV row per epoch (columns: the union of the rows' keys, ``epoch`` first)."""
    columns = ["epoch"] + sorted({k for row in rows for k in row} - {"epoch"})
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _posterior(manifest: Any, split: str) -> np.ndarray | None:
    if manifest.dataset != "synthetic":
        return None
    from pipeline.data.synthetic import bayes_posterior

    return bayes_posterior(manifest, split)


def has_val_split(manifest: Any, split: str | None) -> bool:
    """Whether to validate on ``split``: the default "val" is skipped when the manifest has none;
    any other name that the manifest lacks is a mistake (a typo would silently skip validation)."""
    if not split:
        return False
    try:
        return len(manifest.split(split)) > 0
    except UserError:
        if split == "val":
            return False
        raise


def _check_resume(cfg: TeacherConfig, blob: dict, manifest_sha256: str) -> None:
    meta = blob["meta"]
    if blob.get("train_state") is None:
        raise UserError(f"{cfg.resume}: checkpoint has no train state to resume from")
    if meta.get("manifest_sha256") != manifest_sha256:
        raise UserError(f"{cfg.resume}: field 'manifest_sha256': expected {manifest_sha256} "
                        f"(--manifest {cfg.manifest}), found {meta.get('manifest_sha256')}")
    saved = meta.get("config", {})
    for key in RESUME_KEYS:
        if saved.get(key) != getattr(cfg, key):
            raise UserError(f"{cfg.resume}: setting {key!r} differs: checkpoint has {saved.get(key)!r}, "
                            f"this run {getattr(cfg, key)!r}")


def train_teacher(cfg: TeacherConfig) -> dict:
    """Train a teacher on ``cfg.train_split``; checkpoint each epoch; returns the last epoch's metrics."""
    import torch

    from pipeline import checkpoint as ckpt
    from pipeline.data import default_views, open_split
    from pipeline.manifest import load_manifest
    from pipeline.methods.teacher import TEACHER_LOSSES
    from pipeline.models import create_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    manifest = load_manifest(cfg.manifest)
    views = default_views(manifest, seed=cfg.views_seed)
    train_ds = open_split(manifest, cfg.train_split, views=views, view=1)
    val_ds, val_posterior = None, None
    if has_val_split(manifest, cfg.val_split):
        val_ds = open_split(manifest, cfg.val_split, views=views, view=0)
        val_posterior = _posterior(manifest, cfg.val_split)
    input_shape = tuple(train_ds.input_shape)
    runtime = Runtime.create(cfg.device, images=len(input_shape) == 3)

    seed_everything(cfg.seed)
    model = runtime.prepare(create_model(cfg.arch, num_classes=manifest.num_classes, input_shape=input_shape))
    optimizer = sgd(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    per_epoch = steps_per_epoch(len(train_ds), batch_size=cfg.batch_size, world_size=runtime.world_size)
    scheduler = cosine_schedule(optimizer, total_steps=cfg.epochs * per_epoch)
    start = None
    if cfg.resume:
        blob = ckpt.load_checkpoint(cfg.resume)
        _check_resume(cfg, blob, manifest.sha256)
        model.load_state_dict(blob["model"])
        start = restore_train_state(blob["train_state"], [optimizer], [scheduler])

    loss_fn = TEACHER_LOSSES[cfg.loss]

    def step(models: list[torch.nn.Module], batch: Any) -> dict:
        z = models[0](batch.x).float()
        with torch.no_grad():
            parts = {name: fn(z, batch.y) for name, fn in TEACHER_LOSSES.items() if name != cfg.loss}
        return {"loss": loss_fn(z, batch.y), **parts, "logits": z}

    def on_epoch_start(epoch: int) -> None:
        train_ds.set_view(epoch + 1)

    def on_epoch_end(epoch: int, row: dict) -> dict:
        if val_ds is None:
            return {}
        scores = evaluate_model(model, val_ds, runtime=runtime, batch_size=cfg.eval_batch_size,
                                workers=cfg.workers, posterior=val_posterior)
        return {f"val_{k}": v for k, v in scores.items() if k != "n"}

    meta = {
        "arch": cfg.arch, "num_classes": manifest.num_classes, "input_shape": list(input_shape),
        "loss": cfg.loss, "manifest_sha256": manifest.sha256, "manifest": str(cfg.manifest),
        "dataset": manifest.dataset, "views": views.to_dict(), "seed": cfg.seed,
        "config": ckpt.plain(asdict(cfg)),
    }
    history_path = cfg.history or (str(Path(cfg.metrics).with_suffix(".csv")) if cfg.metrics else None)

    def on_checkpoint(state: Any, train_state: dict) -> None:
        last = ckpt.plain(state.history[-1])
        ckpt.save_checkpoint(cfg.out, model=model,
                             meta={**meta, "epoch": state.epoch, "metrics": last, "history": ckpt.plain(state.history)},
                             train_state=train_state)
        if history_path:
            write_history(history_path, state.history)

    state = fit(
        [model], [optimizer], step=step, dataset=train_ds, epochs=cfg.epochs, runtime=runtime,
        schedulers=[scheduler], workers=cfg.workers, start=start,
        batch_sampler=lambda e: shuffled_batches(len(train_ds), batch_size=cfg.batch_size, seed=cfg.seed, epoch=e,
                                                 rank=runtime.rank, world_size=runtime.world_size),
        on_epoch_start=on_epoch_start, on_epoch_end=on_epoch_end, on_checkpoint=on_checkpoint,
        progress=cfg.progress, desc=f"teacher {cfg.arch}/{cfg.loss}",
    )
    metrics = ckpt.plain(state.history[-1]) if state.history else {}
    if runtime.is_main and start is not None and start.epoch >= cfg.epochs:
        _finished_already(cfg, state.history, history_path)
    if runtime.is_main and cfg.metrics:
        write_json(cfg.metrics, metrics)
    return metrics


def _finished_already(cfg: TeacherConfig, history: list[dict], history_path: str | None) -> None:
    """Resuming a finished run trains nothing: still leave ``out`` and the history in place."""
    assert cfg.resume is not None
    if Path(cfg.out).resolve() != Path(cfg.resume).resolve():
        with atomic_path(cfg.out) as tmp:
            shutil.copyfile(cfg.resume, tmp)
    if history_path:
        write_history(history_path, history)


def evaluate_checkpoint(
    ckpt: str | Path,
    manifest: Any,
    split: str,
    *,
    batch_size: int = 512,
    device: str = "auto",
    workers: int = 0,
    strict: bool = False,
) -> dict:
    """Score a checkpoint on ``split`` of ``manifest`` (a path or a loaded Manifest) with view 0.

    Returns top1 / top5 / ce / n (and on synthetic data bayes_mse / bayes_ce / bayes_agree /
    bayes_top1, see ``pipeline.trainer.evaluate``) plus ``checkpoint``, ``split`` and ``manifest_match``.
    """
    from pipeline.checkpoint import load_model
    from pipeline.data import default_views, open_split
    from pipeline.data.views import ViewSpec
    from pipeline.manifest import load_manifest

    if not isinstance(manifest, (str, Path)):
        man = manifest
    else:
        man = load_manifest(manifest)
    model, meta = load_model(ckpt)
    if int(meta["num_classes"]) != man.num_classes:
        raise UserError(f"{ckpt}: field 'num_classes': manifest {man.path} has {man.num_classes} classes, "
                        f"checkpoint {meta['num_classes']}")
    match = meta.get("manifest_sha256") == man.sha256
    if not match:
        message = (f"{ckpt}: field 'manifest_sha256': trained on {meta.get('manifest_sha256')}, "
                   f"evaluating on {man.path} ({man.sha256})")
        if strict:
            raise UserError(message)
        warnings.warn(message, stacklevel=2)
    views = ViewSpec.from_dict(meta["views"]) if meta.get("views") else default_views(man)
    dataset = open_split(man, split, views=views, view=0)
    if tuple(dataset.input_shape) != tuple(meta["input_shape"]):
        raise UserError(f"{ckpt}: field 'input_shape': checkpoint expects {tuple(meta['input_shape'])}, "
                        f"split {split!r} of {man.path} gives {tuple(dataset.input_shape)}")
    runtime = Runtime.create(device, images=len(dataset.input_shape) == 3)
    model = runtime.prepare(model)
    scores = evaluate_model(model, dataset, runtime=runtime, batch_size=batch_size, workers=workers,
                            posterior=_posterior(man, split))
    return {**scores, "checkpoint": str(ckpt), "split": split, "manifest_match": match}
