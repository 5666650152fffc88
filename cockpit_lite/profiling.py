"""Costs of the cockpit's own work: timed, and labelled for torch.profiler traces.

Every region is a ``torch.profiler.record_function("cockpit_lite/<name>")`` label, so a trace taken
with ``Cockpit(..., profile=True)`` shows each instrument's work by name, and its wall time is summed
per step into ``cost/<name>_ms`` records. Times are *exclusive*: a region nested inside another (the
per-sample engine's projections inside ``after_step``) is counted under its own name only, so the
costs of one step add up to the cockpit's total (``cost/cockpit_ms``).

On a CUDA model the host's clock is the wrong one: kernels run asynchronously, so a region that waits
for the device (the step's one transfer to the host) would be charged with the training's own queued
kernels, and a region whose kernels run later would look free. There every region is also bracketed by
CUDA events on the current stream (:class:`DeviceClock`), and a tracked step's costs are the device
timeline's exclusive time between them (:meth:`Costs.resolve`, after the step's transfer): a region's
kernels while the device is busy, its host time while the device waits for it, nothing for host work
hidden behind queued kernels, and never the wait for the training's kernels.
"""

from __future__ import annotations

import functools
import math
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, TypeVar

import torch
from torch.profiler import record_function

from cockpit_lite.compat import profiler_enabled

PREFIX = "cockpit_lite/"

F = TypeVar("F", bound=Callable[..., Any])


#: the first steps are always measured (a short run still gets its costs)
WARM = 3

#: ``Cockpit(cost_every=...)``'s default: the cockpit's own cost is measured on every 10th step
COST_EVERY = 10

_UNTIMED = nullcontext()


def check_every(every: Any) -> int:
    """``cost_every`` checked: a whole number of steps >= 1."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(
            f"cost_every={every!r}: give a whole number of steps >= 1 (1 measures the cockpit's cost on every step)"
        )
    return every


def label(name: str):
    """``record_function("cockpit_lite/<name>")`` while a profiler records, else a no-op context:
    entering a record_function costs about 10 us even with no profiler running."""
    return record_function(PREFIX + name) if profiler_enabled() else nullcontext()


class DeviceClock:
    """CUDA events on the current stream of ``device``, reused from step to step (creating one costs
    more than recording it)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._pool: list[Any] = []
        self._used = 0

    def mark(self) -> Any:
        """An event recorded now on the current stream (None while a CUDA graph is being captured: an
        event recorded there would become part of the graph; None too if recording fails)."""
        try:
            if torch.cuda.is_current_stream_capturing():
                return None
            if self._used == len(self._pool):
                self._pool.append(torch.cuda.Event(enable_timing=True))
            event = self._pool[self._used]
            event.record(torch.cuda.current_stream(self.device))
        except Exception:  # never the cockpit's work: the region keeps its host time
            return None
        self._used += 1
        return event

    @staticmethod
    def elapsed_ms(start: Any, end: Any) -> float:
        """Device time between two recorded events (waits for ``end``)."""
        end.synchronize()
        return float(start.elapsed_time(end))

    def reset(self) -> None:
        self._used = 0

    def release(self) -> list[Any]:
        """Hand over the events recorded since :meth:`reset` (a step's, resolved later); the pool keeps
        the unused ones. Give them back with :meth:`reuse` once they are complete."""
        used, self._pool, self._used = self._pool[: self._used], self._pool[self._used :], 0
        return used

    def reuse(self, events: list[Any]) -> None:
        """Return complete events to the pool (after the ones in use)."""
        self._pool.extend(events)


