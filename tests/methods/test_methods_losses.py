"""The public loss API (pipeline.losses) against hand computations and against the independent
per-sample numpy implementation of docs/methods.md in _methods_reference.py. The gradient and
mentor-count checks run on every registered method's public function (``Method.public_losses``).

Run: .venv/bin/pytest tests/methods -q   (whole directory: about 20 s)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline import losses
from pipeline.errors import UserError
from pipeline.methods import METHODS
from tests.methods import _methods_reference as ref
from tests.methods._method_cases import make_case, make_targets

TOL = dict(rel=1e-5, abs=1e-6)


def np_(t):
    return t.detach().double().numpy()


# ---------------------------------------------------------------- known values


def test_kd_of_identical_logits_is_zero():
    z_s, _, y = make_case(0)
    assert losses.kd_kl(z_s, z_s.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-7)
    ce = torch.nn.functional.cross_entropy(z_s, y)
    assert losses.kd_loss(z_s, z_s.clone(), y).item() == pytest.approx(0.5 * ce.item(), **TOL)


def test_kd_kl_reduction_none_matches_hand_computation():
    # p_t = (3/4, 1/4), p_s = (1/2, 1/2): KL = 3/4·ln(3/2) + 1/4·ln(1/2); row 2 at T=2 has the
    # same distributions (logits doubled) and is scaled by T² = 4.
    hand = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    z_s = torch.zeros(2, 2)
    z_t = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    rows = losses.kd_kl(z_s, z_t, 1.0, reduction="none")
    assert rows.shape == (2,)
    assert rows.tolist() == pytest.approx([hand, hand], **TOL)
    rows_t2 = losses.kd_kl(z_s, 2 * z_t, 2.0, reduction="none")
    assert rows_t2.tolist() == pytest.approx([4 * hand, 4 * hand], **TOL)
    assert losses.kd_kl(z_s, z_t, 1.0).item() == pytest.approx(hand, **TOL)  # batchmean


def test_kd_kl_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="reduction"):
        losses.kd_kl(torch.zeros(2, 3), torch.zeros(2, 3), 1.0, reduction="sum")


def test_teacher_confidence_uniform_is_zero_and_one_hot_is_one():
    uniform = torch.zeros(4, 10)
    assert losses.teacher_confidence(uniform).tolist() == pytest.approx([0.0] * 4, abs=1e-6)
    sharp = 100.0 * torch.eye(10)[:4]
    assert losses.teacher_confidence(sharp).tolist() == pytest.approx([1.0] * 4, abs=1e-6)
    z_t = make_case(1)[1][0]
    expected = [ref.confidence_row(row) for row in np_(z_t)]
    assert losses.teacher_confidence(z_t).tolist() == pytest.approx(expected, **TOL)


def test_ca_wkd_two_identical_teachers_weigh_equally():
    z_s, z_m, y = make_case(2, K=1)
    twins = torch.cat([z_m, z_m])
    from pipeline.methods.multi_teacher import ca_weights

    assert torch.allclose(ca_weights(twins, y), torch.full((2, len(y)), 0.5))
    expected = torch.nn.functional.cross_entropy(z_s, y) + losses.kd_kl(z_s, z_m[0], 4.0)
    assert losses.ca_wkd_loss(z_s, twins, y).item() == pytest.approx(expected.item(), **TOL)


def test_classroom_student_better_than_every_mentor_activates_none():
    z_s, z_m, y = make_case(3, student=20.0, strengths=(0.0,))
    loss, info = losses.classroom_loss(z_s, z_m, y)
    assert not info["active"].any()
    ce = torch.nn.functional.cross_entropy(z_s, y)
    assert loss.item() == pytest.approx((info["student_rank"] * ce).item(), **TOL)
    assert info["rank"].shape == info["active"].shape == info["temperature"].shape == (3,)


@pytest.mark.parametrize("granularity", ["batch", "sample"])
def test_classroom_gradient_stays_finite_with_a_confidently_wrong_mentor(granularity):
    # a mentor sure of the wrong class has rank ~1e-33 and a temperature ~1e33: inactive, it must
    # contribute neither to the loss nor (as NaN) to the student's gradient
    torch.manual_seed(0)
    y = torch.randint(0, 10, (16,))
    z_s = torch.randn(16, 10, requires_grad=True)
    good = torch.nn.functional.one_hot(y, 10).float() * 8.0
    wrong = torch.nn.functional.one_hot((y + 1) % 10, 10).float() * 80.0
    loss, info = losses.classroom_loss(z_s, torch.stack([good, wrong]), y, granularity=granularity)
    assert not info["active"][1].any() and info["temperature"][1].min() > 1e20
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z_s.grad).all()
    alone, _ = losses.classroom_loss(z_s, good[None], y, granularity=granularity)
    assert torch.isfinite(alone)


@pytest.mark.parametrize("name", [n for n in METHODS.names() if METHODS.get(n).min_mentors >= 2])
def test_public_function_of_a_multi_mentor_method_rejects_too_few_mentors(name):
    # the method checks its mentor count before calling compute; its public function checks it too
    cls = METHODS.get(name)
    z_s, z_m, y = make_case(4, K=cls.min_mentors - 1)
    students = [z_s] + [torch.randn_like(z_s) for _ in range(cls.num_students - 1)]
    with pytest.raises(UserError, match=f"at least {cls.min_mentors} mentors"):
        cls.public_losses(students, {"logits": z_m}, y, {})


def test_multi_mentor_methods_are_checked():
    # guards the test above against an empty parametrization
    assert {"ca-wkd", "alpha-guided"} <= {n for n in METHODS.names() if METHODS.get(n).min_mentors >= 2}


# ---------------------------------------------------------------- against the reference


@pytest.mark.parametrize("T, w_ce, w_kd", [(4.0, 0.5, 0.5), (1.0, 0.2, 0.9)])
def test_kd_loss_matches_reference(T, w_ce, w_kd):
    z_s, z_m, y = make_case(5)
    got = losses.kd_loss(z_s, z_m[0], y, T, w_ce, w_kd)
    assert got.item() == pytest.approx(ref.kd(np_(z_s), np_(z_m[0]), y.numpy(), T, w_ce, w_kd), **TOL)


def test_uncertainty_matches_reference_with_and_without_cached_entropy():
    z_s, z_m, y = make_case(6)
    expected = ref.uncertainty(np_(z_s), np_(z_m[0]), y.numpy(), 2.0, 0.3, 0.7)
    assert losses.uncertainty_kd_loss(z_s, z_m[0], y, 2.0, 0.3, 0.7).item() == pytest.approx(expected, **TOL)
    entropy = make_targets(z_m, y)["entropy"][0]
    cached = losses.uncertainty_kd_loss(z_s, z_m[0], y, 2.0, 0.3, 0.7, entropy=entropy)
    assert cached.item() == pytest.approx(expected, **TOL)


def test_dual_and_dml_match_reference():
    z_s, z_m, y = make_case(7)
    z_b = z_m[2].clone()
    la, lb = losses.dual_student_losses(z_s, z_b, z_m[0], y, 4.0, 0.5, 0.3, 0.2)
    ra, rb = ref.dual(np_(z_s), np_(z_b), np_(z_m[0]), y.numpy(), 4.0, 0.5, 0.3, 0.2)
    assert (la.item(), lb.item()) == (pytest.approx(ra, **TOL), pytest.approx(rb, **TOL))
    la, lb = losses.dml_losses(z_s, z_b, y)
    ra, rb = ref.dml(np_(z_s), np_(z_b), y.numpy())
    assert (la.item(), lb.item()) == (pytest.approx(ra, **TOL), pytest.approx(rb, **TOL))


def test_aver_matches_reference():
    z_s, z_m, y = make_case(8, K=4)
    assert losses.aver_loss(z_s, z_m, y, 3.0).item() == pytest.approx(ref.aver(np_(z_s), np_(z_m), y.numpy(), 3.0), **TOL)


@pytest.mark.parametrize("reference_code", [False, True])
def test_ca_wkd_matches_reference(reference_code):
    z_s, z_m, y = make_case(9, K=3)
    expected = ref.ca_wkd(np_(z_s), np_(z_m), y.numpy(), 4.0, reference_code)
    assert losses.ca_wkd_loss(z_s, z_m, y, reference_code=reference_code).item() == pytest.approx(expected, **TOL)
    p_gt = make_targets(z_m, y)["p_gt"]
    cached = losses.ca_wkd_loss(z_s, z_m, y, reference_code=reference_code, p_gt=p_gt)
    assert cached.item() == pytest.approx(expected, **TOL)


@pytest.mark.parametrize("confidence", ["gt", "max"])
@pytest.mark.parametrize("reference_code", [False, True])
def test_alpha_guided_matches_reference(confidence, reference_code):
    z_s, z_m, y = make_case(10, K=3)
    expected = ref.alpha_guided(np_(z_s), np_(z_m), y.numpy(), 2.0, 3.0, 0.5, confidence, reference_code)
    got = losses.alpha_guided_loss(z_s, z_m, y, 2.0, 3.0, 0.5, confidence=confidence, reference_code=reference_code)
    assert got.item() == pytest.approx(expected, **TOL)


def test_alpha_guided_confidence_options_differ():
    z_s, z_m, y = make_case(11)
    a = losses.alpha_guided_loss(z_s, z_m, y, confidence="gt")
    b = losses.alpha_guided_loss(z_s, z_m, y, confidence="max")
    assert a.item() != pytest.approx(b.item(), rel=1e-4)


def test_adaptive_alpha_matches_reference():
    z_s, z_m, y = make_case(12, K=4, strengths=(2.0, 2.0, 1.0, 3.0))
    expected = ref.adaptive_alpha(np_(z_s), np_(z_m), y.numpy(), 4.0)
    assert losses.adaptive_alpha_loss(z_s, z_m, y).item() == pytest.approx(expected, **TOL)
    cached = losses.adaptive_alpha_loss(z_s, z_m, y, p_gt=make_targets(z_m, y)["p_gt"])
    assert cached.item() == pytest.approx(expected, **TOL)


CLASSROOM_OPTIONS = [
    {},
    {"tau": 4.0, "beta": 0.5, "delta": 1.0},
    {"rank_mean": "geometric"},
    {"active_if": "ge"},
    {"alpha_source": "weight"},
    {"round_ranks": 2},
    {"granularity": "sample"},
    {"ranking": "position"},
    {"ranking": "position", "granularity": "sample", "active_if": "ge"},
    {"rank_mean": "geometric", "active_if": "ge", "alpha_source": "weight", "round_ranks": 2, "delta": 1.0},
]


def _classroom_case(seed):
    # teacher good, peer 1 middling, peer 2 bad, peer 3 a copy of the student (a rank tie),
    # peer 4 a copy of peer 1 (a tie between mentors)
    z_s, z_m, y = make_case(seed, K=3, B=16, C=6, strengths=(4.0, 1.2, -1.0), student=1.0)
    z_m = torch.cat([z_m, z_s[None].clone(), z_m[1:2].clone()])
    return z_s, z_m, y


@pytest.mark.parametrize("options", CLASSROOM_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_classroom_matches_reference(options):
    z_s, z_m, y = _classroom_case(13)
    loss, info = losses.classroom_loss(z_s, z_m, y, **options)
    r_loss, r_ranks, r_active, r_temps = ref.classroom(np_(z_s), np_(z_m), y.numpy(), **options)
    assert loss.item() == pytest.approx(r_loss, **TOL)
    assert np.allclose(info["rank"].numpy(), np.array(r_ranks), rtol=1e-5, atol=1e-6)
    assert info["active"].numpy().tolist() == np.array(r_active).tolist()
    assert np.allclose(info["temperature"].numpy(), np.array(r_temps), rtol=1e-5, atol=1e-5)
    # cached p_gt (exact, from the cache) instead of the logits; without the student's copy,
    # whose tie the cache's rounding would break either way
    z_m = z_m[[0, 1, 2, 4]]
    cached, _ = losses.classroom_loss(z_s, z_m, y, **options, p_gt=make_targets(z_m, y)["p_gt"])
    r_loss = ref.classroom(np_(z_s), np_(z_m), y.numpy(), **options)[0]
    assert cached.item() == pytest.approx(r_loss, rel=1e-5, abs=1e-5)


def test_classroom_case_exercises_both_sides_of_the_threshold():
    # guards the test above against a case where every mentor is on (or off)
    z_s, z_m, y = _classroom_case(13)
    for options in ({}, {"granularity": "sample"}, {"ranking": "position"}):
        active = losses.classroom_loss(z_s, z_m, y, **options)[1]["active"]
        assert active.any() and not active.all()
    gt = losses.classroom_loss(z_s, z_m, y)[1]["active"]
    ge = losses.classroom_loss(z_s, z_m, y, active_if="ge")[1]["active"]
    assert not gt[3] and ge[3]  # the student's copy ties with the student


def test_classroom_rejects_bad_options():
    z_s, z_m, y = make_case(14)
    with pytest.raises(UserError, match="rank_mean"):
        losses.classroom_loss(z_s, z_m, y, rank_mean="harmonic")
    with pytest.raises(UserError, match="round_ranks"):
        losses.classroom_loss(z_s, z_m, y, round_ranks=-1)


def test_mse_teacher_loss():
    z, _, y = make_case(15)
    p = torch.softmax(z, -1).double().numpy()
    onehot = np.eye(z.shape[1])[y.numpy()]
    assert losses.mse_teacher_loss(z, y).item() == pytest.approx(float(np.mean((p - onehot) ** 2)), **TOL)


# ---------------------------------------------------------------- gradients


def _leaf(t):
    return t.clone().requires_grad_(True)


# every method that reads mentors, through its declared public function, plus option variants
# that take other code paths
MENTOR_CASES = [(name, {}) for name in METHODS.names() if METHODS.get(name).needs] + [
    ("classroom", {"delta": 1.0}),
    ("classroom", {"granularity": "sample"}),
]


def _case_id(value) -> str:
    return value if isinstance(value, str) else ",".join(f"{k}={v}" for k, v in value.items()) or "defaults"


@pytest.mark.parametrize("name, options", MENTOR_CASES, ids=_case_id)
def test_mentor_logits_never_receive_gradient(name, options):
    cls = METHODS.get(name)
    z_s, z_m, y = make_case(16, K=max(3, cls.min_mentors))
    students = [_leaf(z_s)] + [_leaf(z_s * 0.5) for _ in range(cls.num_students - 1)]
    z_m = _leaf(z_m)
    loss = sum(cls.public_losses(students, {"logits": z_m}, y, options))
    assert loss.grad_fn is not None
    *student_grads, mentor_grad = torch.autograd.grad(loss, [*students, z_m], allow_unused=True)
    for grad in student_grads:
        assert grad is not None and grad.abs().sum() > 0
    assert mentor_grad is None


@pytest.mark.parametrize("name", [n for n in METHODS.names() if METHODS.get(n).num_students == 2])
def test_each_student_loss_ignores_the_peer(name):
    cls = METHODS.get(name)
    z_a, z_m, y = make_case(17)
    z_a, z_b = _leaf(z_a), _leaf(z_m[1])
    loss_a, loss_b = cls.public_losses([z_a, z_b], {"logits": z_m}, y, {})
    assert torch.autograd.grad(loss_a, z_b, allow_unused=True)[0] is None
    assert torch.autograd.grad(loss_b, z_a, allow_unused=True)[0] is None
    assert torch.autograd.grad(loss_a, z_a)[0].abs().sum() > 0


def test_position_ranking_gives_tied_models_distinct_positions_in_classroom_order():
    # Method B ranks by Algorithm 1's stable sorted(): the student (first in the classroom) takes the
    # lower position, so a mentor equal to the student ranks above it and is active.
    z_s = torch.tensor([[0.0, 0.0]])
    z_m = torch.tensor([[[2.0, 0.0]], [[2.0, 0.0]], [[0.0, 0.0]]])
    _, info = losses.classroom_loss(z_s, z_m, torch.tensor([0]), ranking="position")
    assert info["student_rank"].item() == pytest.approx(0.1)
    assert info["rank"].tolist() == pytest.approx([0.3, 0.4, 0.2])
    assert info["active"].tolist() == [True, True, True]


def test_float64_inputs_stay_float64_and_pass_gradcheck():
    z_s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(3, 4, dtype=torch.float64)
    z_m = torch.randn(2, 3, 4, dtype=torch.float64)
    y = torch.tensor([0, 3, 1])
    assert losses.kd_kl(z_s, z_t, 4.0).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda z: losses.kd_kl(z, z_t, 4.0), (z_s,))
    assert torch.autograd.gradcheck(lambda z: losses.ca_wkd_loss(z, z_m, y), (z_s,))
    # classroom's ranks and temperatures depend on z_s but are under no_grad (docs/methods.md), so
    # finite differences see more than the gradient does: check its precision only
    assert losses.classroom_loss(z_s, z_m, y)[0].dtype == torch.float64
    assert torch.autograd.gradcheck(lambda z: losses.mse_teacher_loss(z, y), (z_s,))
