"""Instruments and presets come from entry points; the core never imports a concrete instrument.

A third-party package registers its own in its pyproject.toml::

    [project.entry-points."cockpit_lite.instruments"]
    my_quantity = "my_package.my_module:MyQuantity"

    [project.entry-points."cockpit_lite.presets"]
    my_preset = "my_package.presets:my_preset"      # a callable returning a list of instruments
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import entry_points

from cockpit_lite.instrument import Instrument

INSTRUMENTS_GROUP = "cockpit_lite.instruments"
PRESETS_GROUP = "cockpit_lite.presets"


def available_instruments() -> dict[str, type[Instrument]]:
    return {ep.name: ep.load() for ep in entry_points(group=INSTRUMENTS_GROUP)}


_FAILED: set[str] = set()


def registered_instruments() -> dict[str, type[Instrument]]:
    """Like :func:`available_instruments`, but an entry point that fails to load (a broken plugin) is
    left out with a warning, once, instead of raising: for showing a run, never for running one."""
    from cockpit_lite.errors import warn

    out: dict[str, type[Instrument]] = {}
    for ep in entry_points(group=INSTRUMENTS_GROUP):
        try:
            cls = ep.load()
        except Exception as e:
            if ep.value not in _FAILED:
                _FAILED.add(ep.value)
                warn(f"instrument entry point {ep.name} = {ep.value} failed to load ({type(e).__name__}: {e})")
            continue
        if isinstance(cls, type) and issubclass(cls, Instrument):
            out[ep.name] = cls
    return out


def available_presets() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=PRESETS_GROUP))


def preset(name: str) -> list[Instrument]:
    eps = {ep.name: ep for ep in entry_points(group=PRESETS_GROUP)}
    if name not in eps:
        raise ValueError(
            f"unknown instrument preset {name!r}; available: {sorted(eps)}. "
            "If this list is empty, cockpit-lite is not installed: run `pip install -e .`."
        )
    return list(eps[name].load()())


def resolve(instruments: str | Iterable[Instrument | str]) -> list[Instrument]:
    """Expand a preset name, or a list of instruments and registered instrument names."""
    if isinstance(instruments, str):
        return preset(instruments)
    out: list[Instrument] = []
    registered = None
    for item in instruments:
        if isinstance(item, Instrument):
            out.append(item)
        elif isinstance(item, str):
            registered = registered or available_instruments()
            if item not in registered:
                raise ValueError(f"unknown instrument {item!r}; registered: {sorted(registered)}")
            out.append(registered[item]())
        else:
            raise TypeError(f"instruments must be Instrument objects or names, got {type(item).__name__}")
    return out
