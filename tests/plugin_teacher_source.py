"""A test-only teacher source, ``fixed:SEED``: a linear layer over the flattened input whose
weights and bias are drawn from ``torch.Generator().manual_seed(SEED)``.

    from tests import plugin_teacher_source  # noqa: F401   (registers "fixed" for the session)
    kdcache cache --teacher fixed:3 ...; kdcache distill --online --teachers fixed:3 ...

It shows that a form of teacher is one frozen dataclass with ``@register_source(...)``: which
texts it claims and how it builds its model. Checking it against the manifest, its provenance,
its name, caching it and running it live are the same code as for every other form
(tests/test_teacher_sources.py). Rank 15: tried before ``module:function``, which ``fixed:x`` would match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.teachers import TeacherSource, register_source


@register_source("fixed", rank=15)
@dataclass(frozen=True)
class FixedSource(TeacherSource):
    """``fixed:SEED``: the same seeded linear teacher in every process."""

    @classmethod
    def form(cls) -> str:
        return "fixed:SEED"

    @classmethod
    def parse(cls, text: str, weights: str | None, *, weights_flag: str) -> TeacherSource | None:
        if not text.startswith("fixed:"):
            return None
        if not text.removeprefix("fixed:").isdigit() or weights is not None:
            raise UserError(f"--teacher {text}: expected fixed:SEED (an integer), without {weights_flag}")
        return cls(text)

    def build(self, *, num_classes: int, input_shape: tuple[int, ...]) -> tuple[nn.Module, dict]:
        model = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))
        generator = torch.Generator().manual_seed(int(self.spec.removeprefix("fixed:")))
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(torch.randn(param.shape, generator=generator))
        return model.eval(), {"arch": "linear", "num_classes": num_classes, "input_shape": tuple(input_shape)}
