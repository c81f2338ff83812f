"""Several teachers at once: aver (ClassroomKD eq. 12) and the confidence-aware methods 1–3.

Formulas: docs/methods.md (aver, ca-wkd, alpha-guided, adaptive-alpha). ``z_m`` is
[K, B, C]. Per-mentor p_gt comes from the cached exact values when given (``p_gt=`` [K, B]),
otherwise from the logits; every weight and α is computed without gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.methods.base import Method, full, register, result
from pipeline.methods.kd import gt_log_prob, kl_rows, mentor_log_pgt

Tensor = torch.Tensor


def aver_loss(z_s: Tensor, z_m: Tensor, y: Tensor, T: float = 4.0) -> Tensor:
    """CE + Σ_k kd_kl(z_s, z_k, T): a sum over mentors, as ClassroomKD eq. 12 writes it."""
    return F.cross_entropy(full(z_s), y.long()) + kl_rows(z_s, z_m, T).mean(-1).sum()


def _check_two(z_m: Tensor, name: str) -> None:
    if z_m.shape[0] < 2:
        raise UserError(f"{name} weighs mentors against each other and needs at least 2 mentors, got {z_m.shape[0]}")


@torch.no_grad()
def ca_weights(z_m: Tensor, y: Tensor, *, p_gt: Tensor | None = None) -> Tensor:
    """w_k,i = (1 − softmax_k(CE_·,i)_k) / (K − 1), [K, B]; CE_k,i = −log p_gt(z_k,i, y_i)."""
    ce = -mentor_log_pgt(z_m, y, p_gt)
    return (1.0 - torch.softmax(ce, dim=0)) / (z_m.shape[0] - 1)


def ca_wkd_parts(z_s, z_m, y, T=4.0, *, reference_code=False, p_gt=None, name="ca-wkd") -> dict:
    _check_two(z_m, name)
    w = ca_weights(z_m, y, p_gt=p_gt)
    kd = (w * kl_rows(z_s, z_m, T)).sum(0).mean()
    if reference_code:  # the public code divides the weighted KD sum by K
        kd = kd / z_m.shape[0]
    ce = F.cross_entropy(full(z_s), y.long())
    return {"loss": ce + kd, "ce": ce, "kd": kd, "weight": w.mean(-1)}


def ca_wkd_loss(z_s: Tensor, z_m: Tensor, y: Tensor, T: float = 4.0, *, reference_code: bool = False, p_gt: Tensor | None = None) -> Tensor:
    """Confidence-aware method 1: CE + mean_i Σ_k w_k,i · kd_kl_i(z_s, z_k, T); needs K ≥ 2."""
    return ca_wkd_parts(z_s, z_m, y, T, reference_code=reference_code, p_gt=p_gt)["loss"]


def alpha_guided_parts(z_s, z_m, y, T=4.0, gamma=2.0, theta=0.3, *, confidence="gt", reference_code=False, p_gt=None) -> dict:
    if confidence not in ("gt", "max"):
        raise UserError(f"alpha-guided: confidence must be 'gt' or 'max', got {confidence!r}")
    parts = ca_wkd_parts(z_s, z_m, y, T, reference_code=reference_code, p_gt=p_gt, name="alpha-guided")
    with torch.no_grad():
        mean_logits = full(z_m.detach()).mean(0)
        if confidence == "gt":
            conf = gt_log_prob(mean_logits, y).exp().mean()
        else:
            conf = torch.softmax(mean_logits, dim=-1).amax(-1).mean()
        alpha = torch.sigmoid(gamma * (conf - theta))
    loss = alpha * parts["kd"] + (1 - alpha) * parts["ce"]
    return {**parts, "loss": loss, "alpha": alpha, "confidence": conf}


def alpha_guided_loss(
    z_s: Tensor, z_m: Tensor, y: Tensor, T: float = 4.0, gamma: float = 2.0, theta: float = 0.3, *,
    confidence: str = "gt", reference_code: bool = False, p_gt: Tensor | None = None,
) -> Tensor:
    """Method 2: α·L_KL + (1 − α)·CE, L_KL as in ca-wkd, α = sigmoid(γ·(conf − θ)), conf the
    batch mean of p_gt(mean_k z_k, y) (``confidence="max"``: of the max probability)."""
    return alpha_guided_parts(z_s, z_m, y, T, gamma, theta, confidence=confidence, reference_code=reference_code, p_gt=p_gt)["loss"]


def adaptive_alpha_parts(z_s, z_m, y, T=4.0, *, p_gt=None) -> dict:
    with torch.no_grad():
        best_pgt, best = mentor_log_pgt(z_m, y, p_gt).exp().max(dim=0)
        alpha = best_pgt.mean()
        index = best.view(1, -1, 1).expand(1, *z_m.shape[1:])
        z_best = z_m.detach().gather(0, index).squeeze(0)
    kd = kl_rows(z_s, z_best, T).mean()
    ce = F.cross_entropy(full(z_s), y.long())
    chosen = F.one_hot(best, z_m.shape[0]).float().mean(0)
    return {"loss": alpha * kd + (1 - alpha) * ce, "ce": ce, "kd": kd, "alpha": alpha, "chosen": chosen}


def adaptive_alpha_loss(z_s: Tensor, z_m: Tensor, y: Tensor, T: float = 4.0, *, p_gt: Tensor | None = None) -> Tensor:
    """Method 3: per sample the mentor k*_i with the highest p_gt teaches; α = mean_i max_k p_gt;
    L = α · mean_i kd_kl_i(z_s, z_{k*_i}, T) + (1 − α) · CE."""
    return adaptive_alpha_parts(z_s, z_m, y, T, p_gt=p_gt)["loss"]


@register("aver")
class Aver(Method):
    defaults = {"T": 4.0}
    loss_fn = staticmethod(aver_loss)
    sampled_option = "T"

    def compute(self, students, targets, y):
        ce = F.cross_entropy(full(students[0]), y)
        kd = kl_rows(students[0], targets["logits"], self.options["T"]).mean(-1)
        return result(ce + kd.sum(), {"ce": ce, "kd": kd.sum(), "kd_mentor": kd})


@register("ca-wkd")
class CAWKD(Method):
    min_mentors = 2
    needs = frozenset({"logits", "p_gt"})
    defaults = {"T": 4.0, "reference_code": False}
    loss_fn = staticmethod(ca_wkd_loss)
    sampled_option = "T"

    def compute(self, students, targets, y):
        parts = ca_wkd_parts(students[0], targets["logits"], y, **self.options, p_gt=targets.get("p_gt"))
        return result(parts["loss"], parts)


@register("alpha-guided")
class AlphaGuided(Method):
    min_mentors = 2
    needs = frozenset({"logits", "p_gt"})
    defaults = {"T": 4.0, "gamma": 2.0, "theta": 0.3, "confidence": "gt", "reference_code": False}
    choices = {"confidence": ("gt", "max")}
    loss_fn = staticmethod(alpha_guided_loss)

    def compute(self, students, targets, y):
        parts = alpha_guided_parts(students[0], targets["logits"], y, **self.options, p_gt=targets.get("p_gt"))
        return result(parts["loss"], parts)


@register("adaptive-alpha")
class AdaptiveAlpha(Method):
    needs = frozenset({"logits", "p_gt"})
    defaults = {"T": 4.0}
    loss_fn = staticmethod(adaptive_alpha_loss)
    sampled_option = "T"

    def compute(self, students, targets, y):
        parts = adaptive_alpha_parts(students[0], targets["logits"], y, **self.options, p_gt=targets.get("p_gt"))
        return result(parts["loss"], parts)
