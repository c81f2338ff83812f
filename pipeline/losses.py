"""The public loss API: pure functions, logits in, scalar out.

    from pipeline.losses import kd_loss, classroom_loss
    loss = kd_loss(z_s, z_t, y, T=4.0)
    loss, info = classroom_loss(z_s, z_m, y, tau=12.0)     # z_m: [K, B, C], mentor 0 = teacher
    loss = sampled_kd_loss(z_s, index, weight, T=1.0)      # a sampled store's classes and count / k

Formulas: docs/methods.md. Options are keyword-only arguments. Mentor/teacher logits never receive
gradient. The implementations live in ``pipeline/methods/<family>.py``; each registered method
names the function it computes in its ``loss_fn`` (``METHODS.get("kd").loss_fn is kd_loss``), and
the method tests check the two agree, so a new method's function is exported here as well.
"""

from pipeline.methods.classroom import classroom_loss
from pipeline.methods.kd import kd_kl, kd_loss, sampled_kd_loss, teacher_confidence, uncertainty_kd_loss
from pipeline.methods.multi_teacher import adaptive_alpha_loss, alpha_guided_loss, aver_loss, ca_wkd_loss
from pipeline.methods.peers import dml_losses, dual_student_losses
from pipeline.methods.teacher_losses import mse_teacher_loss

__all__ = [
    "kd_kl",
    "sampled_kd_loss",
    "teacher_confidence",
    "kd_loss",
    "uncertainty_kd_loss",
    "dual_student_losses",
    "dml_losses",
    "aver_loss",
    "ca_wkd_loss",
    "alpha_guided_loss",
    "adaptive_alpha_loss",
    "classroom_loss",
    "mse_teacher_loss",
]
