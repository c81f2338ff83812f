"""Single-teacher distillation: the KD building blocks and the methods nokd, kd, uncertainty.

Formulas: docs/methods.md ("Building blocks"; nokd, kd, uncertainty; "Storage").
``kd_kl`` is T² · KL(p^T(z_t) ‖ p^T(z_s)) per sample, batch-averaged by default; the teacher side
never carries gradient. ``sampled_kd_loss`` is its unbiased estimate from classes drawn from p^T(z_t). Losses compute in at least float32 (bf16/fp16 autocast logits are promoted,
float64 stays float64, so gradcheck works).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.methods.base import Method, full, hard_labels, register, result

Tensor = torch.Tensor
TINY = torch.finfo(torch.float32).tiny


def kl_rows(z_s: Tensor, z_t: Tensor, T: float | Tensor) -> Tensor:
    """T² · Σ_c p^T(z_t)_c (log p^T(z_t)_c − log p^T(z_s)_c) for every row.

    ``z_s`` [B, C] broadcasts against ``z_t`` [..., B, C]; ``T`` is a number or a tensor that
    broadcasts against the rows (e.g. [K, 1] or [K, B] per-mentor temperatures), in the student's
    computing dtype (float32, or float64 for float64 logits)."""
    T = torch.as_tensor(T, dtype=full(z_s).dtype, device=z_s.device).detach()
    t = T.unsqueeze(-1)
    log_p_s = F.log_softmax(full(z_s) / t, dim=-1)
    log_p_t = F.log_softmax(full(z_t.detach()) / t, dim=-1)
    p_t = log_p_t.exp()
    terms = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), 0.0)  # 0·log 0 = 0, not NaN
    return terms.sum(-1) * T**2


def kd_kl(z_s: Tensor, z_t: Tensor, T: float | Tensor, reduction: str = "batchmean") -> Tensor:
    """The KD term; ``reduction="batchmean"``: mean over the batch, ``"none"``: [B]."""
    rows = kl_rows(z_s, z_t, T)
    if reduction == "none":
        return rows
    if reduction == "batchmean":
        return rows.mean()
    raise ValueError(f"kd_kl: reduction must be 'batchmean' or 'none', got {reduction!r}")


def sampled_kd_loss(z_s: Tensor, index: Tensor, weight: Tensor, T: float = 1.0, *,
                    teacher_entropy: Tensor | None = None, reduction: str = "batchmean") -> Tensor:
    """T² · Σ_j weight_j · (−log p^T(z_s)_{index_j}) per row [, − T² · teacher_entropy].

    ``index`` [B, k]: classes drawn with replacement from the teacher's p^T (a sampled store at
    temperature T: the distinct classes), ``weight`` [B, k]: their counts / k (0 for padding).
    The expectation over the draws is T² · CE(p^T(z_t), p^T(z_s)), so the value and its gradient
    w.r.t. ``z_s`` are unbiased estimates of those of ``kd_kl`` (which differs by the constant
    T² · H(p^T(z_t))); with ``teacher_entropy`` [B] = H(p^T(z_t)) the value estimates ``kd_kl`` itself.
    """
    log_p_s = F.log_softmax(full(z_s) / T, dim=-1)
    w = full(weight.detach()).to(log_p_s.dtype)
    rows = -(w * log_p_s.gather(-1, index.long())).sum(-1) * T**2
    if teacher_entropy is not None:
        rows = rows - full(teacher_entropy.detach()) * T**2
    if reduction == "none":
        return rows
    if reduction == "batchmean":
        return rows.mean()
    raise ValueError(f"sampled_kd_loss: reduction must be 'batchmean' or 'none', got {reduction!r}")


def confidence_from_entropy(entropy: Tensor, num_classes: int) -> Tensor:
    """w = 1 − H / log C, clipped to [0, 1] against rounding, without gradient."""
    if num_classes < 2:
        raise ValueError(f"teacher confidence needs at least 2 classes, got {num_classes}")
    return (1.0 - full(entropy.detach()) / math.log(num_classes)).clamp(0.0, 1.0)


def entropy(z: Tensor) -> Tensor:
    """H(softmax(z)) in nats at T = 1, per row: ``z`` [..., C] -> [...]."""
    log_p = F.log_softmax(full(z), dim=-1)
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, 0.0).sum(-1)


@torch.no_grad()
def teacher_confidence(z_t: Tensor) -> Tensor:
    """Uncertainty-aware paper eq. 1–2: w = 1 − H(softmax(z_t)) / log C per sample (T = 1)."""
    return confidence_from_entropy(entropy(z_t), z_t.shape[-1])


def gt_log_prob(z: Tensor, y: Tensor) -> Tensor:
    """log softmax(z)[y] at T = 1; ``z`` [..., B, C], ``y`` [B] -> [..., B]."""
    log_p = F.log_softmax(full(z), dim=-1)
    index = y.long().expand(z.shape[:-1]).unsqueeze(-1)
    return log_p.gather(-1, index).squeeze(-1)


def gt_prob(z: Tensor, y: Tensor) -> Tensor:
    """p_gt(z, y) = softmax(z)[y] at T = 1."""
    return gt_log_prob(z, y).exp()


def mentor_log_pgt(z_m: Tensor, y: Tensor, p_gt: Tensor | None) -> Tensor:
    """log p_gt of every mentor [K, B], without gradient: from the cached exact ``p_gt`` when
    given (the cache computes it from the full-precision logits), else from the logits."""
    if p_gt is not None:
        return full(p_gt.detach()).clamp_min(TINY).log()
    return gt_log_prob(z_m.detach(), y)


def kd_parts(z_s: Tensor, z_t: Tensor, y: Tensor, T: float = 4.0, w_ce: float = 0.5, w_kd: float = 0.5) -> dict:
    ce = F.cross_entropy(full(z_s), hard_labels(y))
    kd = kd_kl(z_s, z_t, T)
    return {"loss": w_ce * ce + w_kd * kd, "ce": ce, "kd": kd}


def kd_loss(z_s: Tensor, z_t: Tensor, y: Tensor, T: float = 4.0, w_ce: float = 0.5, w_kd: float = 0.5) -> Tensor:
    """Hinton KD: w_ce · CE(z_s, y) + w_kd · kd_kl(z_s, z_t, T)."""
    return kd_parts(z_s, z_t, y, T, w_ce, w_kd)["loss"]


def uncertainty_parts(
    z_s: Tensor, z_t: Tensor, y: Tensor, T: float = 4.0, alpha: float = 0.5, beta: float = 0.5, *, entropy: Tensor | None = None
) -> dict:
    w = teacher_confidence(z_t) if entropy is None else confidence_from_entropy(entropy, z_t.shape[-1])
    ce = F.cross_entropy(full(z_s), hard_labels(y))
    kd = (w * kl_rows(z_s, z_t, T)).mean()
    return {"loss": alpha * ce + beta * kd, "ce": ce, "kd": kd, "confidence": w.mean()}


def uncertainty_kd_loss(
    z_s: Tensor, z_t: Tensor, y: Tensor, T: float = 4.0, alpha: float = 0.5, beta: float = 0.5, *, entropy: Tensor | None = None
) -> Tensor:
    """α · CE + β · mean_i[w_i · kd_kl_i(z_s, z_t, T)], w the teacher confidence (eq. 3–5).

    ``entropy`` [B]: the teacher's exact entropy (from the cache); when None it is computed from z_t."""
    return uncertainty_parts(z_s, z_t, y, T, alpha, beta, entropy=entropy)["loss"]


