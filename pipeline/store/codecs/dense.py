"""Dense storage: every logit of every row, in float16 or float32, or int8 with a per-row scale and offset.

    kdcache cache ... --storage dense --dtype float16        # the default
    kdcache cache ... --dtype int8                           # C + 8 bytes a row

``Dense`` keeps the logits as they are (``logits`` [V, N, C], rounded to the dtype: half an ulp
per logit). ``QuantizedDense`` (dtype int8) keeps, per row, ``scale = (max - min) / 255`` and
``offset = max - 127 * scale`` (float32) and ``q = round((z - offset) / scale)``: the row's
maximum is ``q = 127`` and its minimum ``q = -128``. Every logit is within ``scale / 2`` of the
float32 value (plus the float32 rounding of ``offset + scale * q``), so every log-probability at
temperature T is within ``scale / T``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from pipeline.store.codecs.base import Codec, cast_logits, register
from pipeline.store.stats import target_stats

INT8_LEVELS = 255                 # steps between a row's min (q = -128) and max (q = 127)
_UNIT_ROUNDOFF = {"float16": 2.0**-11, "float32": 2.0**-24}
_SUBNORMAL = {"float16": 2.0**-25, "float32": 2.0**-150}


def quantize_int8(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q int8 [B, C], scale float32 [B], offset float32 [B]) with ``logits ~ offset + scale * q``."""
    z = np.asarray(logits, dtype=np.float32)
    zmax, zmin = z.max(axis=1), z.min(axis=1)
    scale = ((zmax.astype(np.float64) - zmin) / INT8_LEVELS).astype(np.float32)
    offset = (zmax - np.float32(127) * scale).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.rint((z - offset[:, None]) / safe[:, None])
    return np.clip(q, -128, 127).astype(np.int8), scale, offset


