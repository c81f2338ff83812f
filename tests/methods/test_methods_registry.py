"""Shared checks for every registered method (parametrized over METHODS.names(), so a new
method gets them for free: the test-only methods of tests/methods/plugin_*.py, registered by
conftest.py, run through them too), the options/mentor-count errors, and each method against
the public loss function it declares (``loss_fn``).

Run: .venv/bin/pytest tests/methods -q   (whole directory: about 20 s)
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

from pipeline import losses
from pipeline.errors import UserError
from pipeline.methods import METHODS, Method, create_method
from tests.methods._method_cases import make_case, make_targets

ALL = METHODS.names()
FIELDS = {"logits", "entropy", "p_gt"}
DOCS = Path(__file__).resolve().parents[2] / "docs" / "methods.md"


def _package_methods() -> list[str]:
    """The registered methods defined in the package (not by a test module)."""
    return [name for name in ALL if METHODS.get(name).__module__.startswith("pipeline.")]


def _docs_section(title: str) -> str:
    text = DOCS.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def test_docs_methods_md_documents_exactly_the_package_methods():
    documented = re.findall(r"^### `([^`]+)`", _docs_section("Methods"), flags=re.M)
    assert len(documented) >= 10  # guards the parsing: one heading per method
    assert sorted(documented) == sorted(_package_methods())


def test_docs_api_table_names_each_methods_public_function():
    # rows "| `kd_loss(z_s, ...)` ... | `kd` |": function name -> method
    table = _docs_section("Python API (`pipeline.losses`)")
    rows = dict(re.findall(r"^\| `(\w+)\(.*\| `([^`]+)` \|$", table, flags=re.M))
    assert len(rows) >= 9  # guards the parsing
    for name in _package_methods():
        fn = METHODS.get(name).loss_fn
        if getattr(losses, fn.__name__, None) is fn:
            assert rows.get(fn.__name__) == name, f"docs/methods.md: no API row `{fn.__name__}(...)` | `{name}`"


def _num_mentors(method: Method) -> int:
    k = max(method.min_mentors, 3)
    return k if method.max_mentors is None else min(k, method.max_mentors)


def _batch(method: Method, seed: int = 0, B: int = 8, C: int = 5, d: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g)
    _, z_m, y = make_case(seed, K=_num_mentors(method), B=B, C=C)
    return x, make_targets(z_m, y), y


@pytest.mark.parametrize("name", ALL)
def test_declares_a_valid_interface(name):
    method = create_method(name)
    assert method.name == name
    assert method.num_students in (1, 2)
    assert method.needs <= FIELDS
    assert method.min_mentors >= (1 if method.needs else 0)
    assert method.max_mentors is None or method.max_mentors >= method.min_mentors
    assert method.max_mentors != 0 or not method.needs    # a method that takes no mentors reads no targets
    assert set(method.options) == set(method.defaults)


@pytest.mark.parametrize("name", ALL)
def test_one_step_gives_a_finite_loss_and_moves_every_student(name):
    torch.manual_seed(0)
    method = create_method(name)
    x, targets, y = _batch(method)
    targets = {key: value.clone().requires_grad_(True) for key, value in targets.items()}
    students = [torch.nn.Linear(x.shape[1], targets["logits"].shape[-1]) for _ in range(method.num_students)]
    before = [s.weight.detach().clone() for s in students]
    optimizers = [torch.optim.SGD(s.parameters(), lr=0.5) for s in students]

    out = method([s(x) for s in students], targets, y)
    loss = out["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    for opt in optimizers:
        opt.step()
    for s, w0 in zip(students, before):
        assert not torch.equal(s.weight, w0)
    for key, value in targets.items():
        assert value.grad is None, f"{name}: cached {key} received gradient"

    K = targets["logits"].shape[0]
    for key, value in out.items():
        assert isinstance(value, torch.Tensor), key
        assert value.ndim == 0 or value.shape == (K,), f"{name}: part {key} has shape {tuple(value.shape)}"
        assert torch.isfinite(value).all(), f"{name}: part {key} is not finite"
        if key != "loss":
            assert not value.requires_grad, f"{name}: part {key} is not detached"


@pytest.mark.parametrize("name", [n for n in ALL if METHODS.get(n).num_students == 2])
def test_two_students_each_get_only_their_own_gradient(name):
    method = create_method(name)
    x, targets, y = _batch(method)
    z_a = torch.randn(len(y), targets["logits"].shape[-1], requires_grad=True)
    z_b = torch.randn(len(y), targets["logits"].shape[-1], requires_grad=True)
    out = method([z_a, z_b], targets, y)
    assert torch.allclose(out["loss"], out["loss_a"] + out["loss_b"])
    # the summed loss's gradient wrt each student is that of its own public loss alone
    g_a, g_b = torch.autograd.grad(out["loss"], [z_a, z_b])
    loss_a, loss_b = method.public_losses([z_a, z_b], targets, y, method.options)
    assert torch.autograd.grad(loss_a, z_b, allow_unused=True)[0] is None
    assert torch.autograd.grad(loss_b, z_a, allow_unused=True)[0] is None
    assert torch.allclose(g_a, torch.autograd.grad(loss_a, z_a)[0], atol=1e-6)
    assert torch.allclose(g_b, torch.autograd.grad(loss_b, z_b)[0], atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_unknown_option_is_a_user_error_listing_the_known_ones(name):
    with pytest.raises(UserError, match="unknown option 'no_such_option'") as err:
        create_method(name, no_such_option=1)
    for key in create_method(name).defaults:
        assert key in str(err.value)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(UserError, match="classroom"):
        create_method("no-such-method")


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("kd", {"T": "4"}, "finite number"),
        ("kd", {"T": 0}, "> 0"),
        ("classroom", {"tau": -1.0}, "> 0"),
        ("classroom", {"ranking": "rank"}, "'weight', 'position'"),
        ("classroom", {"round_ranks": 1.5}, "round_ranks"),
        ("alpha-guided", {"confidence": "mean"}, "'gt', 'max'"),
        ("ca-wkd", {"reference_code": "yes"}, "true or false"),
    ],
)
def test_bad_option_values_are_user_errors(name, options, match):
    with pytest.raises(UserError, match=match):
        create_method(name, **options)


def test_options_are_kept_and_typed():
    method = create_method("classroom", tau=4, delta=1, round_ranks=2, granularity="sample")
    assert method.options["tau"] == 4.0 and isinstance(method.options["tau"], float)
    assert method.options["round_ranks"] == 2 and method.options["granularity"] == "sample"


@pytest.mark.parametrize("name", ALL)
def test_mentor_count_outside_the_declared_range_is_a_user_error(name):
    method = create_method(name)
    if method.min_mentors > 0:
        with pytest.raises(UserError, match="at least"):
            method.check_mentors(method.min_mentors - 1)
    if method.max_mentors == 0:
        with pytest.raises(UserError, match="reads no mentor stores"):
            method.check_mentors(1)
    elif method.max_mentors is not None:
        with pytest.raises(UserError, match="teacher store only") as err:
            method.check_mentors(method.max_mentors + 1)
        # the way out it suggests: every method that takes any number of mentors, and only those
        suggested = str(err.value).rsplit("(", 1)[1].rstrip(")").split(", ")
        assert suggested == [n for n in ALL if METHODS.get(n).needs and METHODS.get(n).max_mentors is None]
        assert "classroom" in suggested
        _, z_m, y = make_case(1, K=method.max_mentors + 1)
        students = [torch.randn(len(y), z_m.shape[-1]) for _ in range(method.num_students)]
        with pytest.raises(UserError):
            method(students, make_targets(z_m, y), y)


@pytest.mark.parametrize("name", ALL)
def test_declares_its_public_loss_function(name):
    cls = METHODS.get(name)
    fn = cls.loss_fn
    assert callable(fn), f"{name}: declare the public pure function it computes as loss_fn"
    if fn.__module__.startswith("pipeline."):  # the package's own functions are public API
        assert getattr(losses, fn.__name__, None) is fn, f"{name}: {fn.__name__} is not exported by pipeline.losses"
        assert fn.__name__ in losses.__all__
    # an option that is also a parameter of the function has the same default in both
    parameters = inspect.signature(fn).parameters
    for key, default in cls.defaults.items():
        if key in parameters:
            assert parameters[key].default == default, f"{name}: default {key}={default!r} differs from {fn.__name__}'s"


# Each method's loss equals its declared public function on the same batch (the method may read
# the cached entropy / p_gt instead of recomputing them: equal up to float rounding). Once with the
# defaults (the function's own defaults: nothing passed), once with every float option changed.
@pytest.mark.parametrize("changed", [False, True], ids=["defaults", "changed-options"])
@pytest.mark.parametrize("name", ALL)
def test_method_equals_its_public_loss(name, changed):
    cls = METHODS.get(name)
    options = {key: 0.7 * value for key, value in cls.defaults.items() if isinstance(value, float)} if changed else {}
    method = create_method(name, **options)
    _, targets, y = _batch(method, seed=3)
    z = [torch.randn(len(y), targets["logits"].shape[-1]) for _ in range(method.num_students)]
    got = method(z, targets, y)["loss"]
    expected = sum(cls.public_losses(z, {"logits": targets["logits"]}, y, options))
    assert isinstance(expected, torch.Tensor) and expected.ndim == 0
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


def test_classroom_logs_per_mentor_rank_active_temperature():
    for options in ({}, {"granularity": "sample"}):
        method = create_method("classroom", **options)
        _, targets, y = _batch(method, seed=4)
        out = method([torch.randn(len(y), targets["logits"].shape[-1])], targets, y)
        for key in ("rank", "active", "temperature"):
            assert out[key].shape == (3,)
        assert ((0 <= out["active"]) & (out["active"] <= 1)).all()
        assert out["num_active"] == out["active"].sum()


def test_low_precision_student_logits_give_a_float32_loss():
    method = create_method("classroom")
    _, targets, y = _batch(method, seed=5)
    z = torch.randn(len(y), targets["logits"].shape[-1]).bfloat16().requires_grad_(True)
    loss = method([z], targets, y)["loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert z.grad is not None and z.grad.dtype == torch.bfloat16
