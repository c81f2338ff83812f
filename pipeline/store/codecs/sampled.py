"""Sampled storage: the classes and counts of k draws from the teacher's softmax at the store's temperature.

    kdcache cache ... --storage sampled --k 12 --temperature 1

``sample_index`` [V, N, k] (``index_dtype``) and ``sample_count`` [V, N, k] (the smallest unsigned
type holding k). k draws with replacement from the proposal ``q = softmax(z / T_s)``, the
teacher's own distribution at the store's temperature ``T_s``; kept as the distinct classes
(ascending) and their counts, padded with count 0 (the pad repeats the last class). The weight
of a class is ``count / k``: with this proposal the importance weight ``p / q`` is 1, so the
weights are exact. The draws are systematic: one uniform ``U`` per row and draw j at the
quantile ``(j + U) / k`` of q's CDF (classes in index order). Each draw alone is distributed as
q, so ``E[count_c] = k q_c`` exactly (``pipeline.losses.sampled_kd_loss`` is unbiased), and
``count_c`` is ``floor(k q_c)`` or ``ceil(k q_c)``: a variance of at most 1/4 per count, where
independent draws give ``k q_c (1 - q_c)``. A block's generator is seeded by the store's seed
(``views.seed``), the view and the block (``sample_rng``), so reruns and resumes draw the same
classes. Read back as ``T_s * log(count / k)`` (``FLOOR`` for classes never drawn), whose
softmax at ``T_s`` is the sampled distribution exactly.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from pipeline.errors import UserError
from pipeline.store.codecs.base import Codec, index_dtype, register

SAMPLE_SALT = 0x53414D50          # "SAMP": separates the sampling stream from any other use of the seed
FLOOR = -1000.0                   # log-weight of a class never drawn: exp() is 0 in float32 and float64


def count_dtype(k: int) -> str:
    """The smallest unsigned type that holds a count of up to k draws."""
    return index_dtype(k + 1)


def sample_rng(seed: int, view: int, block: int) -> np.random.Generator:
    """The generator of one (view, block) of a sampled store: reruns and resumes draw the same classes."""
    return np.random.default_rng([int(seed), int(view), int(block), SAMPLE_SALT])


def draw_samples(logits: np.ndarray, *, k: int, temperature: float, rng: np.random.Generator,
                 index_dtype: str = "uint16", count_dtype: str = "uint8") -> tuple[np.ndarray, np.ndarray]:
    """k systematic draws per row from ``softmax(logits / temperature)`` (module docstring), as
    (classes, counts) [B, k]. Inverse CDF in float64, all rows in one ``searchsorted``.
    """
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    rows, num_classes = z.shape
    p = np.exp(z - z.max(axis=1, keepdims=True))
    cdf = np.cumsum(p, axis=1)
    cdf /= cdf[:, -1:]
    base = np.arange(rows, dtype=np.float64)[:, None]
    u = (np.arange(k)[None, :] + rng.random((rows, 1))) / k
    flat = np.searchsorted((cdf + base).reshape(-1), (u + base).reshape(-1), side="right").reshape(rows, k)
    draws = np.clip(flat - np.arange(rows)[:, None] * num_classes, 0, num_classes - 1)
    return _counts(np.sort(draws, axis=1), index_dtype, count_dtype)


def _counts(draws: np.ndarray, index_dtype: str, count_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted draws [B, k] -> distinct classes (ascending, the pad repeating the last) and counts."""
    rows, k = draws.shape
    first = np.ones((rows, k), bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = np.cumsum(first, axis=1) - 1                          # which distinct class each draw is
    index = np.empty((rows, k), np.int64)
    index[np.arange(rows)[:, None], slot] = draws                # every draw of a class writes the same id
    used = slot[:, -1] + 1
    pad = np.arange(k)[None, :] >= used[:, None]
    index = np.where(pad, np.take_along_axis(index, (used - 1)[:, None], axis=1), index)
    count = np.bincount((np.arange(rows)[:, None] * k + slot).reshape(-1), minlength=rows * k).reshape(rows, k)
    return index.astype(index_dtype), count.astype(count_dtype)


def sample_weights(count: np.ndarray) -> np.ndarray:
    """float32 weights [B, k] = count / k: the sampled estimate of the teacher's distribution at T_s."""
    count = np.asarray(count, dtype=np.float32)
    return count / np.float32(count.shape[1])


def dense_from_samples(index: np.ndarray, count: np.ndarray, num_classes: int, temperature: float) -> np.ndarray:
    """Dense float32 logits [B, C] whose softmax at ``temperature`` is the sampled distribution
    ``count / k`` exactly (classes never drawn get probability 0)."""
    rows = len(index)
    flat = (np.arange(rows)[:, None] * num_classes + index.astype(np.int64)).reshape(-1)
    g = np.bincount(flat, weights=sample_weights(count).reshape(-1), minlength=rows * num_classes)
    g = g.reshape(rows, num_classes)
    with np.errstate(divide="ignore"):
        logg = np.where(g > 0, np.log(g), FLOOR)
    return (float(temperature) * logg).astype(np.float32)


@register("sampled")
class Sampled(Codec):
    parameters = frozenset({"k", "temperature"})
    class_ids = True
    uses_dtype = False

    def check_k(self) -> None:
        if self.k is None or int(self.k) < 1:
            raise UserError(f"k: expected a positive number of draws per row for sampled storage, found {self.k}")

    def payload(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"sample_index": ((self.k,), self.index_dtype), "sample_count": ((self.k,), count_dtype(self.k))}

    @property
    def sample_temperature(self) -> float | None:
        return self.temperature

    def encode(self, logits: np.ndarray, *, seed: int, view: int, block: int, where: str) -> dict[str, np.ndarray]:
        index, count = draw_samples(logits, k=self.k, temperature=self.temperature, rng=sample_rng(seed, view, block),
                                    index_dtype=self.index_dtype, count_dtype=count_dtype(self.k))
        return {"sample_index": index, "sample_count": count}

    def decode(self, parts: Mapping[str, np.ndarray]) -> np.ndarray:
        return dense_from_samples(parts["sample_index"], parts["sample_count"], self.num_classes, self.temperature)

    def max_prob(self, parts: Mapping[str, Any]) -> Any:
        # estimated as the largest draw share (the draws' own distribution, at the store's temperature)
        counts = parts["sample_count"].astype(np.float32)
        return counts.max(axis=-1) / counts.sum(axis=-1)

    def check(self, block: Mapping[str, np.ndarray], labels: np.ndarray,
              mixed: tuple[np.ndarray, np.ndarray] | None = None) -> list[str]:
        # the classes drawn cannot give the exact targets back: their own consistency, ranges and,
        # drawn at the teacher's own softmax (T_s = 1), p_gt within 1/k of the draws' share
        index = block["sample_index"].astype(np.int64)
        count = block["sample_count"].astype(np.int64)
        out = []
        if index.min() < 0 or index.max() >= self.num_classes:
            return [f"sample_index: expected classes in [0, {self.num_classes}), found [{index.min()}, {index.max()}]"]
        if (count.sum(axis=1) != self.k).any():
            out.append(f"sample_count: expected counts summing to k = {self.k} per row, found "
                       f"{int((count.sum(axis=1) != self.k).sum())} rows that do not")
        drawn = count > 0
        if (drawn[:, 1:] & ~drawn[:, :-1]).any() or not drawn[:, 0].all():
            out.append("sample_count: expected the drawn classes first and count-0 padding after them, found another order")
        step = np.diff(index, axis=1)
        if (step < 0).any() or ((step == 0) & drawn[:, 1:]).any():
            out.append("sample_index: expected distinct classes in ascending order, found repeats or disorder")
        if self.temperature == 1.0:
            out += self._check_p_gt(index, count, block["p_gt"], labels, mixed)
        return out + super().check(block, labels, mixed)

    def _check_p_gt(self, index: np.ndarray, count: np.ndarray, p_gt: np.ndarray, labels: np.ndarray,
                    mixed: tuple[np.ndarray, np.ndarray] | None) -> list[str]:
        """p_gt of a store drawn at T_s = 1 against its draws: each count is floor or ceil of k p_c
        (systematic draws), so ``p[y]`` is within 1/k of ``count_y / k``, and a mixed p_gt within
        1/k of the lambda-weighted shares of its two labels."""
        def share(y: np.ndarray) -> np.ndarray:
            return (count * (index == y[:, None])).sum(axis=1) / self.k

        partner, lam = mixed if mixed is not None else (labels, 1.0)
        bad = np.abs(p_gt - (lam * share(labels) + (1 - lam) * share(partner))) > 1.0 / self.k + 1e-5
        if not bad.any():
            return []
        what = "the mixed label's probability" if mixed is not None else "the label's probability"
        return [f"p_gt: expected {what} within 1/k of the draws' share at T_s = 1, found {int(bad.sum())} rows off"]
