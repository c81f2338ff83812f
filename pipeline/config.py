"""What every stage's frozen config dataclass shares: building it from a params.yaml section and
reporting a bad key or value by where it came from.

    @dataclass(frozen=True, kw_only=True)
    class CacheConfig(FromDict):
        section: ClassVar[str] = "cache"
        views: int = 1
        def __post_init__(self):
            self.check_ints(("views",), minimum=1)

    CacheConfig(views=0)          # cache config key 'views': expected an integer >= 1, found 0
    CacheConfig.from_dict(params["cache"], source="params.yaml", prefix="cache")
                                  # params.yaml: cache.views: expected an integer >= 1, found 0
                                  # params.yaml: cache: unknown key 'veiws' (did you mean 'views'?); ...

``from_dict`` also checks each value against the field's type hint (``epochs: '3'``,
``options: 5``), so a wrongly typed value from a file is a ``ConfigError``, never a ``TypeError``.
"""

from __future__ import annotations

import difflib
import functools
import types
from collections.abc import Mapping
from dataclasses import MISSING, fields
from typing import Any, ClassVar, Iterable, TypeVar, Union, get_args, get_origin, get_type_hints

from pipeline.errors import UserError

C = TypeVar("C", bound="FromDict")


class ConfigError(UserError):
    """A bad config key or value, worded by where it came from (the one place for that format):

    - from a file: ``params.yaml: students.kd_ce.lr: expected a number > 0, found -1``
      (``source`` the file, ``prefix`` the section's key path, ``key`` the field);
    - from Python or command-line options: ``distill config key 'lr': expected ..., found -1``.
    """

    def __init__(self, problem: str, *, key: str | None = None, section: str = "config",
                 source: str | None = None, prefix: str | None = None):
        self.problem, self.key, self.section, self.source, self.prefix = problem, key, section, source, prefix
        if source is not None:
            where = ".".join(part for part in (prefix, key) if part)
            where = f"{source}: {where}" if where else str(source)
        else:
            where = f"{section} config key {key!r}" if key else f"{section} config"
        super().__init__(f"{where}: {problem}")

    def located(self, source: str | None, prefix: str | None) -> ConfigError:
        """The same error, naming the file and key path (unchanged without a ``source``)."""
        if source is None:
            return self
        return ConfigError(self.problem, key=self.key, section=self.section, source=str(source), prefix=prefix)

    def __reduce__(self) -> tuple:  # keyword-only arguments: pickle (multiprocessing) rebuilds it from these
        return (_config_error, (self.problem, self.key, self.section, self.source, self.prefix))


def _config_error(problem: str, key: str | None, section: str, source: str | None, prefix: str | None) -> ConfigError:
    return ConfigError(problem, key=key, section=section, source=source, prefix=prefix)


class FromDict:
    """Mixin for config dataclasses; their own ``__post_init__`` checks the values."""

    section: ClassVar[str] = "config"

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any], *, source: str | None = None, prefix: str | None = None) -> C:
        """Build from a params.yaml section ``d``; any mistake is a ``ConfigError``.

        ``source`` (the file) and ``prefix`` (the section's key path, e.g. ``students.kd_ce``)
        name where ``d`` came from, so errors read ``params.yaml: students.kd_ce.lr: ...``.
        An unknown key, a missing required one or a value of the wrong type is an error, and so is
        whatever the class's own checks refuse (a ``UserError`` they raise gets the location too).
        """
        try:
            cls._check_keys_and_types(d)
            return cls(**d)
        except ConfigError as err:
            raise err.located(source, prefix) from None
        except UserError as err:
            if source is None:
                raise
            raise ConfigError(str(err), section=cls.section, source=str(source), prefix=prefix) from None

    @classmethod
    def _check_keys_and_types(cls, d: Mapping[str, Any]) -> None:
        if not isinstance(d, Mapping):
            raise ConfigError(f"expected a mapping of key: value, found {d!r}", section=cls.section)
        known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        for key in d:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"unknown key {key!r}{hint}; expected one of: {', '.join(sorted(known))}",
                                  section=cls.section)
        for name, f in known.items():
            if f.init and name not in d and f.default is MISSING and f.default_factory is MISSING:
                raise ConfigError(f"missing key {name!r}", section=cls.section)
        hints = _type_hints(cls)
        for key, value in d.items():
            hint = hints.get(key, Any)
            if not conforms(value, hint):
                raise ConfigError(f"expected {describe(hint)}, found {value!r}", key=key, section=cls.section)

    def bad(self, key: str, expected: str) -> ConfigError:
        """The error for field ``key``: ``<section> config key 'lr': expected a number > 0, found -1``
        (``from_dict`` rewords it as ``params.yaml: <prefix>.lr: ...``)."""
        return ConfigError(f"expected {expected}, found {getattr(self, key)!r}", key=key, section=self.section)

    def check_strings(self, keys: Iterable[str], *, optional: bool = False) -> None:
        """Each of ``keys`` is a non-empty string (or, with ``optional``, nothing)."""
        for key in keys:
            value = getattr(self, key)
            if optional and value is None:
                continue
            if not value or not isinstance(value, str):
                raise self.bad(key, "a non-empty string" + (" or nothing" if optional else ""))

    def check_ints(self, keys: Iterable[str], *, minimum: int, maximum: int | None = None,
                   optional: bool = False) -> None:
        for key in keys:
            value = getattr(self, key)
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum \
                    or (maximum is not None and value > maximum):
                bound = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
                raise self.bad(key, bound + (" or nothing" if optional else ""))


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` (plain YAML data) fits the type hint; hints it does not know pass
    (an integer is a ``float``, a list a ``tuple[...]``, ``True`` no ``int``)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return any(conforms(value, arg) for arg in args)
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (tuple, list) or origin in (tuple, list):
        item = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(conforms(v, item) for v in value)
    if hint is dict or origin is dict:
        return isinstance(value, Mapping)
    return True


def describe(hint: Any) -> str:
    """``int | None`` -> "an integer or nothing"."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(arg) for arg in sorted(args, key=lambda a: a is type(None)))
    if hint is type(None) or hint is None:
        return "nothing"
    simple = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in simple:
        return simple[hint]
    if hint in (tuple, list) or origin in (tuple, list):
        item = args[0] if args else Any
        return "a list" if item is Any else f"a list of {describe(item).removeprefix('an ').removeprefix('a ')}s"
    if hint is dict or origin is dict:
        return "a mapping of key: value"
    return str(hint)
