"""Teacher training losses (METHODS.md, "Teacher training"): logits in, scalar out.

    from pipeline.methods.teacher import TEACHER_LOSSES
    loss = TEACHER_LOSSES["mse"](logits, labels)

- ``ce``: cross-entropy, mean over the batch.
- ``mse``: ``F.mse_loss(softmax(z), onehot(y))``, the mean over B·C of the squared error,
  as the MSE-teacher paper's synthetic experiment does (the Brier score divided by C).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.methods.base import full


def ce_teacher_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits ``z`` [B, C] against labels ``y`` [B], mean over the batch."""
    return F.cross_entropy(full(z), y.long())


def mse_teacher_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over B·C of ``(softmax(z) - onehot(y))²``."""
    p = torch.softmax(full(z), dim=-1)
    return F.mse_loss(p, F.one_hot(y.long(), num_classes=z.shape[-1]).to(p.dtype))


TEACHER_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ce": ce_teacher_loss,
    "mse": mse_teacher_loss,
}
