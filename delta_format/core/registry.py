"""A table of classes by name, filled by subclassing: ``class X(Base, name="x")`` (as gguf-py's
quant types register). The encodings of SPEC §5 and the edit methods are two such tables, so
adding either is one class in one module, and nothing else lists them."""

from __future__ import annotations

from typing import Any, ClassVar, Generic, TypeVar

from ..errors import InvalidArgumentError

T = TypeVar("T")


class Registry(dict[str, type[T]], Generic[T]):
    """Classes by name. A name is taken once: a second class must not silently change what the
    name means (for encodings, how existing files decode). Tests that register a class remove it
    again with ``del registry[name]``."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def add(self, name: str, cls: type[T]) -> None:
        if name in self:
            raise InvalidArgumentError(
                f"an {self.what} named {name!r} is already registered",
                expected=f"a new {self.what} name",
                found=self[name].__qualname__,
                fix="choose another name",
            )
        self[name] = cls


class Registered:
    """Base of registered classes: ``class X(Base, name="x")`` adds ``X`` to ``Base.registry``
    and sets ``X.name``; a subclass without a name (an intermediate base) is not registered."""

    registry: ClassVar[Registry]
    name: ClassVar[str]

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.registry.add(name, cls)
            cls.name = name
