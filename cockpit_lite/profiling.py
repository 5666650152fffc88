"""Costs of the cockpit's own work: timed, and labelled for torch.profiler traces."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

from torch.profiler import record_function

PREFIX = "cockpit_lite/"


class Costs:
    """Accumulates wall time (ms) per name within one step; every region is a profiler label."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = defaultdict(float)

    @contextmanager
    def region(self, name: str):
        t0 = time.perf_counter()
        with record_function(PREFIX + name):
            try:
                yield
            finally:
                self.ms[name] += (time.perf_counter() - t0) * 1e3

    def reset(self) -> None:
        self.ms.clear()
