"""Scoring a model on a dataset: accuracy, cross-entropy, and distance to a known posterior.

    kdcache evaluate models/mse.pt --manifest data_manifests/synthetic.parquet --split test

    from pipeline.train.evaluate import evaluate_checkpoint, evaluate_model
    metrics = evaluate_model(model, dataset, runtime=rt, posterior=p_star)   # p_star: [N, C] or None
    metrics = evaluate_checkpoint("models/mse.pt", "data_manifests/synthetic.parquet", "test")

Metrics (fractions, not percent): ``top1``, ``top5`` (when C >= 5), ``ce`` (mean cross-entropy
against the labels), ``n``. With the exact Bayes posterior ``p*`` of the synthetic data also
``bayes_mse`` = mean over N·C of ``(p_model - p*)²`` (the convention of the MSE teacher loss),
``bayes_ce`` = mean over N of ``-Σ_c p*_c log p_model_c``, ``bayes_agree`` = fraction of rows
where ``argmax p_model == argmax p*``, and ``bayes_top1`` = accuracy of ``argmax p*`` (the ceiling).

Every split is scored with view 0, the evaluation transform. ``evaluate_checkpoint``: a
checkpoint whose class count or input shape differs from the manifest's is an error, and so
are NaN/Inf weights or logits; one trained on another manifest (hash) only warns, unless ``strict``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import FromDict
from pipeline.data import default_views, open_split
from pipeline.data.synthetic import bayes_posterior
from pipeline.data.views import ViewSpec
from pipeline.errors import UserError
from pipeline.manifest import Manifest, load_manifest
from pipeline.models import load_model
from pipeline.runtime import Runtime
from pipeline.train.loop import iter_batches, topk_correct


@torch.no_grad()
def predict_logits(
    model: nn.Module, dataset: torch.utils.data.Dataset, *, runtime: Runtime, batch_size: int = 512, workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits [N, C] and labels [N] (CPU) of ``model`` over ``dataset`` in row order."""
    model.eval()
    n = len(dataset)  # type: ignore[arg-type]
    batches = [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    logits, labels = [], []
    for x, y, _ in iter_batches(dataset, batches, runtime=runtime, workers=workers):
        with runtime.autocast():
            z = model(x)
        logits.append(z.float().cpu())
        labels.append(y.cpu())
    return torch.cat(logits), torch.cat(labels)


def score_logits(logits: torch.Tensor, labels: torch.Tensor, *, posterior: np.ndarray | None = None) -> dict:
    """The metrics of this module's docstring from logits [N, C] and labels [N]."""
    n, c = logits.shape
    labels = labels.long()
    metrics = {
        "n": int(n),
        "top1": float(topk_correct(logits, labels, 1)) / n,
        "ce": float(F.cross_entropy(logits, labels)),
    }
    if c >= 5:
        metrics["top5"] = float(topk_correct(logits, labels, 5)) / n
    if posterior is not None:
        p_star = torch.as_tensor(np.asarray(posterior), dtype=torch.float64)
        if tuple(p_star.shape) != (n, c):
            raise ValueError(f"posterior has shape {tuple(p_star.shape)}, expected {(n, c)}")
        log_p = torch.log_softmax(logits.double(), dim=-1)
        metrics["bayes_mse"] = float(((log_p.exp() - p_star) ** 2).mean())
        metrics["bayes_ce"] = float(-(p_star * log_p).sum(dim=-1).mean())
        bayes_pred = p_star.argmax(dim=-1)
        metrics["bayes_agree"] = float((logits.argmax(dim=-1) == bayes_pred).double().mean())
        metrics["bayes_top1"] = float((bayes_pred == labels).double().mean())
    return metrics


def evaluate_model(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    runtime: Runtime,
    batch_size: int = 512,
    workers: int = 0,
    posterior: np.ndarray | None = None,
) -> dict:
    """Score ``model`` on every row of ``dataset`` (see the module docstring for the metric names)."""
    logits, labels = predict_logits(model, dataset, runtime=runtime, batch_size=batch_size, workers=workers)
    return score_logits(logits, labels, posterior=posterior)


def posterior(manifest: Manifest, split: str) -> np.ndarray | None:
    """The exact Bayes posterior of ``split`` where the dataset has one (synthetic), else None."""
    return bayes_posterior(manifest, split) if manifest.dataset == "synthetic" else None


def has_val_split(manifest: Manifest, split: str | None) -> bool:
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


def evaluate_checkpoint(
    ckpt: str | Path,
    manifest: str | Path | Manifest,
    split: str,
    *,
    batch_size: int = 512,
    device: str = "auto",
    workers: int = 0,
    strict: bool = False,
) -> dict[str, Any]:
    """Score a checkpoint on ``split`` of ``manifest`` (a path or a loaded Manifest) with view 0.

    Returns the metrics of this module's docstring plus ``checkpoint``, ``split`` and ``manifest_match``.
    """
    man = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
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
    logits, labels = predict_logits(runtime.prepare(model), dataset, runtime=runtime, batch_size=batch_size,
                                    workers=workers)
    bad = ~torch.isfinite(logits).all(dim=1)
    if bad.any():  # an accuracy of NaN logits is a number that means nothing
        rows = torch.nonzero(bad).flatten().tolist()
        raise UserError(f"{ckpt}: field logits: expected finite values on split {split!r} of {man.path}, found "
                        f"NaN/Inf in {len(rows)} rows (first: {rows[:5]})")
    scores = score_logits(logits, labels, posterior=posterior(man, split))
    return {**scores, "checkpoint": str(ckpt), "split": split, "manifest_match": match}


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(FromDict):
    """How checkpoints are scored (the ``evaluate`` section of params.yaml):
    ``EvaluateConfig.from_dict(params["evaluate"]).score("models/kd.pt", "m.parquet")``."""

    section: ClassVar[str] = "evaluate"

    split: str = "test"
    batch_size: int = 512
    workers: int = 0                       # DataLoader workers decoding images
    device: str = "auto"
    strict: bool = False                   # another manifest than the checkpoint's: an error (else a warning)

    def __post_init__(self) -> None:
        self.check_strings(("split", "device"))
        self.check_ints(("batch_size",), minimum=1)
        self.check_ints(("workers",), minimum=0)
        if not isinstance(self.strict, bool):
            raise self.bad("strict", "true or false")

    def score(self, ckpt: str | Path, manifest: str | Path | Manifest) -> dict[str, Any]:
        """``evaluate_checkpoint`` of ``ckpt`` on this split of ``manifest`` with these settings."""
        return evaluate_checkpoint(ckpt, manifest, self.split, batch_size=self.batch_size, device=self.device,
                                   workers=self.workers, strict=self.strict)