def dequantize_int8(q: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """float32 logits [B, C] from ``quantize_int8``'s arrays."""
    return (offset[:, None] + scale[:, None] * q.astype(np.float32)).astype(np.float32)


def rounding_bound(z: np.ndarray, dtype: str) -> np.ndarray:
    """Largest rounding error of each stored logit (half an ulp of the store dtype)."""
    return np.abs(z) * _UNIT_ROUNDOFF[dtype] + _SUBNORMAL[dtype]


def _every_class(z: np.ndarray) -> np.ndarray:
    """Class ids [B, C]: every class of every row."""
    return np.broadcast_to(np.arange(z.shape[1], dtype=np.int64), z.shape)


def label_prob_error(p: np.ndarray, delta: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Relative bound of how far rounding each logit by ``delta`` moves the softmax probability ``p``
    of ``labels`` (first order: |d log p_y| <= delta_y + sum_j p_j delta_j, with a 1.5 margin)."""
    return np.expm1(1.5 * (delta[np.arange(len(p)), labels] + (p * delta).sum(axis=1)))


def check_recomputed(num_classes: int, z: np.ndarray, delta: np.ndarray, block: Mapping[str, np.ndarray],
                     labels: np.ndarray, mixed: tuple[np.ndarray, np.ndarray] | None = None) -> list[str]:
    """The stored entropy, p_gt and pred against those recomputed from dense logits ``z`` that are
    each within ``delta`` of the teacher's float32 logits (``mixed``: as ``Codec.check``, p_gt is
    then the mixed label's probability)."""
    # First-order bounds of how far rounding each logit z_j by delta_j moves the targets:
    # |d log p_y| <= delta_y + sum_j p_j delta_j;  |dH| <= sum_j p_j |log p_j + H| delta_j.
    # A mixed p_gt weighs the bounds of its two labels' probabilities by lambda.
    got = target_stats(z, labels, mixed=mixed)
    rows = np.arange(len(z))
    logp = z - got["logsumexp"][:, None]
    p = np.exp(logp)
    noise = 2e-6 * (1.0 + np.abs(z).max(axis=1))                    # float32 arithmetic on both sides
    out = []
    partner, lam = mixed if mixed is not None else (labels, 1.0)
    tol_p = (lam * p[rows, labels] * label_prob_error(p, delta, labels)
             + (1 - lam) * p[rows, partner] * label_prob_error(p, delta, partner) + noise)
    bad = np.abs(got["p_gt"] - block["p_gt"]) > tol_p
    if bad.any():
        what = "the mixed label's probability" if mixed is not None else "the value"
        out.append(f"p_gt: expected {what} recomputed from the stored logits, found {int(bad.sum())} rows off "
                   f"(e.g. stored {block['p_gt'][bad][0]:.6g}, recomputed {got['p_gt'][bad][0]:.6g})")
    tol_h = 1.5 * (p * np.abs(logp + got["entropy"][:, None]) * delta).sum(axis=1) + noise * np.log(num_classes + 1)
    bad = np.abs(got["entropy"] - block["entropy"]) > tol_h
    if bad.any():
        out.append(f"entropy: expected the value recomputed from the stored logits, found {int(bad.sum())} rows off "
                   f"(e.g. stored {block['entropy'][bad][0]:.6g}, recomputed {got['entropy'][bad][0]:.6g})")
    pred = block["pred"].astype(np.int64)
    if pred.min() < 0 or pred.max() >= num_classes:
        return out + [f"pred: expected classes in [0, {num_classes}), found [{pred.min()}, {pred.max()}]"]
    bad = (z[rows, pred][:, None] + delta[rows, pred][:, None] + delta < z).any(axis=1)
    if bad.any():
        out.append(f"pred: expected an arg-max of the stored logits, found {int(bad.sum())} rows where it is not")
    return out


@register("dense")
class Dense(Codec):
    """``logits`` [V, N, C] in float16 or float32; int8 is ``QuantizedDense``."""

    dtypes = ("float16", "float32", "int8")

    @classmethod
    def for_dtype(cls, dtype: str) -> type[Codec]:
        return QuantizedDense if dtype == "int8" else cls

    def payload(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"logits": ((self.num_classes,), self.dtype)}

    @property
    def dense_array(self) -> str | None:
        return "logits"

    def encode(self, logits: np.ndarray, *, seed: int, view: int, block: int, where: str) -> dict[str, np.ndarray]:
        return {"logits": cast_logits(logits, self.dtype, where)}

    def decode(self, parts: Mapping[str, np.ndarray]) -> np.ndarray:
        return parts["logits"].astype(np.float32)

    def max_prob(self, parts: Mapping[str, Any]) -> Any:
        logits = parts["logits"].astype(np.float32)
        return 1.0 / np.exp(logits - logits.max(axis=-1, keepdims=True)).sum(axis=-1)

    def kept_logits(self, parts: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        z = self.decode(parts)
        return _every_class(z), z, self._bound(parts, z)

    def _bound(self, parts: Mapping[str, np.ndarray], z: np.ndarray) -> np.ndarray:
        """How far each decoded logit may be from the teacher's float32 value."""
        return rounding_bound(z, self.dtype)

    def check(self, block: Mapping[str, np.ndarray], labels: np.ndarray,
              mixed: tuple[np.ndarray, np.ndarray] | None = None) -> list[str]:
        z = self.decode(block)
        return check_recomputed(self.num_classes, z, self._bound(block, z), block, labels, mixed)


class QuantizedDense(Dense):
    """Dense int8: ``logits_q`` [V, N, C] int8, ``logits_scale`` and ``logits_offset`` [V, N] float32."""

    def payload(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"logits_q": ((self.num_classes,), "int8"), "logits_scale": ((), "float32"),
                "logits_offset": ((), "float32")}

    @property
    def dense_array(self) -> str | None:
        return None

    def encode(self, logits: np.ndarray, *, seed: int, view: int, block: int, where: str) -> dict[str, np.ndarray]:
        q, scale, offset = quantize_int8(logits)
        return {"logits_q": q, "logits_scale": scale, "logits_offset": offset}

    def decode(self, parts: Mapping[str, np.ndarray]) -> np.ndarray:
        return dequantize_int8(parts["logits_q"], parts["logits_scale"], parts["logits_offset"])

    def max_prob(self, parts: Mapping[str, Any]) -> Any:
        # the row maximum is level 127
        q = parts["logits_q"].astype(np.float32)
        scale = parts["logits_scale"].astype(np.float32)[..., None]
        return 1.0 / np.exp(scale * (q - 127.0)).sum(axis=-1)

    def _bound(self, parts: Mapping[str, np.ndarray], z: np.ndarray) -> np.ndarray:
        return 0.5 * parts["logits_scale"][:, None] + 2 * rounding_bound(z, "float32")
