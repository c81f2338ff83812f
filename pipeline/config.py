"""What every stage's frozen config dataclass shares: building it from a params.yaml section and
reporting a bad value by its key.

    @dataclass(frozen=True)
    class CacheConfig(FromDict):
        section: ClassVar[str] = "cache"
        views: int = 1
        def __post_init__(self):
            self.check_ints(("views",), minimum=1)

    CacheConfig.from_dict(params["cache"])   # an unknown key is a UserError naming it
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, ClassVar, Iterable, TypeVar

from pipeline.errors import UserError

C = TypeVar("C", bound="FromDict")


class FromDict:
    """Mixin for config dataclasses; their own ``__post_init__`` checks the values."""

    section: ClassVar[str] = "config"

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        """Build from a params.yaml section; an unknown key is a UserError naming it."""
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"{cls.section} config: unknown key {unknown[0]!r}; expected some of {sorted(known)}")
        return cls(**d)

    def bad(self, key: str, expected: str) -> UserError:
        """The error for ``key``: ``<section> config key 'lr': expected a number > 0, found -1``."""
        return UserError(f"{self.section} config key {key!r}: expected {expected}, found {getattr(self, key)!r}")

    def check_ints(self, keys: Iterable[str], *, minimum: int, optional: bool = False) -> None:
        for key in keys:
            value = getattr(self, key)
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise self.bad(key, f"an integer >= {minimum}" + (" or nothing" if optional else ""))
