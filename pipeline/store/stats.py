"""The exact per-sample targets every store keeps, from a block's full float32 logits.

    from pipeline.store.stats import target_stats
    s = target_stats(z, labels)          # entropy, p_gt, pred, logsumexp per row
    s = target_stats(z, labels, mixed=(partner_labels, lam))   # mixed views: p_gt weighs both labels
    label_agreement(pred, labels, mixed=(partner_labels, lam)).mean()   # a view's accuracy

Computed before any rounding, top-k truncation or sampling, so they are the teacher's own
whatever the storage kind.
"""

from __future__ import annotations

from typing import Any

import numpy as np

STATS_TILE_VALUES = 2**16          # logits per tile of target_stats (256 KiB of float32: cache-resident)
STATS = ("entropy", "p_gt", "pred", "logsumexp")


def target_stats(logits: np.ndarray, labels: np.ndarray,
                 mixed: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Exact per-sample targets from full float32 logits [B, C]: entropy, p_gt, pred, logsumexp.

    ``mixed``: (partner labels, lambda) of mixed views (``pipeline.data.mix``): p_gt is then
    ``lam * p[label] + (1 - lam) * p[partner label]`` in float32 (the probability of the mixed label).

    Entropy is in nats at T = 1; ``pred`` is the first arg-max (the same class the top-k order puts
    first). NumPy, not torch, so the values never depend on the thread count. Computed in tiles of
    about ``STATS_TILE_VALUES`` values (whole rows), so that the temporaries stay in the CPU cache;
    every operation is per row, so a row's results do not depend on the tiling.
    """
    z = np.asarray(logits, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if mixed is not None:
        mixed = (np.asarray(mixed[0], dtype=np.int64), np.asarray(mixed[1], dtype=np.float32))
    rows, classes = z.shape
    out = {"entropy": np.empty(rows, np.float32), "p_gt": np.empty(rows, np.float32),
           "pred": np.empty(rows, np.int32), "logsumexp": np.empty(rows, np.float32)}
    step = max(1, STATS_TILE_VALUES // classes)
    logp, p = np.empty((2, min(step, rows), classes), np.float32)
    for a in range(0, rows, step):
        b = min(a + step, rows)
        _stats_tile(z[a:b], labels[a:b], logp[:b - a], p[:b - a], {name: v[a:b] for name, v in out.items()},
                    None if mixed is None else (mixed[0][a:b], mixed[1][a:b]))
    return out


def _stats_tile(z: np.ndarray, labels: np.ndarray, logp: np.ndarray, p: np.ndarray,
                out: dict[str, np.ndarray], mixed: tuple[np.ndarray, np.ndarray] | None) -> None:
    """``target_stats`` of a few rows into ``out``; ``logp`` and ``p`` are scratch of the rows' shape."""
    zmax = z.max(axis=1, keepdims=True)
    np.exp(np.subtract(z, zmax, out=logp), out=p)
    lse = zmax + np.log(p.sum(axis=1, keepdims=True, dtype=np.float32))
    np.exp(np.subtract(z, lse, out=logp), out=p)
    out["p_gt"][:] = p[np.arange(len(z)), labels]
    if mixed is not None:
        partner, lam = mixed
        out["p_gt"][:] = lam * out["p_gt"] + (1 - lam) * p[np.arange(len(z)), partner]
    out["entropy"][:] = -np.multiply(p, logp, out=p).sum(axis=1, dtype=np.float32)
    out["pred"][:] = z.argmax(axis=1)
    out["logsumexp"][:] = lse[:, 0]



def label_agreement(pred: Any, labels: Any, mixed: tuple[Any, Any] | None = None) -> Any:
    """Per row, the weight of the predicted class in the row's label: ``pred == labels`` (bool) for
    plain labels; with ``mixed`` = (partner labels, lambda), the mixed label's weight
    ``lam * [pred == y] + (1 - lam) * [pred == y_partner]`` (float64). Its mean is a view's accuracy:
    against a plain label the usual one, against a mixed label the expected accuracy of the
    prediction on a label drawn from the mixed one (1 where both labels are the predicted class,
    lambda where only the row's own is). Array operators only: NumPy or dask arrays."""
    hit = pred == labels
    if mixed is None:
        return hit
    partner, lam = mixed
    lam = lam.astype(np.float64)
    return lam * hit + (1 - lam) * (pred == partner)


def labels_of(ids: np.ndarray, sample_id: np.ndarray, order: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The labels of the samples whose ids are ``ids`` (any shape; every one a sample id of the split):
    ``labels[row]`` of each id's row in ``sample_id``, ``order`` being its argsort."""
    return labels[order[np.searchsorted(sample_id, ids, sorter=order)]]
