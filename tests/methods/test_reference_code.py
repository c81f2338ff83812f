"""The option sets that reproduce the methods' public code, against implementations written here
from a description of what that code computes (plain numpy, float64, one sample at a time):

- ClassroomKD, saifkhichi96/classroom-kd ``lib/models/losses/ask_kd_loss_new.py``: weights
  exp(−CE_batch), ranks round(w / Σw, 2) · K, mentors with r ≥ r_s active, temperature
  1 + |r − r_s| / max(r, r_s) · τ, loss w_s · CE + Σ_active r · kd_kl(τ); its ``--no_ask`` AVER
  is CE + Σ_k kd_kl at T = 1.
- confidence-aware method 1 and 2, Jeen-Freecs/kd_thesis ``src/models/kd_module.py``: method 1
  CE + Σ_k mean_i(w_k,i) · mean_i(kd_kl_k,i); method 2 gate · that KD term + (1 − gate) · 0.5 · CE,
  gate = mean_i sigmoid(γ · (mean_k p_gt,k,i − θ)).
- CA-MKD, Rorozhl/CA-MKD ``helper/loops.py``: CE + Σ_k,i w_k,i · kd_kl_k,i / (B · K).

Each case runs on ordinary and extreme logits, in float32 and float64, and checks that the
rejected variant (the rounding of K · w / Σw; the mean of products) is further off than the tolerance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline import losses
from pipeline.errors import UserError
from pipeline.methods import create_method
from tests.methods._methods_reference import ce, ce_row, kd_kl, kl_row, log_softmax, p_gt_row

CODE_OPTIONS = {"rank_mean": "geometric", "active_if": "ge", "alpha_source": "weight", "round_ranks": 2}
# float64 agrees to rounding; float32 to its rounding of logits up to ~300 and temperatures up to 13
TOL = {torch.float64: dict(rel=1e-9, abs=1e-9), torch.float32: dict(rel=2e-5, abs=1e-5)}


def case(seed, *, K=6, B=64, C=10, scale=1.0, dtype=torch.float32):
    """Student [B, C], mentors [K, B, C] of graded strength (mentor 0 the strongest), labels [B];
    ``scale`` multiplies every logit (30: extreme, one-hot-like rows with CE in the hundreds)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (B,), generator=g)
    onehot = torch.nn.functional.one_hot(y, C).double()
    z_s = torch.randn(B, C, generator=g, dtype=torch.float64) + 0.8 * onehot
    strength = torch.linspace(3.0, 0.2, K, dtype=torch.float64).view(K, 1, 1)
    z_m = torch.randn(K, B, C, generator=g, dtype=torch.float64) * 1.5 + strength * onehot
    return (scale * z_s).to(dtype), (scale * z_m).to(dtype), y


def np_(t):
    return t.detach().double().numpy()


CASES = [dict(C=10), dict(C=100), dict(C=10, scale=30.0), dict(C=100, scale=30.0)]
CASE_IDS = ["C10", "C100", "C10-extreme", "C100-extreme"]


# ---------------------------------------------------------------- ClassroomKD


