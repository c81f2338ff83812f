"""A test-only storage codec, "test-bfloat16": dense logits rounded to bfloat16, kept as their uint16 bits.

Imported by tests/store/test_codecs.py. It shows that a storage kind is one class under
``@register(...)`` in one file: the writer, the reader, ``kdcache verify``, ``plan`` and
``inspect`` take it from the registry with no other edit (``kdcache cache --storage test-bfloat16``).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from pipeline.store.codecs import Codec, register
from pipeline.store.codecs.dense import check_recomputed

BF16_UNIT_ROUNDOFF = 2.0**-8          # half an ulp of bfloat16's 8-bit significand, relative
BF16_SUBNORMAL = 2.0**-134


def to_bfloat16_bits(logits: np.ndarray) -> np.ndarray:
    """The uint16 bits of ``logits`` rounded to bfloat16 (nearest even, by torch)."""
    z = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    return z.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def from_bfloat16_bits(bits: Any) -> Any:
    """float32 values of bfloat16 bits: the bits are the top half of a float32 (NumPy or dask)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


@register("test-bfloat16")
class BFloat16(Codec):
    """``logits_bf16`` [V, N, C] uint16: 2 bytes a logit, each within 2^-8 of its value, relative."""

    uses_dtype = False                 # the recorded dtype does not change the arrays

    def payload(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"logits_bf16": ((self.num_classes,), "uint16")}

    def encode(self, logits: np.ndarray, *, seed: int, view: int, block: int, where: str) -> dict[str, np.ndarray]:
        return {"logits_bf16": to_bfloat16_bits(logits)}

    def decode(self, parts: Mapping[str, np.ndarray]) -> np.ndarray:
        return from_bfloat16_bits(np.ascontiguousarray(parts["logits_bf16"]))

    def max_prob(self, parts: Mapping[str, Any]) -> Any:
        z = from_bfloat16_bits(parts["logits_bf16"])
        return 1.0 / np.exp(z - z.max(axis=-1, keepdims=True)).sum(axis=-1)

    def check(self, block: Mapping[str, np.ndarray], labels: np.ndarray,
              mixed: tuple[np.ndarray, np.ndarray] | None = None) -> list[str]:
        z = self.decode(block)
        return check_recomputed(self.num_classes, z, np.abs(z) * BF16_UNIT_ROUNDOFF + BF16_SUBNORMAL, block, labels,
                                mixed)
