"""One optimizer step as the Cockpit drives it: which instruments are scheduled, which providers run,
and the events in their order. The Cockpit's hooks say *when*; a :class:`Step` says *to whom*.

Events reach the step's providers first (in registration order, a provider after those it uses), then,
for the three events instruments hear (``on_after_backward``, ``on_before_step``, ``on_after_step``), the
instruments with the record sealed. ``complete()`` asks each instrument for its records and adds its notes
(or, with ``Cockpit(..., overlap=True)``, ``launch()`` at the step and ``finish()`` during the next).
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cockpit_lite.instrument import Instrument
from cockpit_lite.needs import Needs
from cockpit_lite.profiling import Costs, cost_records
from cockpit_lite.providers import Provider, closure
from cockpit_lite.step import StepRecord

#: step plans a Guard keeps (one per set of scheduled instruments seen; a schedule repeats few)
MAX_PLANS = 64

#: provider events that instruments hear too, under their own hook names
INSTRUMENT_HOOKS = {
    "on_backward_end": "on_after_backward",
    "on_before_step": "on_before_step",
    "on_after_step": "on_after_step",
}


@functools.cache
def _overrides(cls: type, base: type, method: str) -> bool:
    """Whether ``cls`` replaces ``base``'s (no-op) ``method``: events skip objects that do not hear them."""
    return getattr(cls, method) is not getattr(base, method)


@functools.cache
def _base_needs(needs: frozenset) -> Needs:
    """What an instrument that keeps the base ``requires`` asks on a scheduled step: its NEEDS (one
    object per need set, only read: ``Needs.merge`` copies from it)."""
    return Needs(set(needs))


