"""The storage codec base class and registry: one class per storage kind, looked up by name.

    from pipeline.store.codecs import CODECS, make_codec
    codec = make_codec("topk", num_classes=100, dtype="float16", k=20)
    codec.payload()                      # {"topk_values": ((20,), "float16"), "topk_index": ..., "logsumexp": ...}
    parts = codec.encode(z, seed=0, view=0, block=3, where="store view 0 rows 0:4096")
    z_hat = codec.decode(parts)          # dense float32 logits [B, C]

A codec holds a store's storage parameters (``num_classes``, ``dtype``, ``k``, ``temperature``,
``index_dtype``, the attrs section ``storage``) and says everything the store, the reader,
``kdcache verify``, ``plan`` and ``inspect`` need to know about its kind: the payload arrays and
their dtypes (``payload``), a block of float32 logits as those arrays (``encode``), rows of them
back as dense float32 logits (``decode``), the logits it keeps and how exactly (``kept_logits``,
for ``kdcache verify --teacher``), the checks of a block (``check``), the mean maximum
probability ``inspect`` reports (``max_prob``). Nothing outside the codec modules looks at a
kind's name.

A payload array named like one of the exact targets (``logsumexp``; ``pipeline.store.stats``)
that ``encode`` does not return is filled by the writer with that target. Adding a codec: a
module with one ``@register("name")`` class, and its import line in ``codecs/__init__.py``
(a test or a user's code may register one from anywhere before the store is written or read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.registry import Registry

INDEX_DTYPES = ("uint8", "uint16", "uint32", "int32")   # int32: version-2 stores of more than 65535 classes
DEFAULT_TEMPERATURE = 1.0          # of codecs that take a temperature: the teacher's own softmax
DEFAULT_KIND = "dense"             # the storage kind of ``kdcache cache`` without --storage

CODECS: Registry[Codec] = Registry("storage")


def register(name: str) -> Callable[[type[Codec]], type[Codec]]:
    """Class decorator: register a codec under ``name`` (the attrs ``storage.kind``); a name
    registered twice is an error."""
    def decorator(cls: type[Codec]) -> type[Codec]:
        cls.name = name
        CODECS.register(name)(cls)
        return cls

    return decorator


def codec_class(name: str) -> type[Codec]:
    """The registered class of storage kind ``name``; ``UserError`` listing the known kinds otherwise."""
    if name not in CODECS:
        raise UserError(f"storage: expected one of {', '.join(CODECS.names())}, found {name!r}")
    return CODECS.get(name)  # type: ignore[return-value]


def dtypes() -> list[str]:
    """Every logits dtype some registered codec takes (the choices of ``--dtype``)."""
    out: list[str] = []
    for name in CODECS.names():
        out += [d for d in codec_class(name).dtypes if d not in out]
    return out


def check_storage(name: str, dtype: str) -> type[Codec]:
    """The class of storage kind ``name``, which must take ``dtype``; ``UserError`` naming the field otherwise."""
    cls = codec_class(name)
    if dtype not in cls.dtypes:
        if dtype not in dtypes():
            raise UserError(f"dtype: expected one of {', '.join(dtypes())}, found {dtype!r}")
        owners = [n for n in CODECS.names() if dtype in codec_class(n).dtypes]
        raise UserError(f"dtype: expected {' or '.join(cls.dtypes)} with {name} storage ({dtype} is a dtype of "
                        f"{' or '.join(owners)} storage only), found {dtype!r}")
    return cls


def make_codec(name: str, *, num_classes: int, dtype: str = "float16", k: int | None = None,
               temperature: float | None = None, index_dtype: str | None = None) -> Codec:
    """The codec of storage kind ``name`` with these parameters, checked (``UserError`` naming the field)."""
    return check_storage(name, dtype).for_dtype(dtype)(num_classes=num_classes, dtype=dtype, k=k,
                                                       temperature=temperature, index_dtype=index_dtype)


def kinds_taking(parameter: str) -> list[str]:
    """The storage kinds that take ``parameter`` ("k" or "temperature")."""
    return [n for n in CODECS.names() if parameter in codec_class(n).parameters]


def index_dtype(num_classes: int) -> str:
    """The smallest unsigned type that holds every class id 0 .. C - 1."""
    for dtype in ("uint8", "uint16", "uint32"):
        if num_classes - 1 <= np.iinfo(dtype).max:
            return dtype
    raise UserError(f"num_classes: expected at most {np.iinfo('uint32').max + 1}, found {num_classes}")


def legacy_index_dtype(num_classes: int) -> str:
    """The class-id type of a version-2 store written before ``storage.index_dtype`` was recorded."""
    return "uint16" if num_classes <= 65535 else "int32"


def to_float16(values: np.ndarray) -> np.ndarray:
    """``values.astype(np.float16)`` bit for bit (IEEE round to nearest even; inf from 65520 on), by
    torch's vectorized conversion (NumPy's is scalar, ~20 x slower). Each value is converted alone,
    so the bits do not depend on the thread count."""
    return torch.from_numpy(np.require(values, np.float32, ["C", "W"])).to(torch.float16).numpy()


def cast_logits(values: np.ndarray, dtype: str, where: str) -> np.ndarray:
    """Finite float32 logits in ``dtype`` (float16 or float32); a ``UserError`` where float16 overflows."""
    if dtype == "float32":
        return values
    # the rounding is monotonic: every value is within range when the extremes are
    if not np.isfinite(to_float16(np.array([values.max(), values.min()], np.float32))).all():
        raise UserError(f"{where}: field logits: expected values within {dtype} range, found "
                        f"|logit| up to {float(np.abs(values).max()):.4g}; use --dtype float32")
    return to_float16(values)


@dataclass(frozen=True)
class Codec:
    """A storage kind with its parameters; subclasses register with ``@register("name")``.

    Class attributes a codec sets: ``dtypes`` (the ``--dtype`` values it takes, the first its
    default), ``parameters`` (which of "k", "temperature" it takes), ``class_ids`` (whether it
    stores class ids, whose type the store records as ``index_dtype``). Methods it implements:
    ``payload``, ``encode``, ``decode``, ``max_prob``; ``check`` and ``describe`` have defaults.
    """

    num_classes: int
    dtype: str = "float16"
    k: int | None = None
    temperature: float | None = None
    index_dtype: str | None = None

    name: ClassVar[str] = ""
    dtypes: ClassVar[tuple[str, ...]] = ("float16", "float32")
    parameters: ClassVar[frozenset[str]] = frozenset()
    class_ids: ClassVar[bool] = False
    uses_dtype: ClassVar[bool] = True      # False: ``dtype`` is recorded but does not change the arrays

    @classmethod
    def for_dtype(cls, dtype: str) -> type[Codec]:
        """The class that stores this kind in ``dtype`` (a kind may keep one dtype in another class)."""
        return cls

    def __post_init__(self) -> None:
        if self.k is not None and "k" not in self.parameters:
            raise UserError(f"k: expected only with {' or '.join(kinds_taking('k'))} storage, found k={self.k} "
                            f"with {self.name!r}")
        if "k" in self.parameters:
            self.check_k()
        if "temperature" in self.parameters:
            t = DEFAULT_TEMPERATURE if self.temperature is None else self.temperature
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not np.isfinite(t) or t <= 0:
                raise UserError(f"temperature: expected a number > 0 for {self.name} storage, found {t!r}")
            object.__setattr__(self, "temperature", float(t))
        elif self.temperature is not None:
            raise UserError(f"temperature: expected only with {' or '.join(kinds_taking('temperature'))} storage, "
                            f"found {self.temperature} with {self.name!r}")
        if not self.class_ids:
            object.__setattr__(self, "index_dtype", None)
        elif self.index_dtype is None:
            object.__setattr__(self, "index_dtype", index_dtype(self.num_classes))
        elif self.index_dtype not in INDEX_DTYPES or np.iinfo(self.index_dtype).max < self.num_classes - 1:
            raise UserError(f"storage.index_dtype: expected one of {', '.join(INDEX_DTYPES)} holding class "
                            f"{self.num_classes - 1}, found {self.index_dtype!r}")

    def check_k(self) -> None:
        """``UserError`` unless ``k`` suits this kind (codecs that take ``k``)."""

    # --- the format -----------------------------------------------------------------------
    def payload(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape of one row, dtype) of the arrays holding the logits, in checksum order."""
        raise NotImplementedError

    def payload_bytes_per_row(self) -> int:
        """Bytes of one (sample, view) in the payload arrays (``kdcache plan``)."""
        return sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                   for shape, dtype in self.payload().values())

    def describe(self) -> str:
        """One phrase for messages (``kdcache plan``, ``verify``): ``topk k=20 float16``, ``sampled k=12``."""
        return f"{self.name}{f' k={self.k}' if self.k else ''}{f' {self.dtype}' if self.uses_dtype else ''}"

    @property
    def dense_array(self) -> str | None:
        """The payload array that already is the dense logits [B, C] in a float dtype, if any: the
        reader keeps such arrays as they are and converts them per batch."""
        return None

    @property
    def sample_temperature(self) -> float | None:
        """The temperature at which the decoded logits' softmax is the stored distribution, when the
        loss must be taken at that temperature only (None: any)."""
        return None

    # --- writing, reading, checking --------------------------------------------------------
    def encode(self, logits: np.ndarray, *, seed: int, view: int, block: int, where: str) -> dict[str, np.ndarray]:
        """The payload arrays of a block from its finite float32 logits [B, C] (``seed``: the store's
        ``views.seed``; ``where``: the block, for error messages). Arrays named like an exact target
        may be left out: the writer fills them."""
        raise NotImplementedError

    def decode(self, parts: Mapping[str, np.ndarray]) -> np.ndarray:
        """Dense float32 logits [B, C] from the payload arrays of B rows."""
        raise NotImplementedError

    def max_prob(self, parts: Mapping[str, Any]) -> Any:
        """[V, N] maximum softmax probability from the payload arrays [V, N, ...], NumPy or dask
        arrays (only ufuncs and array methods: a dask array stays lazy)."""
        raise NotImplementedError

    def kept_logits(self, parts: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(classes [B, m] int64, logits [B, m] float32, bound [B, m])``: the teacher's logits that
        the payload of B rows keeps, each within ``bound`` of its float32 value (what ``kdcache verify
        --teacher`` compares with the teacher run again); None for a kind that keeps no logit (the
        exact targets entropy, p_gt and pred are compared for every kind)."""
        return None

    def check(self, block: Mapping[str, np.ndarray], labels: np.ndarray,
              mixed: tuple[np.ndarray, np.ndarray] | None = None) -> list[str]:
        """Problems of some rows of a block: their payload and exact targets (entropy, p_gt, pred)
        against each other. ``mixed``: (partner labels, lambda) of rows of mixed views, whose p_gt is
        the mixed label's probability ``lam * p[label] + (1 - lam) * p[partner label]``
        (``pipeline.store.stats.target_stats``); a codec checks it as exactly as its payload allows.
        The default checks the ranges of the targets."""
        out = []
        if not ((block["p_gt"] >= 0) & (block["p_gt"] <= 1 + 1e-6)).all():
            out.append("p_gt: expected probabilities in [0, 1], found values outside")
        if not ((block["entropy"] >= -1e-6) & (block["entropy"] <= np.log(self.num_classes) + 1e-5)).all():
            out.append(f"entropy: expected values in [0, log {self.num_classes}], found values outside")
        pred = block["pred"].astype(np.int64)
        if pred.min() < 0 or pred.max() >= self.num_classes:
            out.append(f"pred: expected classes in [0, {self.num_classes}), found [{pred.min()}, {pred.max()}]")
        return out
