"""Tiny seeded batches for the method tests, shaped like the cache reader's output.

``make_targets`` builds what ``StoreGroup.targets`` returns: logits [K, B, C] float32 (rounded
through float16 like the dense store), entropy [K, B] and p_gt [K, B] computed exactly from them.
"""

from __future__ import annotations

import torch


def make_targets(z_m: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    logits = z_m.half().float()
    log_p = torch.log_softmax(logits.double(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    p_gt = log_p.gather(-1, y.long().expand(logits.shape[:-1]).unsqueeze(-1)).squeeze(-1).exp()
    return {"logits": logits, "entropy": entropy.float(), "p_gt": p_gt.float()}


def make_case(seed: int = 0, *, K: int = 3, B: int = 8, C: int = 5, strengths=(4.0, 1.0, -1.0), student=0.5):
    """Student logits [B, C], mentor logits [K, B, C] (mentor k pushed towards the label by
    strengths[k], so the teacher is good and later peers are worse), labels [B]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (B,), generator=g)
    onehot = torch.nn.functional.one_hot(y, C).float()
    z_s = torch.randn(B, C, generator=g) + student * onehot
    pushes = torch.tensor([strengths[k % len(strengths)] for k in range(K)]).view(K, 1, 1)
    z_m = (torch.randn(K, B, C, generator=g) * 2 + pushes * onehot).half().float()
    return z_s, z_m, y