def guarded(fn: Callable) -> Callable:
    """For the Cockpit's hooks: no exception from the cockpit's work reaches the training loop; it
    becomes one warning (``self._warn``). The hook's own time outside any region (the driver's
    bookkeeping; on a step whose regions are not measured, the whole hook) is added to
    ``self.costs.driver_ms``; a hook called inside another (a probe's model call in an instrument's
    ``compute``) is counted by the outer one."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        costs = getattr(self, "costs", None)  # (none yet while the cockpit is being built: not timed)
        outer = costs is not None and not costs.driving
        if outer:
            costs.driving = True
            t0, timed = time.perf_counter(), costs.timed_ms
        try:
            return fn(self, *args, **kwargs)
        except Exception as e:
            self._warn(f"{fn.__name__.strip('_')} failed ({type(e).__name__}: {e}); training is unaffected")
            return None
        finally:
            if outer:
                costs.driving = False
                costs.driver_ms += max((time.perf_counter() - t0) * 1e3 - (costs.timed_ms - timed), 0.0)

    return wrapper


class Guard:
    """Calls into instruments, providers and sinks; an exception becomes one warning, never the loop's."""

    def __init__(self, warn: Callable[[str], None], costs: Costs):
        self.warn, self.costs = warn, costs
        self._hearing: dict[tuple[tuple, type, str], tuple] = {}
        #: Step plans by the scheduled instruments and what they asked (``Step.form_plan``)
        self._plans: dict[tuple, tuple] = {}
        #: (instruments, their NEEDS, plan) of :meth:`every_step_plan`
        self._every_step: tuple | None = None
        #: (plan, its event routes) of :meth:`routes`
        self._routes: tuple[Any, dict[str, tuple]] = (None, {})
        #: id(instrument) -> (instrument, :meth:`base_schedule`)
        self._base: dict[int, tuple[Instrument, bool]] = {}
        #: (gates, instruments, entries) of :meth:`gated`
        self._gated: tuple | None = None
        #: the plan of the last step begun (a step of another plan has its costs measured: Costs.measures)
        self.last_plan: tuple | None = None

    def hearing(self, objects: tuple, base: type, method: str) -> tuple:
        """The objects of a step (a plan's tuple of providers or instruments, the same object step after
        step) whose class replaces ``base``'s no-op ``method``, in order: those an event reaches."""
        key = (objects, base, method)
        found = self._hearing.get(key)
        if found is None:
            found = self._hearing[key] = tuple(o for o in objects if _overrides(type(o), base, method))
        return found

    def resting(self, running: tuple, providers: Sequence[Provider]) -> tuple:
        """The providers that hear ``rest_step`` and are not among a plan's ``running`` ones (kept by plan)."""
        key = (running, Step, "rest_step")  # (apart from hearing()'s keys)
        found = self._hearing.get(key)
        if found is None:
            found = self._hearing[key] = tuple(
                p for p in providers if p not in running and _overrides(type(p), Provider, "rest_step")
            )
        return found

    def plan(self, scheduled: list[tuple[Instrument, Needs]], providers: Sequence[Provider], reuse: bool) -> tuple:
        """``Step.form_plan`` of these scheduled instruments, formed once and reused when ``reuse`` (none
        scheduled, or every one asked its NEEDS: ``_base_needs`` objects, alive as long as the process) and
        the same instrument objects ask the same needs again. At most ``MAX_PLANS`` are kept."""
        if not reuse:
            return Step.form_plan(scheduled, providers, self)
        key = tuple((id(inst), id(asked)) for inst, asked in scheduled)
        kept = self._plans.get(key)
        if kept is not None and all(a is b for a, (b, _) in zip(kept[0], scheduled, strict=True)):
            return kept[1]
        plan = Step.form_plan(scheduled, providers, self)
        if len(self._plans) >= MAX_PLANS:
            self._plans.clear()
        self._plans[key] = (tuple(inst for inst, _ in scheduled), plan)
        return plan

    def routes(self, plan: tuple) -> dict[str, tuple]:
        """The event routes (``Step._route``) of steps of ``plan``, kept for the last plan seen."""
        if self._routes[0] is not plan:
            self._routes = (plan, {})
        return self._routes[1]

    def every_step_plan(self, instruments: Sequence[Instrument], providers: Sequence[Provider]) -> tuple | None:
        """The plan of a step where every instrument tracks every step and asks its NEEDS (the base
        ``requires``, ``scheduled`` and ``due``, ``every=1``, no schedule, no gate: the usual run), formed
        once and reused while that holds for the same instrument objects with the same NEEDS; None
        otherwise (the step asks each instrument)."""
        kept = self._every_step
        if kept is not None and kept[3] is not None and len(kept[0]) == len(instruments):
            # the usual step: one pass tells that the plan formed holds (a plan is formed only where ``always``)
            for a, b, n in zip(kept[0], instruments, kept[2], strict=True):
                if a is not b or a._gate is not None or a.NEEDS is not n:
                    break
            else:
                return kept[3]
        if (
            kept is None
            or len(kept[0]) != len(instruments)
            or any(a is not b for a, b in zip(kept[0], instruments, strict=True))
        ):
            kept = self._every_step = (tuple(instruments), self._always_due(instruments), None, None)
        insts, always, asks, plan = kept
        if not always or any(inst._gate is not None for inst in insts):
            return None
        if plan is None or any(inst.NEEDS is not n for inst, n in zip(insts, asks, strict=True)):
            asks = tuple(inst.NEEDS for inst in insts)
            scheduled = [(inst, _base_needs(frozenset(n))) for inst, n in zip(insts, asks, strict=True)]
            plan = self.plan(scheduled, providers, True)
            self._every_step = (insts, True, asks, plan)
        return plan

    def gated(self, instruments: Sequence[Instrument], gates: Mapping[str, Any]) -> tuple:
        """Per instrument, (its key, its gate in ``gates``, its NEEDS, what it asks) where that gate holds it
        and it is due every step by the base schedule (:meth:`base_schedule`): scheduled iff the gate allows
        its key, asking its NEEDS; else None (it is asked). Kept for the same instrument objects and gates;
        a step checks that each still holds its gate and NEEDS."""
        kept = self._gated
        if (
            kept is not None
            and kept[0] is gates
            and len(kept[1]) == len(instruments)
            and all(a is b for a, b in zip(kept[1], instruments, strict=True))
        ):
            return kept[2]
        entries = []
        for inst in instruments:
            gate = gates.get(inst.key)
            held = gate is not None and inst._gate is gate and self.base_schedule(inst)
            entries.append((inst.key, gate, inst.NEEDS, _base_needs(frozenset(inst.NEEDS))) if held else None)
        self._gated = (gates, tuple(instruments), tuple(entries))
        return self._gated[2]

    def base_schedule(self, inst: Instrument) -> bool:
        """Whether ``inst`` keeps the base ``requires``, ``scheduled`` and ``due`` with ``every=1`` and no
        schedule: it asks its NEEDS on every step its gate allows (kept by object: these do not change)."""
        found = self._base.get(id(inst))
        if found is None or found[0] is not inst:
            found = self._base[id(inst)] = (inst, self._always_due([inst]))
        return found[1]

    @staticmethod
    def _always_due(instruments: Sequence[Instrument]) -> bool:
        """Whether each instrument keeps the base ``requires``, ``scheduled`` and ``due`` with ``every=1``
        and no schedule (what does not change during a run; a gate may)."""
        return all(
            getattr(inst, "_every_step", False)
            and not any(_overrides(type(inst), Instrument, m) for m in ("requires", "scheduled", "due"))
            for inst in instruments
        )

    def instrument(self, inst: Instrument, hook: str, *args: Any) -> Any:
        try:
            if hook in ("on_before_step", "on_after_step", "compute"):  # timed under the instrument's key
                return self.costs.call(inst.key, getattr(inst, hook), *args)
            return getattr(inst, hook)(*args)
        except Exception as e:
            self.warn(f"{inst.key}.{hook} failed: {type(e).__name__}: {e}")
            return None

    def each(self, objects: Sequence[Any], method: str, *args: Any) -> None:
        for obj in objects:
            try:
                getattr(obj, method)(*args)
            except Exception as e:
                self.warn(f"{type(obj).__name__}.{method} failed ({type(e).__name__}: {e})")


