"""A thread-local switch that makes every cockpit hook ignore the calls inside a block."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_STATE = threading.local()


@contextmanager
def paused() -> Iterator[None]:
    """Run model/loss/optimizer calls that no cockpit must see (e.g. an instrument's own probe
    forward/backward, or an evaluation pass with the training loss module)."""
    depth = getattr(_STATE, "depth", 0)
    _STATE.depth = depth + 1
    try:
        yield
    finally:
        _STATE.depth = depth


def is_paused() -> bool:
    return getattr(_STATE, "depth", 0) > 0
