"""Providers, one per need: registered by :func:`register_provider`, found by the needs they serve.

Every module in this package is imported on first use, so a new built-in need is one file here (a
:class:`Provider` subclass decorated with ``@register_provider``) and its test; third-party packages
register theirs under the entry-point group ``cockpit_lite.providers`` (a module to import).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from importlib.metadata import entry_points

from cockpit_lite.providers.base import BackwardRoot, Context, LossCall, ModelCall, Provider

__all__ = [
    "BackwardRoot",
    "Context",
    "LossCall",
    "ModelCall",
    "Provider",
    "register_provider",
    "registered_providers",
    "provider_for",
]

PROVIDERS_GROUP = "cockpit_lite.providers"
_REGISTRY: list[type[Provider]] = []
_loaded = False


def register_provider(cls: type[Provider]) -> type[Provider]:
    """Class decorator: make ``cls`` the provider of the needs in ``cls.PROVIDES``."""
    if not (isinstance(cls, type) and issubclass(cls, Provider)):
        raise TypeError(f"register_provider takes a Provider subclass, got {cls!r}")
    if not cls.PROVIDES:
        raise ValueError(f"{cls.__name__}.PROVIDES is empty: name the needs it computes")
    for other in _REGISTRY:
        if other is not cls and other.PROVIDES & cls.PROVIDES and other.__qualname__ != cls.__qualname__:
            raise ValueError(
                f"{cls.__name__} and {other.__name__} both provide {sorted(other.PROVIDES & cls.PROVIDES)}: "
                "one need has one provider"
            )
    _REGISTRY[:] = [c for c in _REGISTRY if c.__qualname__ != cls.__qualname__ or c.__module__ != cls.__module__]
    _REGISTRY.append(cls)
    return cls


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    for ep in entry_points(group=PROVIDERS_GROUP):
        ep.load()


def registered_providers() -> list[type[Provider]]:
    """Every registered provider class, in the order events reach them (those a provider USES first)."""
    _load()
    order: list[type[Provider]] = []

    def visit(cls: type[Provider], path: tuple = ()) -> None:
        if cls in order:
            return
        if cls in path:
            raise ValueError(f"providers use each other in a cycle: {[c.__name__ for c in path]}")
        for need in cls.USES:
            visit(provider_for(need), (*path, cls))
        order.append(cls)

    for cls in sorted(_REGISTRY, key=lambda c: getattr(c, "ORDER", 100)):
        visit(cls)
    return order


def provider_for(need: str) -> type[Provider]:
    _load()
    for cls in _REGISTRY:
        if need in cls.PROVIDES:
            return cls
    raise KeyError(f"no provider computes the need {need!r}; registered needs: {sorted(known_needs())}")


def known_needs() -> set[str]:
    _load()
    return {n for cls in _REGISTRY for n in cls.PROVIDES}


_CLOSURES: dict[tuple[frozenset[str], int], frozenset[type[Provider]]] = {}


def closure(needs: Iterable[str]) -> set[type[Provider]]:
    """The providers that must run for ``needs``: their providers and every provider those use
    (remembered per need set and registry size: asked once per step)."""
    _load()
    key = (frozenset(needs), len(_REGISTRY))
    if key not in _CLOSURES:
        out: set[type[Provider]] = set()
        todo = list(key[0])
        while todo:
            cls = provider_for(todo.pop())
            if cls not in out:
                out.add(cls)
                todo.extend(cls.USES)
        _CLOSURES[key] = frozenset(out)
    return set(_CLOSURES[key])
