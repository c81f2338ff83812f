"""Top-k storage: the k largest logits of a row, their classes and the row's exact logsumexp.

    kdcache cache ... --storage topk --k 20

``topk_values`` [V, N, k] (float16/float32, largest first; ties: the lower class first),
``topk_index`` [V, N, k] (``index_dtype``) and ``logsumexp`` [V, N] float32 (the exact target the
writer computes). Read back as the top-k logits with the exact tail mass ``1 - sum_j p_j``
spread uniformly over the other classes: softmax at T = 1 gives every top-k class its exact
probability (KD on it is biased: the tail is flattened).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from pipeline.errors import UserError
from pipeline.store.codecs.base import Codec, cast_logits, register
from pipeline.store.codecs.dense import rounding_bound


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (values, indices) per row, largest first, ties broken by the lower class index."""
    z = np.asarray(logits, dtype=np.float32)
    order = np.argsort(-z, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(z, order, axis=1), order


def dense_from_topk(values: np.ndarray, index: np.ndarray, lse: np.ndarray, num_classes: int) -> np.ndarray:
    """Dense float32 logits [B, C] from top-k: exact top-k softmax at T = 1, the exact tail mass
    spread uniformly over the other classes."""
    values = values.astype(np.float32)
    k = values.shape[1]
    tail = np.clip(1.0 - np.exp(values - lse[:, None]).sum(axis=1), 1e-12, 1.0)
    fill = lse + np.log(tail / max(num_classes - k, 1)) if num_classes > k else values[:, -1] - 30.0
    out = np.repeat(fill.astype(np.float32)[:, None], num_classes, axis=1)
    np.put_along_axis(out, index.astype(np.int64), values, axis=1)
    return out


def label_bounds(index: np.ndarray, p_lo: np.ndarray, p_hi: np.ndarray,
                 labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounds [B] of each row's probability of ``labels`` from the bounds ``p_lo``, ``p_hi`` [B, k] of
    its top-k probabilities: the label's own when it is among the classes ``index``, else
    [0, the k-th's upper bound] (every other class is at most the k-th)."""
    hit = index == labels[:, None]
    return (p_lo * hit).sum(axis=1), np.where(hit.any(axis=1), (p_hi * hit).sum(axis=1), p_hi[:, -1])


@register("topk")
class TopK(Codec):
    parameters = frozenset({"k"})
    class_ids = True

    def check_k(self) -> None:
        if self.k is None or not 1 <= int(self.k) <= self.num_classes:
            raise UserError(f"k: expected 1 <= k <= num_classes ({self.num_classes}) for top-k storage, found {self.k}")

    def payload(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"topk_values": ((self.k,), self.dtype), "topk_index": ((self.k,), self.index_dtype),
                "logsumexp": ((), "float32")}

    def encode(self, logits: np.ndarray, *, seed: int, view: int, block: int, where: str) -> dict[str, np.ndarray]:
        values, index = top_k(logits, self.k)
        return {"topk_values": cast_logits(values, self.dtype, where), "topk_index": index.astype(self.index_dtype)}

    def decode(self, parts: Mapping[str, np.ndarray]) -> np.ndarray:
        return dense_from_topk(parts["topk_values"], parts["topk_index"], parts["logsumexp"], self.num_classes)

    def max_prob(self, parts: Mapping[str, Any]) -> Any:
        return np.exp(parts["topk_values"][..., 0].astype(np.float32) - parts["logsumexp"])

    def kept_logits(self, parts: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        values = parts["topk_values"].astype(np.float32)
        return parts["topk_index"].astype(np.int64), values, rounding_bound(values, self.dtype)

    def check(self, block: Mapping[str, np.ndarray], labels: np.ndarray,
              mixed: tuple[np.ndarray, np.ndarray] | None = None) -> list[str]:
        # With the exact float32 logsumexp, each top-k probability p_j = exp(v_j - lse) is known up to
        # the rounding of v_j (a factor exp(+-delta_j)); the tail mass 1 - sum p_j and the entropy
        # bounds below are evaluated over those intervals. A label's probability is within its
        # interval when the label is kept, in [0, the k-th's upper bound] when not; a mixed p_gt
        # within the lambda-weighted bounds of its two labels.
        values = block["topk_values"].astype(np.float32)
        index = block["topk_index"].astype(np.int64)
        lse = block["logsumexp"]
        out = []
        if index.min() < 0 or index.max() >= self.num_classes:
            return [f"topk_index: expected classes in [0, {self.num_classes}), found [{index.min()}, {index.max()}]"]
        if (np.diff(values, axis=1) > 0).any():
            out.append("topk_values: expected values sorted largest first, found them out of order")
        if self.k > 1 and (np.diff(np.sort(index, axis=1), axis=1) == 0).any():
            out.append("topk_index: expected distinct classes per row, found repeats")
        if (block["pred"] != index[:, 0]).any():
            out.append("pred: expected the first top-k class, found another")
        delta = 1.5 * rounding_bound(values, self.dtype)
        logp = values - lse[:, None]
        p = np.exp(logp)
        p_lo, p_hi = p * np.exp(-delta), p * np.exp(delta)
        if (p_lo.sum(axis=1) > 1 + 1e-5).any():
            out.append("logsumexp: expected it to cover the top-k mass (<= 1), found more")
        partner, lam = mixed if mixed is not None else (labels, 1.0)
        own, other = label_bounds(index, p_lo, p_hi, labels), label_bounds(index, p_lo, p_hi, partner)
        lo, hi = (lam * a + (1 - lam) * b for a, b in zip(own, other))
        bad = (block["p_gt"] < lo - 1e-6) | (block["p_gt"] > hi + 1e-6)
        if bad.any():
            what = "the mixed label's probability" if mixed is not None else "the value"
            out.append(f"p_gt: expected {what} implied by top-k and logsumexp, found {int(bad.sum())} rows off")
        t_lo = np.clip(1.0 - p_hi.sum(axis=1), 0.0, 1.0)
        t_hi = np.clip(1.0 - p_lo.sum(axis=1), 0.0, 1.0)
        h_top = -(p * logp).sum(axis=1)
        h_err = (p * np.abs(logp + 1) * delta).sum(axis=1) + 1e-5
        h_lo = h_top - h_err + t_lo * -np.log(p_hi[:, -1])            # every tail class is below the k-th
        rest = self.num_classes - self.k
        if rest:
            def g(t):                                                   # tail spread uniformly: the most entropy
                return -t * np.log(np.maximum(t, 1e-30) / rest)
            peak = np.clip(rest / np.e, t_lo, t_hi)
            h_hi = h_top + h_err + np.maximum(np.maximum(g(t_lo), g(t_hi)), g(peak))
        else:
            h_hi = h_top + h_err
        bad = (block["entropy"] < h_lo) | (block["entropy"] > h_hi)
        if bad.any():
            out.append(f"entropy: expected it within the bounds top-k and logsumexp imply, found {int(bad.sum())} "
                       "rows outside")
        return out
