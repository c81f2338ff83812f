"""One registry pattern for models, datasets and methods.

    MODELS = Registry("model")

    @MODELS.register("mlp")
    def mlp(*, num_classes, in_channels, ...): ...

    MODELS.create("mlp", num_classes=3)      # unknown names fail with the list of known ones

Registration happens through explicit imports in each subpackage's ``__init__``.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from pipeline.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> factory mapping; duplicate names are a bug, unknown names a user error."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = factory
            return factory

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries))
            raise UserError(f"unknown {self.kind} {name!r}; expected one of: {known}") from None

    def create(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