@register("nokd")
class NoKD(Method):
    """CE only. Reads no targets and takes no mentor stores (given any, it says so rather than ignore them)."""

    mixed_labels = True
    min_mentors = 0
    max_mentors = 0
    needs = frozenset()
    loss_fn = staticmethod(F.cross_entropy)  # plain CE: torch's function, so pipeline.losses has none

    def compute(self, students, targets, y):
        ce = F.cross_entropy(full(students[0]), y)
        return result(ce, {"ce": ce})


@register("kd")
class KD(Method):
    """Hinton KD from mentor 0 (the teacher); more than one mentor store is a UserError."""

    mixed_labels = True
    max_mentors = 1
    defaults = {"T": 4.0, "w_ce": 0.5, "w_kd": 0.5}
    sampled_option = "T"
    loss_fn = staticmethod(kd_loss)

    def compute(self, students, targets, y):
        parts = kd_parts(students[0], targets["logits"][0], y, **self.options)
        return result(parts["loss"], parts)


@register("uncertainty")
class Uncertainty(Method):
    """Confidence-weighted KD from mentor 0; w from the cached exact entropy when present."""

    mixed_labels = True
    max_mentors = 1
    needs = frozenset({"logits", "entropy"})
    defaults = {"T": 4.0, "alpha": 0.5, "beta": 0.5}
    loss_fn = staticmethod(uncertainty_kd_loss)
    sampled_option = "T"

    def compute(self, students, targets, y):
        entropy = targets["entropy"][0] if "entropy" in targets else None
        parts = uncertainty_parts(students[0], targets["logits"][0], y, **self.options, entropy=entropy)
        return result(parts["loss"], parts)
