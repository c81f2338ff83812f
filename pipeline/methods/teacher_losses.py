"""Teacher training losses (docs/methods.md, "Teacher training"): logits in, scalar out.
They train the teachers (``kdcache train-teacher --loss``); they are not distillation methods and
are not in the METHODS registry.

    from pipeline.methods.teacher_losses import TEACHER_LOSSES
    loss = TEACHER_LOSSES.get("mse")(logits, labels)      # TEACHER_LOSSES.names() == ["ce", "mse"]

- ``ce``: cross-entropy, mean over the batch.
- ``mse``: ``F.mse_loss(softmax(z), onehot(y))``, the mean over B·C of the squared error,
  as the MSE-teacher paper's synthetic experiment does (the Brier score divided by C).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.methods.base import full
from pipeline.registry import Registry

TEACHER_LOSSES: Registry[torch.Tensor] = Registry("teacher loss")


@TEACHER_LOSSES.register("ce")
def ce_teacher_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits ``z`` [B, C] against labels ``y`` [B], mean over the batch."""
    return F.cross_entropy(full(z), y.long())


@TEACHER_LOSSES.register("mse")
def mse_teacher_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over B·C of ``(softmax(z) - onehot(y))²``."""
    p = torch.softmax(full(z), dim=-1)
    return F.mse_loss(p, F.one_hot(y.long(), num_classes=z.shape[-1]).to(p.dtype))
