"""Loading a benchmark script (benchmarks/*.py, not a package) as a module for its tests."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_module(name: str) -> Iterator[ModuleType]:
    """Yield ``benchmarks/<name>.py`` executed as the module ``bench_<name>``, registered in
    ``sys.modules`` while it is used (its dataclasses look their module up); for a module-scoped fixture."""
    key = f"bench_{name}"
    spec = importlib.util.spec_from_file_location(key, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[key]
