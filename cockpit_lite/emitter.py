"""Records flow one way: instruments -> emitter -> history and sinks.

Records are ``{tag: value}``. **Late records** — a value that belongs to an earlier step than the one
being completed (Alpha's value for step t is known only after step t+1; AGC statistics computed for a
batch of steps; the sinks' own time for the previous step) — use the one mechanism there is: the key
``(step, tag)`` instead of ``tag``. The emitter groups records by step and hands each group to the
history and to every sink; sinks therefore see steps mostly in order, with late groups for earlier
steps in between (every sink handles that; ``load()`` sorts).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from itertools import compress
from operator import not_
from typing import Any

from cockpit_lite.profiling import label
from cockpit_lite.records import History, to_value
from cockpit_lite.sinks.base import Sink

#: value types a record keeps as they are (``to_value`` returns them unchanged)
_PLAIN = frozenset({float, str, type(None)})
_STR = frozenset({str})


class Emitter:
    """Writes records to the history and the sinks; a sink that raises is reported once and kept."""

    def __init__(self, history: History, sinks: Sequence[Sink], warn: Callable[[str], None]):
        self.history, self.sinks, self.warn = history, list(sinks), warn
        #: (step, ms) the sinks took for the last group written, reported late under that step
        self.sinks_ms: tuple[int, float] | None = None

    def emit(self, step: int, records: Mapping[Any, Any]) -> None:
        """Group ``records`` (keys ``tag`` for ``step`` or ``(step, tag)``) by step and write them."""
        step = int(step)
        # the step's own records, most of them floats: a copy, then only the others looked at (the keys
        # and values to look at are picked by C-level passes)
        current = dict(records)
        late = list(compress(current, map(not_, map(_STR.__contains__, map(type, current)))))
        for key in late:
            del current[key]
        for key in list(compress(current, map(not_, map(_PLAIN.__contains__, map(type, current.values()))))):
            try:
                current[key] = to_value(current[key])
            except TypeError as e:
                del current[key]
                self.warn(f"record {key!r} dropped: {e}")
        by_step: dict[int, dict[str, Any]] = {step: current} if current else {}
        for key in late:
            s, tag = key if isinstance(key, tuple) else (step, key)
            try:
                by_step.setdefault(int(s), {})[tag] = to_value(records[key])
            except TypeError as e:
                self.warn(f"record {key!r} dropped: {e}")
        t0 = time.perf_counter()
        for s in sorted(by_step):
            # (the history files the group later: a copy of it where sinks get the group too)
            (self.history.add if self.sinks else self.history._own)(s, by_step[s])
            for sink in self.sinks:
                try:
                    with label(f"sink/{type(sink).__name__}"):
                        sink.write(s, by_step[s])
                except Exception as e:
                    self.warn(f"sink {type(sink).__name__} failed to write ({type(e).__name__}: {e}); it keeps trying")
        if by_step:
            self.sinks_ms = (max(by_step), (time.perf_counter() - t0) * 1e3)

    def late_sink_cost(self) -> dict[Any, float]:
        """``cost/sinks_ms`` (and ``_share``) of the last group written, as late records of its step."""
        if self.sinks_ms is None:
            return {}
        prev, ms = self.sinks_ms
        self.sinks_ms = None
        out: dict[Any, float] = {(prev, "cost/sinks_ms"): ms}
        prev_step_ms = self.history.last("cost/step_ms")
        if prev_step_ms:
            out[(prev, "cost/sinks_share")] = ms / prev_step_ms
        return out

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:
                self.warn(f"closing sink {type(sink).__name__} failed ({type(e).__name__}: {e})")