def classroom_code(zs, zm, y, tau=12.0, round_share=True):
    """ClassroomKD's public code; ``round_share=False``: ranks round(K · w / Σw, 2) instead."""
    K = len(zm)
    models = [zs] + [zm[k] for k in range(K)]  # index 0: the student
    w = [math.exp(-ce(z, y)) for z in models]
    total = sum(w)
    r = [round(v / total, 2) * K if round_share else round(K * v / total, 2) for v in w]
    loss = w[0] * ce(zs, y)
    for k in range(1, K + 1):
        if r[k] >= r[0]:
            temperature = 1.0 + abs(r[k] - r[0]) / max(r[k], r[0]) * tau if r[k] > 0 else 1.0
            loss += r[k] * kd_kl(zs, models[k], temperature)
    return loss, r[1:], r[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", CASES, ids=CASE_IDS)
def test_classroom_code_options_reproduce_the_public_code(shape, dtype):
    far = 0
    for seed in range(6):
        z_s, z_m, y = case(seed, dtype=dtype, **shape)
        loss, info = losses.classroom_loss(z_s, z_m, y, **CODE_OPTIONS)
        assert loss.dtype == dtype
        expected, ranks, student_rank = classroom_code(np_(z_s), np_(z_m), y.numpy())
        assert loss.item() == pytest.approx(expected, **TOL[dtype])
        assert info["rank"].tolist() == pytest.approx(ranks, rel=1e-6)
        assert info["student_rank"].item() == pytest.approx(student_rank, rel=1e-6)
        assert info["rank"].tolist() == pytest.approx([round(r / 6, 2) * 6 for r in info["rank"].tolist()], abs=1e-6)
        old = classroom_code(np_(z_s), np_(z_m), y.numpy(), round_share=False)[0]
        far += old != pytest.approx(expected, rel=5 * TOL[dtype]["rel"], abs=5 * TOL[dtype]["abs"])
    assert far >= 1  # rounding K · w / Σw instead is another loss, beyond the tolerance


def test_classroom_ranks_lie_on_the_codes_grid():
    # K = 6: round_ranks=2 gives multiples of 0.06 (the share rounded, then scaled), not of 0.01
    for seed in range(3):
        z_s, z_m, y = case(seed)
        info = losses.classroom_loss(z_s, z_m, y, round_ranks=2)[1]
        ranks = torch.cat([info["rank"], info["student_rank"][None]]).double()
        assert torch.allclose(ranks / 0.06, (ranks / 0.06).round(), atol=1e-4)
        exact = losses.classroom_loss(z_s, z_m, y)[1]["rank"].double()
        assert torch.allclose(info["rank"].double(), exact, atol=0.03 + 1e-6)  # the share's rounding, times K
        old = torch.round(exact, decimals=2)  # rounding K · w / Σw: off the grid
        assert not torch.allclose(old / 0.06, (old / 0.06).round(), atol=1e-4)


def test_float64_stays_float64_in_every_kl_row():
    # per-mentor temperatures in float64 are not rounded to float32 on the way into the KD rows
    z_s, z_m, y = case(1, dtype=torch.float64)
    T = torch.tensor([[1.0 / 3.0], [2.0 + 1e-9], [12.7], [4.0], [1.1], [7.3]], dtype=torch.float64)
    rows = losses.kd_kl(z_s, z_m, T, reduction="none")
    assert rows.dtype == torch.float64
    zs, zm = np_(z_s), np_(z_m)
    for k in range(6):
        expected = [kl_row(zs[i], zm[k][i], T[k, 0].item()) for i in range(len(y))]
        assert np.allclose(rows[k].numpy(), expected, rtol=1e-12, atol=1e-12)


def test_float32_temperature_stays_float32():
    z_s, z_m, y = case(2)
    t64 = torch.tensor(1.0 / 3.0, dtype=torch.float64)
    got = losses.kd_kl(z_s, z_m[0], t64, reduction="none")
    assert got.dtype == torch.float32
    assert torch.equal(got, losses.kd_kl(z_s, z_m[0], t64.float(), reduction="none"))


def aver_code(zs, zm, y):
    """ClassroomKD's --no_ask path: temperature 1 + 0 · τ = 1, CE + Σ_mentors kd_kl."""
    return ce(zs, y) + sum(kd_kl(zs, zm[k], 1.0) for k in range(len(zm)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", CASES, ids=CASE_IDS)
def test_aver_at_t1_reproduces_the_classroom_code_baseline(shape, dtype):
    z_s, z_m, y = case(3, dtype=dtype, **shape)
    expected = aver_code(np_(z_s), np_(z_m), y.numpy())
    assert losses.aver_loss(z_s, z_m, y, T=1.0).item() == pytest.approx(expected, **TOL[dtype])
    assert losses.aver_loss(z_s, z_m, y).item() != pytest.approx(expected, rel=1e-3)  # the default T = 4


# ---------------------------------------------------------------- confidence-aware


def weights_row(zm, y, i):
    """(1 − exp(CE_k) / Σ_j exp(CE_j)) / (K − 1), computed as a softmax over the CEs (stable)."""
    ces = np.array([ce_row(zm[k][i], y[i]) for k in range(len(zm))])
    return (1.0 - np.exp(log_softmax(ces))) / (len(zm) - 1)


def kd_thesis_kd(zs, zm, y, T):
    K, B = len(zm), len(y)
    w = np.array([weights_row(zm, y, i) for i in range(B)])  # [B, K]
    return sum(np.mean(w[:, k]) * np.mean([kl_row(zs[i], zm[k][i], T) for i in range(B)]) for k in range(K))


def mean_of_products_kd(zs, zm, y, T):
    K, B = len(zm), len(y)
    return np.mean([sum(weights_row(zm, y, i)[k] * kl_row(zs[i], zm[k][i], T) for k in range(K)) for i in range(B)])


def kd_thesis_method1(zs, zm, y, T=4.0):
    return ce(zs, y) + kd_thesis_kd(zs, zm, y, T)


def kd_thesis_method2(zs, zm, y, T=4.0, gamma=2.0, theta=0.3):
    conf = [np.mean([p_gt_row(zm[k][i], y[i]) for k in range(len(zm))]) for i in range(len(y))]
    gate = np.mean([1.0 / (1.0 + math.exp(-gamma * (c - theta))) for c in conf])
    return gate * kd_thesis_kd(zs, zm, y, T) + (1.0 - gate) * 0.5 * ce(zs, y)


def ca_mkd(zs, zm, y, T=4.0):
    K, B = len(zm), len(y)
    total = sum(weights_row(zm, y, i)[k] * kl_row(zs[i], zm[k][i], T) for i in range(B) for k in range(K))
    return ce(zs, y) + total / (B * K)


def _kd_thesis_case(seed, dtype, shape):
    z_s, z_m, y = case(seed, K=3, B=32, dtype=dtype, **shape)
    return z_s, z_m, y, np_(z_s), np_(z_m), y.numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", CASES, ids=CASE_IDS)
def test_ca_wkd_kd_thesis_is_a_product_of_batch_means(shape, dtype):
    z_s, z_m, y, zs, zm, yy = _kd_thesis_case(4, dtype, shape)
    expected = kd_thesis_method1(zs, zm, yy, 2.0)
    got = losses.ca_wkd_loss(z_s, z_m, y, 2.0, reference_code="kd-thesis")
    assert got.dtype == dtype and got.item() == pytest.approx(expected, **TOL[dtype])
    if "scale" not in shape:  # a cache's float32 p_gt underflows for extreme logits (CE > 87)
        p_gt = torch.softmax(z_m.double(), -1).gather(-1, y.expand(3, -1).unsqueeze(-1)).squeeze(-1).float()
        cached = losses.ca_wkd_loss(z_s, z_m, y, 2.0, reference_code="kd-thesis", p_gt=p_gt)
        assert cached.item() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    paper = ce(zs, yy) + mean_of_products_kd(zs, zm, yy, 2.0)
    assert paper != pytest.approx(expected, rel=100 * TOL[dtype]["rel"])  # the mean of products is another loss
    assert losses.ca_wkd_loss(z_s, z_m, y, 2.0).item() == pytest.approx(paper, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", CASES, ids=CASE_IDS)
def test_alpha_guided_kd_thesis_gate_and_ce_weight(shape, dtype):
    z_s, z_m, y, zs, zm, yy = _kd_thesis_case(5, dtype, shape)
    expected = kd_thesis_method2(zs, zm, yy, 4.0, 5.0, 0.5)
    got = losses.alpha_guided_loss(z_s, z_m, y, 4.0, 5.0, 0.5, reference_code="kd-thesis")
    assert got.dtype == dtype and got.item() == pytest.approx(expected, **TOL[dtype])
    default = losses.alpha_guided_loss(z_s, z_m, y, 4.0, 5.0, 0.5)
    assert default.item() != pytest.approx(expected, rel=100 * TOL[dtype]["rel"])


@pytest.mark.parametrize("reference_code", [True, "ca-mkd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", CASES, ids=CASE_IDS)
def test_ca_mkd_divides_by_k(shape, dtype, reference_code):
    z_s, z_m, y, zs, zm, yy = _kd_thesis_case(6, dtype, shape)
    got = losses.ca_wkd_loss(z_s, z_m, y, reference_code=reference_code)
    assert got.item() == pytest.approx(ca_mkd(zs, zm, yy), **TOL[dtype])


def test_alpha_guided_logs_the_kd_thesis_gate():
    z_s, z_m, y = case(7, K=3, B=16)
    method = create_method("alpha-guided", reference_code="kd-thesis", gamma=10.0, theta=0.5)
    out = method([z_s], {"logits": z_m}, y)
    conf = torch.softmax(z_m.double(), -1).gather(-1, y.expand(3, -1).unsqueeze(-1)).squeeze(-1).mean(0)
    assert out["alpha"].item() == pytest.approx(torch.sigmoid(10.0 * (conf - 0.5)).mean().item(), rel=1e-5)
    assert out["confidence"].item() == pytest.approx(conf.mean().item(), rel=1e-5)


@pytest.mark.parametrize("value", ["yes", 1, 0, "CA-MKD", None])
def test_reference_code_rejects_other_values(value):
    with pytest.raises(UserError, match="reference_code"):
        create_method("ca-wkd", reference_code=value)
    z_s, z_m, y = case(8, K=3, B=4)
    with pytest.raises(UserError, match="reference_code"):
        losses.alpha_guided_loss(z_s, z_m, y, reference_code=value)


def test_kd_thesis_gate_needs_confidence_gt():
    with pytest.raises(UserError, match="confidence"):
        create_method("alpha-guided", reference_code="kd-thesis", confidence="max")
    assert create_method("alpha-guided", reference_code=True, confidence="max").options["reference_code"] is True