class Step:
    """Step ``number``: its scheduled instruments, their needs, the providers of those, the record."""

    def __init__(
        self,
        number: int,
        instruments: Sequence[Instrument],
        providers: Sequence[Provider],
        guard: Guard,
        gates: tuple[Mapping[str, Any], Callable[[int], frozenset[str]]] | None = None,
        **fields: Any,
    ):
        """``gates``: (the gate each instrument key was given, the keys those gates allow at a step: the
        overhead budget's decision). An instrument still holding its gate, due every step by the base
        schedule (:meth:`Guard.base_schedule`), is then scheduled iff its key is allowed, without asking it."""
        self.guard, self.t0, self.number = guard, time.perf_counter(), number
        self.skip = self.backward_done = self.in_backward = self.queued = False
        self.amp_scale = 1.0  #: GradScaler's loss scale of the current backward (1 without one)
        self.forwards: list[int | None] = []  #: examples of each (grad-enabled) model call of the step
        self.reached: set[int] = set()  #: the model calls (by position) whose outputs backward reached
        #: the optimizers (ids) that have stepped in this step, where the Cockpit has several (it ends with the last)
        self.stepped: set[int] = set()
        #: weak references to the model's outputs given a hook this step (backward is seen where it reaches one)
        self.hooked: list[weakref.ref] = []
        #: the last model call (by position) whose outputs were given a hook
        self.hooked_call: int | None = None
        #: iterations abandoned since the last optimizer step and before this step's (a retry after a
        #: backward with no step: see ``Cockpit._on_model_forward``)
        self.skipped = 0
        #: the gradients at the end of the last backward (``model_io.grad_marks``)
        self.grad_marks: tuple = ()
        #: (the step's costs, its wall time in ms) set aside by :meth:`launch` for a later :meth:`finish`
        self._held: tuple[Costs, float] | None = None
        guard.costs.reset(number)
        plan = guard.every_step_plan(instruments, providers) if gates is None else None  # (gated: never)
        if plan is not None:
            self._start(plan, providers, fields)
            return
        allowed: frozenset[str] = frozenset()
        if gates is not None:
            try:
                allowed = gates[1](number)  # (after the reset: the decision is timed with the step)
            except Exception as e:
                guard.warn(f"the overhead budget's decision failed ({type(e).__name__}: {e}): each instrument is asked")
                gates = None
        scheduled: list[tuple[Instrument, Needs]] = []
        base = True  # every scheduled instrument asks its NEEDS (a plan of the same ones can be reused)
        table = guard.gated(instruments, gates[0]) if gates is not None else None
        for k, inst in enumerate(instruments):
            entry = table[k] if table is not None else None
            if entry is not None and inst._gate is entry[1] and inst.NEEDS is entry[2]:
                if entry[0] in allowed:
                    scheduled.append((inst, entry[3]))
                continue
            asked = None
            if not _overrides(type(inst), Instrument, "requires"):  # the base's: NEEDS on its scheduled steps
                try:
                    if not inst.scheduled(number):
                        continue
                    asked = _base_needs(frozenset(inst.NEEDS))
                except Exception:  # (the guarded call below reports it)
                    pass
            if asked is None:
                base = False
                asked = guard.instrument(inst, "requires", number)
            if asked is None or not (asked or inst.scheduled(number)):
                continue
            scheduled.append((inst, asked))
        self._start(guard.plan(scheduled, providers, base or not scheduled), providers, fields)

    def _start(self, plan: tuple, providers: Sequence[Provider], fields: dict[str, Any]) -> None:
        """Take ``plan`` (``form_plan``'s), make the step record and begin its providers; tell the others
        that hear it that they rest this step."""
        guard = self.guard
        self.active, self.asked, merged, self.providers = plan
        if plan is not guard.last_plan:  # other work than the last step's: its costs are measured
            guard.last_plan = plan
            guard.costs.measuring = True
        #: event name -> :meth:`_route`, kept with the plan (the same plan object step after step)
        self._routes: dict[str, tuple] = guard.routes(plan)
        needs = Needs(set(merged.flags), dict(merged.directions), set(merged.early))  # (a provider may adjust its copy)
        #: the step record (None on a step no instrument tracks: nothing reads one)
        self.record: StepRecord | None = StepRecord(step=self.number, **fields) if self.active else None
        if self.record is not None:
            self.record.host.warn = guard.warn
        guard.each(guard.hearing(self.providers, Provider, "begin_step"), "begin_step", self.record, needs)
        guard.each(guard.resting(self.providers, providers), "rest_step")

    @staticmethod
    def form_plan(scheduled: list[tuple[Instrument, Needs]], providers: Sequence[Provider], guard: Guard) -> tuple:
        """(active instruments, need names each asked by key, the merged needs, the providers to run) for
        these scheduled instruments and what they asked; an instrument whose projection key another one
        uses for another direction is skipped with a warning."""
        active: list[Instrument] = []
        asked_by: dict[str, set[str]] = {}
        needs = Needs()
        for inst, asked in scheduled:
            clash = [k for k, fn in asked.directions.items() if needs.directions.get(k, fn) is not fn]
            if clash:
                guard.warn(
                    f"{inst.key} asks for projections under the key(s) {clash}, which another instrument uses "
                    "for another direction: it is skipped; give one of them name='...'"
                )
                continue
            needs.merge(asked)
            active.append(inst)
            asked_by[inst.key] = asked.names()
        wanted = closure(needs.names()) if active else set()
        run = tuple(p for p in providers if active and not p.idle and (type(p) in wanted or p.ALWAYS))
        return tuple(active), asked_by, needs, run

    def event(self, name: str, *args: Any) -> None:
        """Send a lifecycle event to the providers, then (record sealed) to the instruments that hear it."""
        rec = self.record
        found = self._routes.get(name)
        if found is None:
            found = self._routes[name] = self._route(name)
        providers, hook, hearing, reads = found
        for provider in providers:
            try:
                getattr(provider, name)(rec, *args)
            except Exception as e:
                self.guard.warn(f"{type(provider).__name__}.{name} failed ({type(e).__name__}: {e})")
                rec.add_note(f"{type(provider).__name__} failed: {e}", provider.PROVIDES)
        if hearing:
            if reads and rec.host.pending:
                rec.host.flush()  # what the providers filled at this event, as fields (one more transfer)
            rec.seal()
            for inst in hearing:
                self.guard.instrument(inst, hook, rec)
            rec.seal(False)

    def _route(self, name: str) -> tuple:
        """Who hears event ``name`` this step: (providers, the instruments' hook name, the instruments
        that hear it, whether one of them reads values in its hook)."""
        hook = INSTRUMENT_HOOKS.get(name)
        hearing = self.guard.hearing(self.active, Instrument, hook) if hook else ()
        reads = any(inst.READS_VALUES_IN_HOOKS for inst in hearing)
        return self.guard.hearing(self.providers, Provider, name), hook, hearing, reads

    def complete(self) -> dict[Any, Any]:
        """The optimizer has stepped: the providers' and instruments' ``on_after_step``, the step's numbers
        to the host by one transfer, then the records of the step: every instrument's, their notes, and
        the step's costs."""
        with self.guard.costs.region("after_step"):
            self.event("on_after_step")
            self.record.host.flush()  # the step's norms and per-sample vectors, by one transfer
        self.guard.costs.host_clock()  # (what follows is host work on the values: profiling.py)
        return self._records(self.guard.costs, None)

    def launch(self) -> None:
        """:meth:`complete` in two halves (``Cockpit(..., overlap=True)``): the ``on_after_step`` events
        and the transfer launched now (:meth:`HostBatch.start`); the step's costs and wall time so far are
        set aside, and :meth:`finish` makes the records during the next step."""
        with self.guard.costs.region("after_step"):
            self.event("on_after_step")
            self.record.host.start()
        self._held = (self.guard.costs.handover(), self.elapsed_ms())

    def finish(self) -> dict[Any, Any]:
        """The records of a launched step (:meth:`launch`): its values reach the providers' fields, then every
        instrument's ``compute``. Its own costs are those set aside; this work is the current step's
        (``cost/records_ms``, and each ``compute`` under its instrument's key)."""
        assert self._held is not None, "finish() after launch()"
        (costs, step_ms), self._held = self._held, None
        with self.guard.costs.region("records"):
            self.record.host.finish()
            return self._records(costs, step_ms)

    def _records(self, costs: Costs, step_ms: float | None) -> dict[Any, Any]:
        """Every active instrument's records and notes, then the costs (``step_ms`` None: the wall time
        until now)."""
        rec = self.record
        rec.seal()
        records: dict[Any, Any] = {}
        for inst in self.active:
            records.update(self.guard.instrument(inst, "compute", rec) or {})
            notes = [t for t, needs in zip(rec.notes, rec.note_needs, strict=True) if self._concerns(inst, needs)]
            notes += inst.take_notes()
            if notes:
                records[f"note/{inst.key}"] = "; ".join(notes)
        step_ms = self.elapsed_ms() if step_ms is None else step_ms
        # (every tracked step has its wall time; the regions' times where the step was measured)
        records.update(cost_records(costs, step_ms) if costs.measuring else {"cost/step_ms": step_ms})
        return records

    def elapsed_ms(self) -> float:
        """Wall time since the step began (the model's forward pre-hook), ms."""
        return (time.perf_counter() - self.t0) * 1e3

    def reach(self, index: int, grad: Any = None) -> None:
        """Backward reached an output of model call ``index`` (usable as a tensor hook: returns None)."""
        self.reached.add(index)

    def abandoned_calls(self) -> int:
        """The iterations of this step the loop abandoned before backward: runs of consecutive model calls
        whose outputs backward never reached, while it reached a later one (a forward after them was
        trained on). Several calls in one run are one iteration (a loss over two model calls, abandoned)."""
        if not self.reached:
            return 0
        last = max(self.reached)
        runs, inside = 0, False
        for k in range(last):
            missed = k not in self.reached
            runs += missed and not inside
            inside = missed
        return runs

    def end(self) -> None:
        """The step is over (completed or abandoned): providers release what it held."""
        if self.providers:
            self.guard.each(self.guard.hearing(self.providers, Provider, "end_step"), "end_step")

    def _concerns(self, inst: Instrument, needs: frozenset) -> bool:
        return not needs or bool(self.asked[inst.key] & needs)
