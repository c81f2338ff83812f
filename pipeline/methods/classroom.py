"""ClassroomKD (paper eq. 1–11, Algorithm 1): rank the classroom, activate the mentors ranked
above the student, distil from each at a temperature that grows with the rank gap.

Formulas and options: docs/methods.md, section "classroom". Mentor 0 is the teacher.
Everything but the final loss terms runs under no_grad. The options that reproduce the public
code, saifkhichi96/classroom-kd ``lib/models/losses/ask_kd_loss_new.py`` (rank_mean="geometric",
active_if="ge", alpha_source="weight", round_ranks=2), are off by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.methods.base import Method, full, register, result
from pipeline.methods.kd import TINY, gt_log_prob, kd_kl, kl_rows, mentor_log_pgt

Tensor = torch.Tensor

CHOICES = {
    "rank_mean": ("arithmetic", "geometric"),
    "active_if": ("gt", "ge"),
    "alpha_source": ("rank", "weight"),
    "granularity": ("batch", "sample"),
    "ranking": ("weight", "position"),
}


def _check_round(value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise UserError(f"classroom: option 'round_ranks' must be empty (no rounding) or an integer >= 0, got {value!r}")


@torch.no_grad()
def classroom_ranks(z_s, z_m, y, *, tau, rank_mean, active_if, alpha_source, round_ranks, granularity, ranking, p_gt=None):
    """Ranks, active mask, temperatures and α. Row 0 of the classroom is the student.

    Shapes: per batch, mentors [K] and student []; per sample, [K, B] and [B]."""
    if p_gt is None:  # one pass over the classroom, so a mentor equal to the student ties exactly
        log_q = gt_log_prob(torch.cat([full(z_s.detach())[None], full(z_m.detach())]), y)  # [K+1, B]
    else:
        log_q = torch.cat([gt_log_prob(z_s.detach(), y)[None], mentor_log_pgt(z_m, y, p_gt)])
    if granularity == "sample":
        w = log_q.exp()
    elif rank_mean == "arithmetic":  # eq. 4: batch mean of p_gt
        w = log_q.exp().mean(1, keepdim=True)
    else:  # the public code: exp(−CE_batch), the geometric mean of p_gt
        w = log_q.mean(1, keepdim=True).exp()
    if ranking == "weight":  # eq. 5, λ = |M| = K
        total = w.sum(0, keepdim=True).clamp_min(TINY)
        if round_ranks is None:
            r = z_m.shape[0] * w / total
        else:  # the public code rounds the share w / Σw, then scales it by K
            r = z_m.shape[0] * torch.round(w / total, decimals=round_ranks)
    else:  # Method B: 0.1 · position (1, 2, ...) in Algorithm 1's stable ascending sort, student first
        r = 0.1 * (torch.argsort(torch.argsort(w, dim=0, stable=True), dim=0) + 1).to(w.dtype)
        if round_ranks is not None:
            r = torch.round(r, decimals=round_ranks)
    r_s, r_m = r[0], r[1:]
    active = r_m > r_s if active_if == "gt" else r_m >= r_s
    temperature = 1.0 + (r_m - r_s).abs() / r_m.clamp_min(TINY) * tau  # eq. 8–9
    alpha = r_s if alpha_source == "rank" else w[0]
    squeeze = (lambda t: t.squeeze(-1)) if granularity == "batch" else (lambda t: t)
    return {
        "rank": squeeze(r_m), "student_rank": squeeze(r_s), "active": squeeze(active),
        "temperature": squeeze(temperature), "alpha": squeeze(alpha),
    }


def classroom_loss(
    z_s: Tensor, z_m: Tensor, y: Tensor, tau: float = 12.0, beta: float = 1.0, delta: float = 0.0, *,
    rank_mean: str = "arithmetic", active_if: str = "gt", alpha_source: str = "rank", round_ranks: int | None = None,
    granularity: str = "batch", ranking: str = "weight", p_gt: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = δ·(CE + kd_kl(z_s, z_t, 1)) + α·CE + β·Σ_{m active} r^m·kd_kl(z_s, z_m, τ^m), α = r^s.

    ``p_gt`` [K, B]: the mentors' exact p_gt (from the cache); when None it comes from z_m.
    ``info``: "rank", "active", "temperature" per mentor ([K], or [K, B] with granularity="sample";
    the temperature is given for every mentor and used where active),
    "student_rank" and "alpha" ([] or [B]), "ce", "kd" (batch mean of Σ_{m active} r^m·kd_kl, before β)."""
    options = {"rank_mean": rank_mean, "active_if": active_if, "alpha_source": alpha_source,
               "granularity": granularity, "ranking": ranking}
    for key, value in options.items():
        if value not in CHOICES[key]:
            raise UserError(f"classroom: option {key!r} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    _check_round(round_ranks)
    y = y.long()
    info = classroom_ranks(z_s, z_m, y, tau=tau, round_ranks=round_ranks, p_gt=p_gt, **options)
    ce_rows = F.cross_entropy(full(z_s), y, reduction="none")
    shape = (-1, 1) if granularity == "batch" else (z_m.shape[0], -1)  # per-mentor values against [K, B] rows
    active = info["active"].reshape(shape)
    # An inactive mentor's term is dropped; its temperature (huge when its rank is ~0, a confidently
    # wrong mentor) would still make the dropped branch's gradient NaN, so it is computed at T = 1.
    temperature = torch.where(active, info["temperature"].reshape(shape), 1.0)
    kd_rows = kl_rows(z_s, z_m, temperature)
    weighted = torch.where(active, info["rank"].reshape(shape) * kd_rows, 0.0).sum(0)
    loss = (info["alpha"] * ce_rows + beta * weighted).mean()
    if delta:
        loss = loss + delta * (ce_rows.mean() + kd_kl(z_s, z_m[0], 1.0))
    return loss, {**info, "ce": ce_rows.mean().detach(), "kd": weighted.mean().detach()}


@register("classroom")
class ClassroomKD(Method):
    """ClassroomKD over the teacher (mentor 0) and its peers. Logs per-mentor [K] "rank",
    "active", "temperature" (with granularity="sample": their batch means, active as a fraction)."""

    needs = frozenset({"logits", "p_gt"})
    defaults = {"tau": 12.0, "beta": 1.0, "delta": 0.0, "rank_mean": "arithmetic", "active_if": "gt",
                "alpha_source": "rank", "round_ranks": None, "granularity": "batch", "ranking": "weight"}
    choices = CHOICES
    loss_fn = staticmethod(classroom_loss)

    @classmethod
    def public_losses(cls, students, targets, y, options):
        return (classroom_loss(students[0], targets["logits"], y, **options)[0],)  # drop the info dict

    def _check_option(self, key, value):
        if key == "round_ranks":
            _check_round(value)
            return value
        return super()._check_option(key, value)

    def compute(self, students, targets, y):
        loss, info = classroom_loss(students[0], targets["logits"], y, **self.options, p_gt=targets.get("p_gt"))
        per_sample = self.options["granularity"] == "sample"
        mean = (lambda t: t.float().mean(-1)) if per_sample else (lambda t: t.float())
        parts = {key: mean(info[key]) for key in ("rank", "active", "temperature", "student_rank", "alpha")}
        parts.update(ce=info["ce"], kd=info["kd"], num_active=mean(info["active"]).sum())
        return result(loss, parts)
