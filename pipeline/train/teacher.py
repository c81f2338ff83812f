"""Teacher training, one task on the shared loop: ``train_teacher(TeacherConfig) -> metrics``.

    kdcache train-teacher --manifest data_manifests/synthetic.parquet --arch mlp --loss mse --out models/mse.pt
    kdcache train-teacher ... --arch cnn --arch-option width=16 --out models/cnn16.pt   # a smaller CNN

    from pipeline.train import TeacherConfig, train_teacher
    metrics = train_teacher(TeacherConfig(manifest="m.parquet", arch="mlp", loss="ce", out="ce.pt"))

Choices (documented here once):
- SGD (momentum 0.9, weight decay on every parameter) with a cosine schedule stepped per
  batch, from ``lr`` to 0 over all epochs; the loss is a registered teacher loss (ce, mse).
- Views: epoch ``e`` (0-based) trains on the replayable view ``e + 1`` of the dataset's default
  views (``pipeline.data.views``): fresh augmentation every epoch that can be reproduced exactly;
  validation uses view 0, the evaluation transform. The spec is stored in the checkpoint.
- Batches: ``pipeline.train.sampling.shuffled_batches`` (key: seed, epoch).
- A checkpoint with the train state is written atomically to ``out`` after every epoch, so
  ``resume`` (a checkpoint of the same configuration) continues where it stopped and ends with
  the weights an uninterrupted run ends with (exactly, on CPU). The final file keeps its train state.
- ``arch_options``: the arch's size options (``pipeline.models.model_options``), recorded in the
  checkpoint's meta so evaluate, cache and online teachers rebuild the same network.
- ``weights``: fine-tune, starting from a kdcache checkpoint's or a bare state_dict's weights
  (loaded strictly) instead of a fresh initialisation; the schedule, seed and batches are unchanged.
- ``metrics`` (JSON: the last epoch's row) and ``history`` (CSV: one row per epoch; default
  ``metrics`` with suffix ``.csv``) are optional; the same figures are in the checkpoint's meta.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch

from pipeline import checkpoint as ckpt
from pipeline.config import ConfigError
from pipeline.data import default_views, open_split
from pipeline.errors import UserError
from pipeline.files import atomic_path, write_history
from pipeline.manifest import load_manifest
from pipeline.methods.teacher_losses import TEACHER_LOSSES
from pipeline.models import MODELS, check_model_options, create_model
from pipeline.runtime import Runtime, seed_everything, torch_threads
from pipeline.train.config import TrainConfig
from pipeline.train.evaluate import evaluate_model, has_val_split, posterior
from pipeline.train.loop import LoopState, cosine_schedule, finish_run, fit, restore_train_state, sgd
from pipeline.train.sampling import rank_slices, shuffled_batches


@dataclass(frozen=True, kw_only=True)
class TeacherConfig(TrainConfig):
    """Settings of ``train_teacher`` (also a ``teachers.<name>`` section of params.yaml)."""

    section: ClassVar[str] = "teacher"
    resume_keys: ClassVar[tuple[str, ...]] = ("arch", "arch_options", "loss") + TrainConfig.resume_keys

    arch: str
    arch_options: dict = field(default_factory=dict)  # the arch's size options, e.g. {"width": 16} for cnn
    loss: str = "ce"
    weights: str | None = None  # fine-tune: start from this checkpoint's (or state_dict's) weights
    threads: int | None = None  # torch CPU threads while training; keep it fixed for bit-identical CPU runs

    def input_paths(self) -> dict[str, str]:
        return {**super().input_paths(), **({"--weights": self.weights} if self.weights else {})}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in TEACHER_LOSSES:
            raise self.bad("loss", "one of " + ", ".join(TEACHER_LOSSES.names()))
        if self.arch not in MODELS:
            raise self.bad("arch", "one of " + ", ".join(MODELS.names()))
        if not isinstance(self.arch_options, dict):
            raise self.bad("arch_options", "a mapping of option: value")
        object.__setattr__(self, "arch_options", dict(self.arch_options))
        try:
            check_model_options(self.arch, self.arch_options)
        except UserError as err:
            raise ConfigError(str(err), key="arch_options", section=self.section) from None
        if self.weights is not None and (not isinstance(self.weights, str) or not self.weights):
            raise self.bad("weights", "a checkpoint or state_dict file, or nothing")
        self.check_ints(("threads",), minimum=1, optional=True)
        self.check_strings(("train_split",))


def train_teacher(cfg: TeacherConfig) -> dict:
    """Train a teacher on ``cfg.train_split``; checkpoint each epoch; returns the last epoch's metrics."""
    with torch_threads(cfg.threads):
        return _train(cfg)


