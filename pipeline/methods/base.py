"""The Method base class and the METHODS registry.

A method turns the students' logits and the cached mentor targets of one batch into a loss
dict; the training loop never looks at its name, only at the attributes below.

    from pipeline.methods import create_method, METHODS
    method = create_method("classroom", tau=4.0, delta=1.0)   # unknown name/option: UserError
    group = StoreGroup(mentor_stores)                          # pipeline.store.reader
    method.check_mentors(group.num_mentors)                    # before training starts
    out = method([z_s], group.targets(v, rows, fields=tuple(method.needs)), y)
    out["loss"].backward()

Methods register themselves through the explicit imports in ``pipeline/methods/__init__.py``
(one line per family module). Adding a method is one class in a family module, and for a new
family module its import line there:

    @register("my-method")
    class MyMethod(Method):
        defaults = {"T": 4.0}
        loss_fn = staticmethod(my_loss)       # the public pure function it computes
        def compute(self, students, targets, y): ...

The registry-parametrized tests (tests/methods) then check it, including that its loss equals
``loss_fn`` on the same batch (see ``Method.public_losses``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch

from pipeline.errors import UserError
from pipeline.registry import Registry

METHODS: Registry["Method"] = Registry("method")


def hard_labels(y: torch.Tensor) -> torch.Tensor:
    """The hard-label target of cross-entropy: class ids [B] as int64, or the mixed labels [B, C]
    (float) of mixed views, ``lam * onehot(y) + (1 - lam) * onehot(y_partner)``, as they are:
    ``F.cross_entropy`` against them is ``lam * CE(y) + (1 - lam) * CE(y_partner)``."""
    return y if y.is_floating_point() and y.dim() == 2 else y.long()


def full(z: torch.Tensor) -> torch.Tensor:
    """``z`` in at least float32: bf16/fp16 logits (autocast) are promoted, float64 stays float64."""
    return z if z.dtype in (torch.float32, torch.float64) else z.float()

# Options that are temperatures: they must be > 0.
_POSITIVE = frozenset({"T", "tau"})
# The targets field a group with a sampled store adds: each store's temperature T_s [K] (0: not sampled).
SAMPLE_TEMPERATURE = "sample_temperature"


class Method:
    """One distillation method: what it needs from the cache and how it computes the loss.

    Class attributes (read by the training loop):
      num_students  number of student logits passed to ``__call__`` (2 for dual, dml)
      min_mentors   fewest mentor stores it accepts (mentor 0 is the teacher)
      max_mentors   most mentor stores it accepts; None = any number
      needs         cached target fields it reads, a subset of {"logits", "entropy", "p_gt"};
                    empty: the targets are not read at all
      defaults      option name -> default; options are the keyword arguments of ``__init__``
      choices       option name -> allowed values, for the options that are names
      loss_fn       the public pure function (``pipeline.losses``) whose value the method's "loss"
                    equals; wrap it in ``staticmethod``; ``public_losses`` says how it is called
      mixed_labels  whether its labels enter only through cross-entropy, so that the mixed labels of
                    mixed views (MixUp / CutMix, a float [B, C] ``y``) have a meaning; methods that
                    index or compare with class ids refuse mixed views (``check_mixed``)
      sampled_option  the option that is the temperature of every KD term, for methods whose
                    teacher logits enter only through ``kd_kl`` at that temperature (then a
                    sampled store drawn at it gives an unbiased gradient); None: sampled stores
                    are refused (docs/methods.md, "Storage")
    """

    name: ClassVar[str] = ""
    num_students: ClassVar[int] = 1
    min_mentors: ClassVar[int] = 1
    max_mentors: ClassVar[int | None] = None
    needs: ClassVar[frozenset[str]] = frozenset({"logits"})
    defaults: ClassVar[Mapping[str, Any]] = {}
    choices: ClassVar[Mapping[str, tuple]] = {}
    loss_fn: ClassVar[Callable[..., Any] | None] = None
    sampled_option: ClassVar[str | None] = None
    mixed_labels: ClassVar[bool] = False

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise UserError(f"method {self.name!r}: unknown option {unknown[0]!r}; known options: {known}")
        self.options = {key: self._check_option(key, options.get(key, default)) for key, default in self.defaults.items()}
        self._sampled_checked = False

    def _check_option(self, key: str, value: Any) -> Any:
        default = self.defaults[key]
        if key in self.choices:
            if value not in self.choices[key]:
                allowed = ", ".join(repr(c) for c in self.choices[key])
                raise UserError(f"method {self.name!r}: option {key!r} must be one of {allowed}, got {value!r}")
            return value
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise UserError(f"method {self.name!r}: option {key!r} must be true or false, got {value!r}")
            return value
        if isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"method {self.name!r}: option {key!r} must be a finite number, got {value!r}")
            if key in _POSITIVE and value <= 0:
                raise UserError(f"method {self.name!r}: option {key!r} must be > 0, got {value!r}")
            return float(value)
        return value

    def check_mentors(self, num_mentors: int) -> None:
        """UserError unless this method can use ``num_mentors`` mentor stores."""
        if num_mentors < self.min_mentors:
            raise UserError(
                f"method {self.name!r} needs at least {self.min_mentors} mentor store(s) (teacher first), got {num_mentors}"
            )
        if self.max_mentors == 0 and num_mentors:
            raise UserError(f"method {self.name!r} trains on the labels alone and reads no mentor stores, got "
                            f"{num_mentors}; drop them, or pick a distillation method")
        if self.max_mentors is not None and num_mentors > self.max_mentors:
            raise UserError(
                f"method {self.name!r} distils from {self.max_mentors} teacher store only, got {num_mentors} mentor "
                f"stores; pass only the teacher, or use a multi-mentor method ({', '.join(multi_mentor_methods())})"
            )

    def check_mixed(self, mixed: bool) -> None:
        """UserError when the views are ``mixed`` (MixUp / CutMix) and this method cannot use mixed labels."""
        if mixed and not self.mixed_labels:
            takes = ", ".join(n for n in METHODS.names() if METHODS.get(n).mixed_labels)
            raise UserError(f"method {self.name!r}: expected unmixed views (it compares class ids, which a mixed "
                            f"label has two of), found mixed views (MixUp/CutMix); methods that take them: {takes}")

    def __call__(
        self, students: Sequence[torch.Tensor], targets: Mapping[str, torch.Tensor], y: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``students``: ``num_students`` logits [B, C]; ``targets``: StoreGroup.targets fields
        (logits [K, B, C], entropy [K, B], p_gt [K, B]); ``y``: labels [B], or for mixed views (methods
        with ``mixed_labels``) the mixed labels [B, C].

        Returns {"loss": scalar to backward, "<part>": detached scalars or per-mentor [K] tensors}."""
        if len(students) != self.num_students:
            raise ValueError(f"method {self.name!r} takes {self.num_students} student(s), got {len(students)}")
        if self.needs:
            self.check_mentors(targets["logits"].shape[0])
            if SAMPLE_TEMPERATURE in targets and not self._sampled_checked:
                self.check_sampled(targets[SAMPLE_TEMPERATURE].tolist())
        return self.compute(list(students), targets, hard_labels(y))

    def check_sampled(self, temperatures: Sequence[float]) -> None:
        """UserError unless every sampled mentor store (temperature > 0) was drawn at this method's
        KD temperature and the method supports sampled stores; checked once, at the first batch."""
        for k, t in enumerate(temperatures):
            if t <= 0:
                continue
            if self.sampled_option is None:
                supported = ", ".join(n for n in METHODS.names() if METHODS.get(n).sampled_option)
                raise UserError(f"method {self.name!r}: expected dense or top-k mentor stores, found a sampled store "
                                f"as mentor {k} (its classes estimate a KD term at one temperature without bias, "
                                f"and {self.name!r} uses the teacher's logits otherwise); methods that read "
                                f"sampled stores: {supported}")
            option, want = self.sampled_option, float(self.options[self.sampled_option])
            if not math.isclose(t, want, rel_tol=1e-6):
                raise UserError(f"method {self.name!r}: option {option!r} expected {t:g}, the temperature mentor {k}'s "
                                f"sampled store was drawn at (the estimate is unbiased only there), found {want:g}; "
                                f"pass --option {option}={t:g}, or recache that store with --temperature {want:g}")
        self._sampled_checked = True

    def compute(self, students: list[torch.Tensor], targets: Mapping[str, torch.Tensor], y: torch.Tensor) -> dict:
        raise NotImplementedError

    @classmethod
    def public_losses(
        cls, students: Sequence[torch.Tensor], targets: Mapping[str, torch.Tensor], y: torch.Tensor,
        options: Mapping[str, Any],
    ) -> tuple[torch.Tensor, ...]:
        """``loss_fn`` on one batch, one loss per student; their sum is what ``__call__``'s "loss" equals.

        The default calls ``loss_fn(*students, mentors, y, **options)`` with ``mentors`` the teacher's
        logits [B, C] when ``max_mentors == 1``, all mentors' logits [K, B, C] otherwise, and nothing
        when ``needs`` is empty; a method whose function takes other arguments or returns more than
        its losses overrides this. Only the logits are passed: the function computes entropy and p_gt
        itself, where the method may read the cached values (equal up to float rounding)."""
        if cls.loss_fn is None:
            raise NotImplementedError(f"method {cls.name!r} declares no public loss function (loss_fn)")
        if not cls.needs:
            mentors: tuple[torch.Tensor, ...] = ()
        elif cls.max_mentors == 1:
            mentors = (targets["logits"][0],)
        else:
            mentors = (targets["logits"],)
        out = cls.loss_fn(*students, *mentors, y, **options)
        return tuple(out) if cls.num_students > 1 else (out,)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({self.name!r}{', ' if options else ''}{options})"


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: name the method and add it to METHODS."""

    def decorator(cls: type[Method]) -> type[Method]:
        cls.name = name
        return METHODS.register(name)(cls)

    return decorator


def multi_mentor_methods() -> list[str]:
    """The registered methods that read the mentors and accept any number of mentor stores."""
    return [name for name in METHODS.names() if METHODS.get(name).needs and METHODS.get(name).max_mentors is None]


def create_method(name: str, **options: Any) -> Method:
    """The registered method ``name`` with its options; UserError lists the known names/options."""
    return METHODS.create(name, **options)


def result(loss: torch.Tensor, parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The loss dict: ``loss`` keeps its graph, every logged part is detached."""
    out = {"loss": loss}
    out.update({key: torch.as_tensor(value).detach() for key, value in parts.items() if key != "loss"})
    return out
