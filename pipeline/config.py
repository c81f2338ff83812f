"""What every stage's frozen config dataclass shares: building it from a params.yaml section.

    @dataclass(frozen=True)
    class TeacherConfig(FromDict):
        section = "teacher"
        ...

    TeacherConfig.from_dict(params["teachers"]["ce"])   # an unknown key is a UserError naming it
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, ClassVar, TypeVar

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