def _train(cfg: TeacherConfig) -> dict:
    manifest = load_manifest(cfg.manifest)
    cfg.check_outputs()  # an unwritable --out is said now, not after the first epoch
    view_spec = default_views(manifest, seed=cfg.views_seed)
    train_ds = open_split(manifest, cfg.train_split, views=view_spec, view=1)
    val_ds, val_posterior = None, None
    if has_val_split(manifest, cfg.val_split):
        val_ds = open_split(manifest, cfg.val_split, views=view_spec, view=0)
        val_posterior = posterior(manifest, cfg.val_split)
    input_shape = tuple(train_ds.input_shape)
    runtime = Runtime.create(cfg.device, images=len(input_shape) == 3)

    seed_everything(cfg.seed)
    model = runtime.prepare(create_model(cfg.arch, num_classes=manifest.num_classes, input_shape=input_shape,
                                         weights=cfg.weights, **cfg.arch_options))
    optimizer = sgd(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    per_epoch = len(rank_slices(len(train_ds), batch_size=cfg.batch_size, world_size=runtime.world_size))
    scheduler = cosine_schedule(optimizer, total_steps=cfg.epochs * per_epoch)
    meta = {
        "arch": cfg.arch, "arch_options": ckpt.plain(cfg.arch_options), "num_classes": manifest.num_classes,
        "input_shape": list(input_shape), "loss": cfg.loss, "manifest_sha256": manifest.sha256,
        "manifest": str(cfg.manifest),
        "dataset": manifest.dataset, "views": view_spec.to_dict(), "seed": cfg.seed,
        "config": ckpt.plain(asdict(cfg)),
    }
    start: LoopState | None = None
    if cfg.resume:
        blob = ckpt.load_checkpoint(cfg.resume)
        blob["meta"].get("config", {}).setdefault("arch_options", {})  # written before size options: the defaults
        cfg.check_resume(blob, {"manifest_sha256": manifest.sha256}, meta["config"])
        model.load_state_dict(blob["model"])
        start = restore_train_state(blob["train_state"], [optimizer], [scheduler])

    loss_fn = TEACHER_LOSSES.get(cfg.loss)

    def step(models: list[torch.nn.Module], batch: Any) -> dict:
        z = models[0](batch.x).float()
        with torch.no_grad():  # the other teacher losses, logged for comparison
            parts = {name: TEACHER_LOSSES.get(name)(z, batch.y) for name in TEACHER_LOSSES.names() if name != cfg.loss}
        return {"loss": loss_fn(z, batch.y), **parts, "logits": z}

    def on_epoch_start(epoch: int) -> None:
        train_ds.set_view(epoch + 1)

    def on_epoch_end(epoch: int, row: dict) -> dict:
        if val_ds is None:
            return {}
        scores = evaluate_model(model, val_ds, runtime=runtime, batch_size=cfg.eval_batch_size,
                                workers=cfg.workers, posterior=val_posterior)
        return {f"val_{k}": v for k, v in scores.items() if k != "n"}

    def on_checkpoint(state: LoopState, train_state: dict) -> None:
        last = ckpt.plain(state.history[-1])
        ckpt.save_checkpoint(cfg.out, model=model,
                             meta={**meta, "epoch": state.epoch, "metrics": last, "history": ckpt.plain(state.history)},
                             train_state=train_state)
        if cfg.history_path:
            write_history(cfg.history_path, state.history)

    state = fit(
        [model], [optimizer], step=step, dataset=train_ds, epochs=cfg.epochs, runtime=runtime,
        schedulers=[scheduler], workers=cfg.workers, start=start,
        batch_sampler=lambda e: shuffled_batches(len(train_ds), batch_size=cfg.batch_size, seed=cfg.seed, epoch=e,
                                                 rank=runtime.rank, world_size=runtime.world_size),
        on_epoch_start=on_epoch_start, on_epoch_end=on_epoch_end, on_checkpoint=on_checkpoint,
        progress=cfg.progress, desc=f"teacher {cfg.arch}/{cfg.loss}",
    )
    if runtime.is_main and start is not None and start.epoch >= cfg.epochs:
        _finished_already(cfg, state.history)
    return finish_run(state.history, runtime=runtime, num_classes=manifest.num_classes,
                      what=f"teacher {cfg.arch}/{cfg.loss}", hint=lr_hint(state.history, cfg.lr), metrics_path=cfg.metrics)


def _finished_already(cfg: TeacherConfig, history: list[dict]) -> None:
    """Resuming a finished run trains nothing: still leave ``out`` and the history in place."""
    assert cfg.resume is not None
    if Path(cfg.out).resolve() != Path(cfg.resume).resolve():
        with atomic_path(cfg.out) as tmp:
            shutil.copyfile(cfg.resume, tmp)
    if cfg.history_path:
        write_history(cfg.history_path, history)


def lr_hint(history: Sequence[Mapping[str, float]], lr: float) -> str:
    """What to try for a run that did not learn, from its train_loss: a loss that rose or became
    non-finite suggests a smaller lr, one that barely moved a larger lr or more epochs."""
    first, last = (history[0].get("train_loss"), history[-1].get("train_loss")) if history else (None, None)
    if first is None or last is None:
        return f"try another lr (this run: {lr}), or more epochs"
    if not math.isfinite(last) or last > first:
        return f"the train_loss rose ({first:.4g} -> {last:.4g}): try a smaller lr (this run: {lr})"
    if abs(first - last) <= 0.01 * abs(first):
        return f"the train_loss barely moved: try a larger lr (this run: {lr}), or more epochs"
    return f"try more epochs, or another lr (this run: {lr})"

