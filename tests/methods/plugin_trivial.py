"""A test-only method, "test-ce-twice": twice the cross-entropy, no mentors, no cached targets.

Imported by tests/methods/conftest.py (every ``plugin_*.py`` is), so the registry-parametrized
tests run on it as on the package's methods: it shows that a method is one class with
``@register(...)`` and a declared public function, and nothing else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.methods.base import Method, full, register, result


def ce_twice_loss(z_s: torch.Tensor, y: torch.Tensor, *, scale: float = 2.0) -> torch.Tensor:
    """The public pure function of "test-ce-twice": ``scale · CE(z_s, y)``."""
    return scale * F.cross_entropy(full(z_s), y.long())


@register("test-ce-twice")
class CETwice(Method):
    """Reads no targets; mentor stores, if any are given, are not used."""

    min_mentors = 0
    needs = frozenset()
    defaults = {"scale": 2.0}
    loss_fn = staticmethod(ce_twice_loss)

    def compute(self, students, targets, y):
        ce = F.cross_entropy(full(students[0]), y)
        return result(self.options["scale"] * ce, {"ce": ce})
