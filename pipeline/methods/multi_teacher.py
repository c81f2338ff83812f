"""Several teachers at once: aver (ClassroomKD eq. 12) and the confidence-aware methods 1–3.

Formulas: docs/methods.md (aver, ca-wkd, alpha-guided, adaptive-alpha). ``z_m`` is
[K, B, C]. Per-mentor p_gt comes from the cached exact values when given (``p_gt=`` [K, B]),
otherwise from the logits; every weight and α is computed without gradient.

``reference_code`` (ca-wkd, alpha-guided) picks a public code to reproduce instead of the
report's formulas: "ca-mkd" (``True``: the same) divides the weighted KD sum by K as Rorozhl/CA-MKD
``helper/loops.py`` does; "kd-thesis" is the report's own code, Jeen-Freecs/kd_thesis
``src/models/kd_module.py`` (batch-mean weights times batch-mean KD terms; method 2's per-sample gate
and its CE weight 0.5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.methods.base import Method, full, hard_labels, register, result
from pipeline.methods.kd import gt_log_prob, kl_rows, mentor_log_pgt

Tensor = torch.Tensor
REFERENCE_CODES = ("ca-mkd", "kd-thesis")
KD_THESIS_CE_WEIGHT = 0.5  # kd_thesis method 2: (1 − gate) · alpha · CE, alpha 0.5 in its code and configs


def aver_loss(z_s: Tensor, z_m: Tensor, y: Tensor, T: float = 4.0) -> Tensor:
    """CE + Σ_k kd_kl(z_s, z_k, T): a sum over mentors, as ClassroomKD eq. 12 writes it."""
    return F.cross_entropy(full(z_s), hard_labels(y)) + kl_rows(z_s, z_m, T).mean(-1).sum()


def _check_two(z_m: Tensor, name: str) -> None:
    if z_m.shape[0] < 2:
        raise UserError(f"{name} weighs mentors against each other and needs at least 2 mentors, got {z_m.shape[0]}")


def reference_variant(value, name: str) -> str | None:
    """The public code ``reference_code`` reproduces: None (the report's formulas), "ca-mkd" or "kd-thesis"."""
    if value is False:
        return None
    if value is True:
        return "ca-mkd"
    if isinstance(value, str) and value in REFERENCE_CODES:
        return value
    raise UserError(f"{name}: option 'reference_code' must be true or false, or one of "
                    f"{', '.join(repr(v) for v in REFERENCE_CODES)}, got {value!r}")


@torch.no_grad()
def ca_weights(z_m: Tensor, y: Tensor, *, p_gt: Tensor | None = None) -> Tensor:
    """w_k,i = (1 − softmax_k(CE_·,i)_k) / (K − 1), [K, B]; CE_k,i = −log p_gt(z_k,i, y_i)."""
    ce = -mentor_log_pgt(z_m, y, p_gt)
    return (1.0 - torch.softmax(ce, dim=0)) / (z_m.shape[0] - 1)


def ca_wkd_parts(z_s, z_m, y, T=4.0, *, reference_code=False, p_gt=None, name="ca-wkd") -> dict:
    variant = reference_variant(reference_code, name)
    _check_two(z_m, name)
    w = ca_weights(z_m, y, p_gt=p_gt)
    if variant == "kd-thesis":  # Σ_k mean_i(w_k,i) · mean_i(kd_kl_k,i): a product of batch means
        kd = (w.mean(-1) * kl_rows(z_s, z_m, T).mean(-1)).sum()
    else:
        kd = (w * kl_rows(z_s, z_m, T)).sum(0).mean()
    if variant == "ca-mkd":  # CA-MKD divides the weighted KD sum by K
        kd = kd / z_m.shape[0]
    ce = F.cross_entropy(full(z_s), y.long())
    return {"loss": ce + kd, "ce": ce, "kd": kd, "weight": w.mean(-1)}


def ca_wkd_loss(z_s: Tensor, z_m: Tensor, y: Tensor, T: float = 4.0, *, reference_code: bool | str = False,
                p_gt: Tensor | None = None) -> Tensor:
    """Confidence-aware method 1: CE + mean_i Σ_k w_k,i · kd_kl_i(z_s, z_k, T); needs K ≥ 2.

    ``reference_code="ca-mkd"`` (or True): the KD sum divided by K; ``"kd-thesis"``:
    CE + Σ_k mean_i(w_k,i) · mean_i(kd_kl_k,i)."""
    return ca_wkd_parts(z_s, z_m, y, T, reference_code=reference_code, p_gt=p_gt)["loss"]


def alpha_guided_parts(z_s, z_m, y, T=4.0, gamma=2.0, theta=0.3, *, confidence="gt", reference_code=False, p_gt=None) -> dict:
    variant = _check_alpha_guided(confidence, reference_code)
    parts = ca_wkd_parts(z_s, z_m, y, T, reference_code=reference_code, p_gt=p_gt, name="alpha-guided")
    if variant == "kd-thesis":  # gate = mean_i sigmoid(γ(mean_k p_gt(z_k, y)_i − θ)), CE weight (1 − gate) · 0.5
        with torch.no_grad():
            conf_rows = mentor_log_pgt(z_m, y, p_gt).exp().mean(0)
            gate = torch.sigmoid(gamma * (conf_rows - theta)).mean()
        loss = gate * parts["kd"] + (1 - gate) * KD_THESIS_CE_WEIGHT * parts["ce"]
        return {**parts, "loss": loss, "alpha": gate, "confidence": conf_rows.mean()}
    with torch.no_grad():
        mean_logits = full(z_m.detach()).mean(0)
        if confidence == "gt":
            conf = gt_log_prob(mean_logits, y).exp().mean()
        else:
            conf = torch.softmax(mean_logits, dim=-1).amax(-1).mean()
        alpha = torch.sigmoid(gamma * (conf - theta))
    loss = alpha * parts["kd"] + (1 - alpha) * parts["ce"]
    return {**parts, "loss": loss, "alpha": alpha, "confidence": conf}


def _check_alpha_guided(confidence, reference_code) -> str | None:
    if confidence not in ("gt", "max"):
        raise UserError(f"alpha-guided: confidence must be 'gt' or 'max', got {confidence!r}")
    variant = reference_variant(reference_code, "alpha-guided")
    if variant == "kd-thesis" and confidence != "gt":
        raise UserError("alpha-guided: option reference_code='kd-thesis' gates on the mentors' p_gt, as that "
                        f"code does; expected confidence='gt', got {confidence!r}")
    return variant


def alpha_guided_loss(
    z_s: Tensor, z_m: Tensor, y: Tensor, T: float = 4.0, gamma: float = 2.0, theta: float = 0.3, *,
    confidence: str = "gt", reference_code: bool | str = False, p_gt: Tensor | None = None,
) -> Tensor:
    """Method 2: α·L_KL + (1 − α)·CE, L_KL as in ca-wkd, α = sigmoid(γ·(conf − θ)), conf the
    batch mean of p_gt(mean_k z_k, y) (``confidence="max"``: of the max probability).

    ``reference_code="kd-thesis"``: gate·L_KL + (1 − gate)·0.5·CE with L_KL as ca-wkd's kd-thesis
    variant and gate = mean_i sigmoid(γ·(mean_k p_gt(z_k, y)_i − θ))."""
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
    mixed_labels = True
    defaults = {"T": 4.0}
    loss_fn = staticmethod(aver_loss)
    sampled_option = "T"

    def compute(self, students, targets, y):
        ce = F.cross_entropy(full(students[0]), y)
        kd = kl_rows(students[0], targets["logits"], self.options["T"]).mean(-1)
        return result(ce + kd.sum(), {"ce": ce, "kd": kd.sum(), "kd_mentor": kd})


class _ReferenceCodeOption(Method):
    """A method whose option ``reference_code`` takes true, false, "ca-mkd" or "kd-thesis"."""

    def _check_option(self, key, value):
        if key == "reference_code":
            reference_variant(value, f"method {self.name!r}")
            return value
        return super()._check_option(key, value)


@register("ca-wkd")
class CAWKD(_ReferenceCodeOption):
    min_mentors = 2
    needs = frozenset({"logits", "p_gt"})
    defaults = {"T": 4.0, "reference_code": False}
    loss_fn = staticmethod(ca_wkd_loss)
    sampled_option = "T"

    def compute(self, students, targets, y):
        parts = ca_wkd_parts(students[0], targets["logits"], y, **self.options, p_gt=targets.get("p_gt"))
        return result(parts["loss"], parts)


@register("alpha-guided")
class AlphaGuided(_ReferenceCodeOption):
    min_mentors = 2
    needs = frozenset({"logits", "p_gt"})
    defaults = {"T": 4.0, "gamma": 2.0, "theta": 0.3, "confidence": "gt", "reference_code": False}
    choices = {"confidence": ("gt", "max")}
    loss_fn = staticmethod(alpha_guided_loss)

    def __init__(self, **options):
        super().__init__(**options)
        _check_alpha_guided(self.options["confidence"], self.options["reference_code"])

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
