"""Hook callables that survive ``copy.deepcopy`` of the module they are registered on.

``deepcopy(model)`` copies a module's hook dictionaries; a bound method there would drag a deep copy of
the whole cockpit along (and fail on its open log files). A :class:`SharedHook` copies as itself, so a
copy of the model calls the original cockpit, whose identity checks then ignore it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class SharedHook:
    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> SharedHook:
        return self

    def __copy__(self) -> SharedHook:
        return self

    def __reduce__(self):  # pickling a model with hooks attached keeps it picklable (hooks dropped)
        return (_noop, ())


def _noop(*args: Any, **kwargs: Any) -> None:
    return None
