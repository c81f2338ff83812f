"""How a block's float32 teacher logits become the stored arrays of each storage kind, and back.

    from pipeline.store import codecs
    q, scale, offset = codecs.quantize_int8(z)                 # dense int8: z ~ offset + scale * q
    z_hat = codecs.dequantize_int8(q, scale, offset)           # |z_hat - z| <= scale / 2 (+ float32 rounding)
    index, count = codecs.draw_samples(z, k=12, temperature=1.0, rng=codecs.sample_rng(0, view, block))
    z_tilde = codecs.dense_from_samples(index, count, num_classes=C, temperature=1.0)
    h = codecs.to_float16(z)                                   # the bits of z.astype(np.float16)

Everything here works on whole blocks, value by value or row by row (NumPy; the float16 cast
torch's), so a block's bytes depend only on its logits (and, for sampled storage, on the store's
seed, the view and the block), never on the thread count.

- int8: per row, ``scale = (max - min) / 255`` and ``offset = max - 127 * scale``; the row's
  maximum is ``q = 127`` and its minimum ``q = -128``. Every logit is within ``scale / 2`` of the
  float32 value (plus the float32 rounding of ``offset + scale * q``), so every log-probability at
  temperature T is within ``scale / T``.
- top-k: the k largest logits (ties: the lower class first) and the exact logsumexp;
  ``dense_from_topk`` spreads the exact tail mass uniformly over the other classes.
- sampled: k draws with replacement from the proposal ``q = softmax(z / T_s)``, the teacher's
  own distribution at the store's temperature ``T_s``; kept as the distinct classes (ascending)
  and their counts, padded with count 0 (the pad repeats the last class). The weight of a class
  is ``count / k``: with this proposal the importance weight ``p / q`` is 1, so the weights are
  exact. The draws are systematic: one uniform ``U`` per row and draw j at the quantile
  ``(j + U) / k`` of q's CDF (classes in index order). Each draw alone is distributed as q, so
  ``E[count_c] = k q_c`` exactly (``pipeline.losses.sampled_kd_loss`` is unbiased), and ``count_c``
  is ``floor(k q_c)`` or ``ceil(k q_c)``: a variance of at most 1/4 per count, where independent
  draws give ``k q_c (1 - q_c)``.
"""

from __future__ import annotations

import numpy as np
import torch

INT8_LEVELS = 255                 # steps between a row's min (q = -128) and max (q = 127)
SAMPLE_SALT = 0x53414D50          # "SAMP": separates the sampling stream from any other use of the seed
FLOOR = -1000.0                   # log-weight of a class never drawn: exp() is 0 in float32 and float64


def quantize_int8(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q int8 [B, C], scale float32 [B], offset float32 [B]) with ``logits ~ offset + scale * q``."""
    z = np.asarray(logits, dtype=np.float32)
    zmax, zmin = z.max(axis=1), z.min(axis=1)
    scale = ((zmax.astype(np.float64) - zmin) / INT8_LEVELS).astype(np.float32)
    offset = (zmax - np.float32(127) * scale).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.rint((z - offset[:, None]) / safe[:, None])
    return np.clip(q, -128, 127).astype(np.int8), scale, offset


def to_float16(values: np.ndarray) -> np.ndarray:
    """``values.astype(np.float16)`` bit for bit (IEEE round to nearest even; inf from 65520 on), by
    torch's vectorized conversion (NumPy's is scalar, ~20 x slower). Each value is converted alone,
    so the bits do not depend on the thread count."""
    return torch.from_numpy(np.require(values, np.float32, ["C", "W"])).to(torch.float16).numpy()


def dequantize_int8(q: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """float32 logits [B, C] from ``quantize_int8``'s arrays."""
    return (offset[:, None] + scale[:, None] * q.astype(np.float32)).astype(np.float32)


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