class Costs:
    """Accumulates exclusive wall time (ms) per name within one step; every region is a profiler label.
    With a :attr:`clock` (a CUDA model: :meth:`follow`) regions are also timed on the device timeline.

    Steps are measured on a cadence (``every``: the first :data:`WARM` steps and every ``every``-th one, all
    of them for ``every=1`` or while a profiler records; :meth:`measures`): on the others a region costs one
    call and no clock is read, so watching the cockpit's own cost does not add to it (docs/profiling.md).
    The hooks' own time (:attr:`driver_ms`) is read on every step."""

    def __init__(self, every: int = 1) -> None:
        self.ms: dict[str, float] = defaultdict(float)
        self._children: list[float] = []  # time spent in nested regions, one slot per open region
        self._regions: dict[str, _Region] = {}
        #: the device timeline's clock of a CUDA model (None: the host's clock is the step's)
        self.clock: DeviceClock | None = None
        self._clocks: dict[torch.device, DeviceClock] = {}
        self._spans: list[list[Any]] = []  # [name, start event, end event, parent span or -1]
        self._open_spans: list[int] = []
        self._lent: list[tuple[DeviceClock, list[Any]]] = []  # (handed over: see handover)
        #: regions take the short path (host clock, no profiler label): decided as each step begins, when
        #: the clock changes, and with :meth:`refresh`
        self.fast = False
        self.profiling = False  #: a torch profiler records (decided with :attr:`fast`)
        #: every region's exclusive host time since these costs began (never reset: the driver's hooks
        #: subtract what ran in regions inside them, see :meth:`drive`)
        self.timed_ms = 0.0
        #: the time of the cockpit's hooks outside any region since :meth:`take_driver` last took it
        self.driver_ms = 0.0
        self.driving = False
        #: measure every ``every``-th step (and the first ``WARM``): :meth:`reset` decides each step
        self.every = every
        #: this step's regions are timed (:meth:`measures`); unmeasured, a region is no-op and ``call`` a call
        self.measuring = True

    def take_driver(self) -> float:
        """The hooks' own time (ms) outside regions since the last call (``cost/driver_ms``)."""
        ms, self.driver_ms = self.driver_ms, 0.0
        return ms

    def follow(self, tensor: torch.Tensor | None) -> None:
        """Time regions on the device timeline of ``tensor`` (a parameter of the model) if it is on a CUDA
        device, else on the host's clock (called as each step begins: a model moved to the GPU after the
        cockpit was built is followed)."""
        if tensor is None or not tensor.is_cuda:  # (is_cuda: no device object made every step)
            self.clock = None
        else:
            device = tensor.device
            clock = self._clocks.get(device)
            if clock is None:
                clock = self._clocks[device] = DeviceClock(device)
            self.clock = clock
        self.refresh()

    def refresh(self) -> None:
        """Decide whether regions take the short path: no device clock and no profiler recording (a
        profiler started inside a step labels the regions from the next step on)."""
        self.profiling = profiler_enabled()
        self.fast = self.clock is None and not self.profiling

    def host_clock(self) -> None:
        """Time the rest of this step on the host's clock: the step's values are on the host (the device
        is synchronised), what follows is host work (instruments' ``compute``), and the events before
        are then complete, so :meth:`resolve` waits for nothing. The next step follows the model again."""
        self.clock = None
        self.refresh()

    def resolve(self) -> None:
        """Replace this step's host times by the device timeline's exclusive times of the regions that
        were bracketed by events (waits for the last of them: call it once the step's work is on the
        host anyway). A region entered while a CUDA graph was captured keeps its host time."""
        spans = self._spans
        if self._open_spans:
            return
        lent, self._lent = self._lent, []
        if not spans:
            for clock_, events in lent:
                clock_.reuse(events)
            return
        clock = DeviceClock
        try:
            elapsed = [clock.elapsed_ms(start, end) for _, start, end, _ in spans]
        except Exception:  # (a device error: the host's times stand)
            spans.clear()
            return
        device: dict[str, float] = defaultdict(float)
        for (name, _, _, parent), ms in zip(spans, elapsed, strict=True):
            device[name] += ms
            if parent >= 0:
                device[spans[parent][0]] -= ms
        for name, ms in device.items():
            self.ms[name] = max(ms, 0.0)
        spans.clear()
        for clock_, events in lent:  # (complete now: a handed-over step's events go back to their pool)
            clock_.reuse(events)

    def handover(self) -> Costs:
        """This step's costs so far, moved to a new :class:`Costs` to be resolved and reported later
        (``Cockpit(..., overlap=True)``: the step's records are made during the next step); this one
        starts afresh. The events of its device spans leave the pools, and return when it resolves."""
        held = Costs(self.every)
        held.measuring = self.measuring
        held.ms.update(self.ms)
        held._spans, self._spans = self._spans, []
        held._lent = [(clock, clock.release()) for clock in self._clocks.values()]
        self.ms.clear()
        self._children.clear()
        self._open_spans.clear()
        return held

    def region(self, name: str) -> Any:
        """``with costs.region(name):`` times the block (exclusive of nested regions) under ``name`` (on an
        unmeasured step: a no-op context)."""
        if not self.measuring:
            return _UNTIMED
        r = self._regions.get(name)
        if r is None:
            r = self._regions[name] = _Region(self, name)
        return r

    def call(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` timed as ``with self.region(name):`` times it; on the short path (host clock, no
        profiler) by two clock reads and one call here, not the ``with`` statement's three calls (for the
        regions entered on every tracked step: the engine's per layer, each instrument's). Its time
        excludes what regions inside it took (their exclusive times sum to the growth of ``timed_ms``)."""
        if not self.measuring:
            return fn(*args)
        if not self.fast:
            with self.region(name):
                return fn(*args)
        t0, timed = time.perf_counter(), self.timed_ms
        try:
            return fn(*args)
        finally:
            own = (time.perf_counter() - t0) * 1e3 - (self.timed_ms - timed)
            self.ms[name] += own
            self.timed_ms += own
            if self._children:  # (inside an enclosing region: what the regions inside it added, and the rest)
                self._children[-1] += own

    def total(self) -> float:
        """Sum of every region's exclusive time this step (ms)."""
        return float(sum(self.ms.values()))

    def reset(self, step: int | None = None) -> None:
        """A step begins (its number ``step``; None: measured): forget the last one's times and decide
        whether this one is measured (:meth:`measures`)."""
        self.ms.clear()
        self._children.clear()
        self._spans.clear()
        self._open_spans.clear()
        for clock in self._clocks.values():  # (the events are reused from step to step)
            clock.reset()
        self.refresh()
        if not self.measuring:  # (the hooks' time since the last step's records: that step's untimed work)
            self.driver_ms = 0.0
        self.measuring = step is None or self.profiling or self.measures(step)

    def measures(self, step: int) -> bool:
        """Whether step ``step`` is measured by the cadence: one of the first :data:`WARM`, or a multiple of
        ``every``. Also measured: every step while a profiler records (its trace shows each region by name),
        and a step whose work differs from the last step's (another set of instruments: ``Step``), so that
        work done on some steps only is measured on each of its runs."""
        return self.every <= 1 or step < WARM or step % self.every == 0


class _Region:
    """The timed region of :class:`Costs` under one name: one object per name, entered about 30 times
    a step (a class, not a generator); re-entrant (an entry's start and label are kept on a stack)."""

    __slots__ = ("costs", "name", "_open")

    def __init__(self, costs: Costs, name: str):
        self.costs, self.name = costs, name
        self._open: list[Any] = []  # per entry: its start time (short path), or (label, start, span)

    def __enter__(self) -> None:
        costs = self.costs
        if costs.fast:  # host clock, no profiler: the start time alone
            costs._children.append(0.0)
            self._open.append(time.perf_counter())
            return
        label = record_function(PREFIX + self.name) if profiler_enabled() else None
        if label is not None:
            label.__enter__()
        span = -1
        if costs.clock is not None:
            start = costs.clock.mark()
            if start is not None:
                span = len(costs._spans)
                costs._spans.append([self.name, start, None, costs._open_spans[-1] if costs._open_spans else -1])
                costs._open_spans.append(span)
        costs._children.append(0.0)
        self._open.append((label, time.perf_counter(), span))

    def __exit__(self, *exc: Any) -> None:
        entry = self._open.pop()
        costs = self.costs
        if type(entry) is float:  # (entered on the short path)
            elapsed = (time.perf_counter() - entry) * 1e3
            children = costs._children
            nested = children.pop()
            costs.ms[self.name] += elapsed - nested
            costs.timed_ms += elapsed - nested
            if children:
                children[-1] += elapsed
            return
        label, t0, span = entry
        elapsed = (time.perf_counter() - t0) * 1e3
        if span >= 0 and costs._open_spans and costs._open_spans[-1] == span:
            costs._open_spans.pop()
            end = costs.clock.mark() if costs.clock is not None else None
            if end is None:  # (cannot happen outside a capture begun inside the region): no device time
                costs._spans[span:] = []
            else:
                costs._spans[span][2] = end
        nested = costs._children.pop()
        costs.ms[self.name] += elapsed - nested
        costs.timed_ms += elapsed - nested
        if costs._children:
            costs._children[-1] += elapsed
        if label is not None:
            label.__exit__(*exc)


#: the two tags of each region name, formed once
_COST_KEYS: dict[str, tuple[str, str]] = {}


def cost_records(costs: Costs, step_ms: float) -> dict[str, float]:
    """``cost/<name>_ms`` (exclusive wall time of each region this step) and ``cost/<name>_share``
    (that time / ``cost/step_ms``, the wall time from the model's forward to the records being ready);
    ``cost/cockpit_ms``/``_share`` sum every region. On a CUDA model (``costs.clock``) the regions' times
    are the device timeline's (:meth:`Costs.resolve`)."""
    costs.resolve()
    out: dict[str, float] = {"cost/step_ms": step_ms}
    per_ms = 1.0 / step_ms if step_ms > 0 else math.nan
    for name, ms in costs.ms.items():
        keys = _COST_KEYS.get(name)
        if keys is None:
            keys = _COST_KEYS[name] = (f"cost/{name}_ms", f"cost/{name}_share")
        out[keys[0]] = ms
        out[keys[1]] = ms * per_ms
    total = costs.total()
    out["cost/cockpit_ms"] = total
    out["cost/cockpit_share"] = total * per_ms
    return out


def timed(name: str) -> Callable[[F], F]:
    """Method decorator: run the method inside ``self.costs.region(name)`` (a profiler label and a
    timed cost). Used for work that runs inside autograd hooks, outside any cockpit hook."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            with self.costs.region(name):
                return fn(self, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return deco


def default_schedule() -> Any:
    """The schedule ``profile=True`` uses: skip step 0 (warm-up, first allocations), warm up on step 1,
    record steps 2-4, once."""
    return torch.profiler.schedule(wait=1, warmup=1, active=3, repeat=1)


class Profiler:
    """``torch.profiler`` over the training steps, stepped by the cockpit's optimizer post-hook.

    Writes ``<logdir>/<host>_<pid>.<time>.pt.trace.json`` with ``tensorboard_trace_handler`` when the
    schedule's active window ends (or at close if training stops first). Open it in Perfetto
    (https://ui.perfetto.dev) or chrome://tracing; see docs/profiling.md.
    """

    def __init__(self, logdir: str, schedule: Callable[[int], Any] | None = None, **kwargs: Any):
        self.logdir = logdir
        self.prof = torch.profiler.profile(
            schedule=schedule or default_schedule(),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(logdir),
            **kwargs,
        )
        self.prof.start()
        self._open = True

    def step(self) -> None:
        if self._open:
            self.prof.step()

    def close(self) -> None:
        if self._open:
            self._open = False
            self.prof.stop()
