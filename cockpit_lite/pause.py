"""A thread-local switch that makes every cockpit hook ignore the calls inside a block."""

from __future__ import annotations

import threading


class _State(threading.local):
    depth = 0  # (a class default: reading a missing thread-local attribute raises inside, ~0.5 us)


_STATE = _State()


class paused:  # noqa: N801 (used as a function: ``with paused():``)
    """Run model/loss/optimizer calls that no cockpit must see (e.g. an instrument's own probe
    forward/backward, or an evaluation pass with the training loss module). A class rather than a
    generator: the per-sample engine enters it for every layer of every tracked step."""

    __slots__ = ("depth",)

    def __enter__(self) -> None:
        self.depth = _STATE.depth
        _STATE.depth = self.depth + 1

    def __exit__(self, *exc: object) -> None:
        _STATE.depth = self.depth


def is_paused() -> bool:
    return _STATE.depth > 0
