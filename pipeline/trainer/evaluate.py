"""Scoring a model on a dataset: accuracy, cross-entropy, and distance to a known posterior.

    from pipeline.trainer.evaluate import evaluate_model
    metrics = evaluate_model(model, dataset, runtime=rt, posterior=p_star)   # p_star: [N, C] or None

Metrics (fractions, not percent): ``top1``, ``top5`` (when C >= 5), ``ce`` (mean cross-entropy
against the labels), ``n``. With the exact Bayes posterior ``p*`` of the synthetic data also
``bayes_mse`` = mean over N·C of ``(p_model - p*)²`` (the convention of the MSE teacher loss),
``bayes_ce`` = mean over N of ``-Σ_c p*_c log p_model_c``, ``bayes_agree`` = fraction of rows
where ``argmax p_model == argmax p*``, and ``bayes_top1`` = accuracy of ``argmax p*`` (the ceiling).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.trainer.loop import iter_batches, topk_correct
from pipeline.trainer.runtime import Runtime


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
