"""An overhead budget: ``Cockpit(..., budget=0.05)`` keeps the cockpit's measured share of wall time at
or below 5% over every window of 100 steps after a short warm-up, by running the costly instruments on
some steps only (all of them on the same steps, so needs they share are paid once) while the cheap ones
run on every step. The core knows no instrument by name: costs are measured (docs/budget.md).

**Accounting.** For step t, the cockpit's time is c_t = ``cost/cockpit_ms`` + ``cost/sinks_ms`` +
``cost/driver_ms`` (every timed region of the step, the budget's own decision among them, the sinks
writing its records, and its hooks' own time outside regions), and the step's wall time is w_t =
``cost/step_ms`` + ``cost/sinks_ms`` (from the model's forward pre-hook to the records being ready, then
the sinks). A step the cockpit does not track has c_t = the budget's decision and its hooks' time, and w_t
its time from the model's forward pre-hook to the optimizer's step post-hook. The share of a set of steps
W is S(W) = sum_{t in W} c_t / sum_{t in W} w_t. The hooks are a floor every step pays: h, the upper
quartile of ``cost/driver_ms`` over the last HOOKS steps no instrument ran on; an instrument's cost alone
(below) leaves them out, and every estimate before its first measurement adds h. When h alone exceeds the
budget (h > budget (p + h)), no schedule keeps it: the budget says so (a warning, the plan) and keeps the
instruments' work beyond the hooks (c_t without ``cost/driver_ms``) within the budget instead.

**Warm-up** (4 + 6n steps for n instruments): the first step runs every instrument (it pays the one-time
costs: allocations, the gradient-sum check, shape probes), the next runs none (the follow-ups of the
first: Alpha's end point). Then, in ROUNDS = 3 rounds, each instrument is measured alone on a step its
own schedule selects (the probe), followed by a step running nothing else (its follow-up, if any): its
cost alone is a_k = min over rounds of c(probe) + min over rounds of c(follow-up) (timing noise only
adds). An instrument whose own schedule selects none of 100 waiting steps is left unmeasured (and
costly). Last, IDLE = 2 steps run nothing: the hooks alone (a step's hooks' time holds the tail of the last
step's, so h is measured on a step after one that ran nothing).

**Classification.** With p the plain step (the smallest w_t - c_t of the last 16 steps), instruments
are taken in ascending order of a_k into the *cheap* set while sum a_k / (p + sum a_k) <= budget / 2;
the others are *costly*. Costly instruments (ascending a_k again) whose joining the group would leave no
room for a single run in a window by the warm-up's costs are *left out*: they cannot run within the
budget (the plan and a warning say so) and the affordable ones still run. Cheap instruments run on every
step (as their own schedules allow). Whenever
the last 8 rest steps (cheap instruments only) measure above 3/4 of the budget (the machine slowed down,
an instrument grew), the cheap instrument dearest alone joins the costly ones (a new ``budget/plan``).
When the costly ones have not fit a window for a whole window (no run for WINDOW steps with rest steps
that fit: a costly instrument grew after the warm-up), the costly instrument dearest alone is left out
too (a new ``budget/plan``, a warning), and the others run again.

**Scheduling** (from step T0, the first step after the warm-up). At step t the costly instruments run
(a *run* step) iff :meth:`Budget.interval` steps have passed since the last run (k = ceil(100 / N), N
the most runs a window of 100 steps can hold by the estimates below), one of them is due by its own
schedule, and every window of 100 consecutive steps starting at or after T0 that contains t or t + 1
keeps S <= budget, where steps before t count as measured, t at the cost of a run step, t + 1 at that
of the step after a run (the follow-ups), and later steps at that of a rest step, each estimated as the
upper quartile of its last measurements (8 runs, 8 steps after a run, 16 rest steps; before any, the
sums of the warm-up costs), with wall time p + cost. So the costly instruments run as often as the
budget allows (the interval is recorded), and a window that measured over the budget (noise) holds
them back until it is under again. k is taken anew on the two steps after a run (its measurements) and
from the step it has passed; while no run fits (k undefined), every RECHECK steps. In between, a step's
decision is a few comparisons: it is paid on every step.

**Guarantee.** If every step costs no more than its estimate, every window of 100 steps that starts at
or after T0 has S <= budget (tests/test_budget.py checks this on every window with an injected clock).
A measured cost above its estimate (timing noise, cheap instruments growing) can push a window over;
the measured steps then enter every later check, so costly work waits until the window is back under,
and cheap instruments that no longer fit are moved to the costly ones.

An instrument runs on a step only if both its own schedule (``every``/``schedule``) and the budget
allow it: the budget narrows the instrument's :meth:`~cockpit_lite.Instrument.scheduled`, so an
instrument's own follow-ups (Alpha's end point on the step after a start point) still run.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from cockpit_lite.instrument import Instrument
from cockpit_lite.ledger import HOOKS, RECENT, WINDOW, Ledger
from cockpit_lite.profiling import Costs

#: rest steps that tell whether the cheap instruments still fit (see ``DEMOTE``)
DEMOTE_STEPS = 8
#: rest steps (the cheap instruments alone) measured above this share of the budget move a cheap
#: instrument to the costly ones (the classification fills half the budget: the gap is hysteresis)
DEMOTE = 0.75
#: how many times the warm-up measures each instrument alone (the smallest cost counts: noise only adds)
ROUNDS = 3
#: steps that nothing tracks hold their ``budget/share`` records back until this many wait (or the next tracked
#: step's records, or the close): writing one record costs as much as a step's hooks (docs/budget.md)
FLUSH = 16
#: steps running nothing at the end of the warm-up: a step's ``cost/driver_ms`` holds the tail of the last
#: step's hooks (its records), so the hooks alone are measured on a step after one that ran nothing
IDLE = 2

#: while no run of the costly instruments fits a window, the interval is taken anew every RECHECK steps
RECHECK = 8

# kinds of step
FIRST, AFTER, PROBE, WAIT, RUN, FOLLOW, REST = "first", "after", "probe", "wait", "run", "follow", "rest"


def check_fraction(budget: Any) -> float | None:
    """``budget=`` of the Cockpit: None (no budget) or a share of wall time 0 < budget < 1."""
    if budget is None:
        return None
    ok = isinstance(budget, (int, float)) and not isinstance(budget, bool) and 0.0 < float(budget) < 1.0
    if not ok or not math.isfinite(float(budget)):
        raise ValueError(
            f"budget={budget!r}: give the largest share of wall time the cockpit may take, a number between "
            "0 and 1 (budget=0.05 for 5%), or budget=None to run every instrument on every step it is scheduled"
        )
    return float(budget)


@dataclass(frozen=True)
class Decision:
    """What the budget allows at ``step``: the kind of step and the keys of the instruments allowed."""

    step: int
    kind: str
    allowed: frozenset[str]
    probe: str | None = None  #: the instrument measured alone (warm-up probes and their follow-ups)


class Budget:
    """Schedules the costly instruments so that the cockpit's share of wall time stays <= ``fraction``
    over every window of ``WINDOW`` steps after the warm-up (the module docstring states the policy).

    Args:
        fraction: the largest share of wall time the cockpit may take, 0 < fraction < 1.
        warn: how to warn (the Cockpit's once-per-message warning).
        costs: the cockpit's timed regions; the budget's own decisions are timed under ``budget``.

    Attributes after the warm-up: :attr:`cheap`, :attr:`costly` and :attr:`unaffordable` (instrument
    keys), :attr:`start` (T0), :attr:`changed` (the step an instrument was last left out after T0),
    :attr:`solo_run` and :attr:`solo_follow` (each instrument's cost measured alone on its probe step and
    on the step after, ms), :attr:`every` (the interval k), :attr:`ran` (steps each instrument ran on, by
    its schedule and the budget), :attr:`steps` (steps seen), :meth:`hooks_ms` (the hooks' time a step),
    :attr:`beyond_hooks` (the hooks alone exceed the budget: it keeps the instruments' work beyond them)
    and :attr:`ledger` (what the last steps cost: :class:`cockpit_lite.ledger.Ledger`).
    """

    def __init__(self, fraction: float, warn: Callable[[str], None] | None = None, costs: Costs | None = None):
        checked = check_fraction(fraction)
        if checked is None:
            raise ValueError("Budget(None): give the share of wall time, 0 < fraction < 1")
        self.fraction = checked
        self.warn = warn or (lambda msg: None)
        self.costs = costs
        self._own: dict[str, Callable[[int], bool]] = {}
        #: the gate given to each instrument (by key): ``allows`` for its key
        self.gates: dict[str, Callable[[int], bool]] = {}
        self.keys: list[str] = []
        self._reset()

    def _reset(self) -> None:
        self.stage = FIRST  # FIRST -> AFTER -> PROBE (probes) -> RUN (scheduling)
        self.queue: list[str] = list(self.keys) * ROUNDS  # instruments still to measure alone
        self.waited = 0
        self.idle = 0  # steps that ran nothing at the warm-up's end (IDLE)
        self.solo_run: dict[str, float] = {}
        self.solo_follow: dict[str, float] = {}
        self.cheap: list[str] | None = None
        #: measured instruments one run of which costs more than a window's budget holds (with the cheaper
        #: costly ones): they cannot run within the budget and are left out (the plan says so)
        self.unaffordable: list[str] = []
        self.start: int | None = None
        #: the step of the latest change of the classification after T0 (an instrument left out, the hooks
        #: counted beyond for want of room)
        self.changed: int | None = None
        #: steps in a row a run was due and spaced but the window check held it back (estimates that no longer
        #: describe the group: after WINDOW of them the group is stalled, as when no run fits at all)
        self.refused = 0
        #: what the last steps cost (the rest steps' parts since the accounting or the cheap set last changed:
        #: whether the cheap instruments still fit, whether counting the hooks fits again)
        self.ledger = Ledger()
        #: True once the hooks alone took more than the budget of a step: from then on c_t leaves them out
        #: (the budget keeps the instruments' share beyond them; the plan and a warning say so)
        self.beyond_hooks = False
        self.last_run: int | None = None
        self.every: int | None = None
        #: while no run fits (``every`` None), the step the interval is taken anew
        self._recheck = 0
        self._warned = False
        self.ran: dict[str, int] = {k: 0 for k in self.keys}
        self.steps = 0
        self.decision: Decision | None = None
        self._pending: dict[Any, Any] = {}

    @property
    def costly(self) -> list[str] | None:
        """The instruments that are not cheap, in the cockpit's order (None before the classification)."""
        if self.cheap is None:
            return None
        return [k for k in self.keys if k not in self.cheap and k not in self.unaffordable]

    # --- attaching: the budget narrows each instrument's schedule ---------------------------------------
    def attach(self, instruments: Sequence[Instrument]) -> Callable[[], None]:
        """Narrow every instrument's ``scheduled(step)`` to its own schedule and the budget's decision;
        returns the function that restores them."""
        self.keys = [i.key for i in instruments]
        for inst in instruments:
            self._own[inst.key] = inst.due
            self.gates[inst.key] = functools.partial(self.allows, inst.key)
            inst.gate(self.gates[inst.key])
        self._reset()

        def detach() -> None:
            for inst in instruments:
                inst.gate(None)
            self.gates.clear()

        return detach

    def allowed(self, step: int) -> frozenset[str]:
        """The keys of the instruments the budget lets run at ``step`` (their own schedules aside)."""
        return self.decide(step).allowed

    def allows(self, key: str, step: int) -> bool:
        """Whether the budget lets instrument ``key`` run at ``step`` (its own schedule aside)."""
        return key in self.decide(step).allowed

    def decide(self, step: int) -> Decision:
        """The decision for ``step``, made once (at the step's first question) and kept."""
        if self.decision is None or self.decision.step != step:
            with self.costs.region("budget") if self.costs is not None else nullcontext():
                self.decision = self._choose(step)
                if self.decision.kind == RUN:
                    if self.last_run is not None and self.start is not None and self.last_run >= self.start:
                        self._pending[(step, "budget/interval")] = float(step - self.last_run)
                    self.last_run = step
        return self.decision

    def _due(self, key: str, step: int) -> bool:
        try:
            return bool(self._own[key](step))
        except Exception:
            return False

    def _choose(self, step: int) -> Decision:
        if self.stage == RUN and self.refused < WINDOW:
            # between runs, once a run and its follow-up are measured, the interval is taken anew once it has
            # passed (a later run, should the rest steps have grown cheaper since: the windows are kept
            # anyway); while no run fits, every RECHECK steps
            last, every = self.last_run, self.every
            if step < self._recheck if every is None else last is not None and 2 < step - last < every:
                return Decision(step, FOLLOW if last == step - 1 else REST, frozenset(self.cheap or ()))
        everyone = frozenset(self.keys)
        if self.stage == FIRST:
            self.stage = AFTER
            return Decision(step, FIRST, everyone)
        if self.stage == AFTER:
            self.stage = PROBE
            return Decision(step, AFTER, frozenset())
        if self.stage == PROBE:
            prev = self.decision
            if prev is not None and prev.kind == PROBE and prev.step == step - 1:
                return Decision(step, AFTER, frozenset(), prev.probe)
            for key in self.queue:
                if self._due(key, step):
                    self.queue.remove(key)
                    return Decision(step, PROBE, frozenset({key}), key)
            if self.queue and self.waited < WINDOW:
                self.waited += 1
                return Decision(step, WAIT, frozenset())
            if self.idle < IDLE:  # (steps after a step that tracked nothing: the hooks alone, h)
                self.idle += 1
                return Decision(step, WAIT, frozenset())
            self._classify(step)
        assert self.cheap is not None
        every = self.interval()
        if (every is None or self.refused >= WINDOW) and self._stalled(step):
            if len(self.costly or []) == 1 and not self.cheap and not self.beyond_hooks and self.hooks_ms() > 0:
                # leaving the last one out would leave nothing running, for want of room the hooks take
                self._exceed(step, self._plain(), self.hooks_ms(), room=True)
                self._reclassify(step)
            else:
                self._leave_out(step)
            self.refused = 0
            every = self.interval()
        if every is None:
            self._recheck = step + RECHECK
        if every != self.every:
            self.every = every
            self._pending[(step, "budget/every")] = float(every) if every is not None else math.inf
        spaced = every is not None and (self.last_run is None or step - self.last_run >= every)
        if spaced and any(self._due(k, step) for k in self.costly):
            if self._fits(step):
                self.refused = 0
                return Decision(step, RUN, everyone - frozenset(self.unaffordable))
            self.refused += 1
        kind = FOLLOW if self.last_run == step - 1 else REST
        return Decision(step, kind, frozenset(self.cheap))

    # --- the warm-up's outcome ----------------------------------------------------------------------------
    def _classify(self, step: int) -> None:
        p = self._plain()
        h = self.hooks_ms()
        if h > self.fraction * (p + h):
            self._exceed(step, p, h)
        cheap, unaffordable = self._split(p)
        if not self.beyond_hooks and h > 0 and self._none_affordable(unaffordable):
            # the hooks leave no room for any instrument: counted beyond them, at least one would run
            self.beyond_hooks = True
            beyond = self._split(p)
            self.beyond_hooks = False
            if len(beyond[1]) < len(unaffordable):
                self._exceed(step, p, h, room=True)
                cheap, unaffordable = beyond
        self.cheap, self.unaffordable = cheap, unaffordable
        self.start, self.stage = step, RUN
        self._pending[(step, "budget/plan")] = self.plan(p)
        if self.unaffordable:
            self.warn(
                f"overhead budget {self.fraction:.3g}: {', '.join(self.unaffordable)} cannot run within it (one run "
                f"costs more than a window of {WINDOW} steps allows: budget/plan gives the costs), left out. Raise "
                "the budget, or leave budget=None and give the costly instruments every=..."
            )

    def _split(self, p: float) -> tuple[list[str], list[str]]:
        """The cheap instruments (ascending cost alone, while they and the hooks fill at most half the
        budget) and the costly ones left out (the dearest whose joining the group leaves no run in a window),
        both in the cockpit's order, by the warm-up's costs and the plain step ``p``."""
        measured = sorted((k for k in self.keys if k in self.solo_run), key=lambda k: (self._solo(k), k))
        cheap, total = [], self.hooks_ms()
        for key in measured:
            a = self._solo(key)
            if (total + a) <= 0.5 * self.fraction * (p + total + a):
                cheap.append(key)
                total += a
            else:
                break
        cheap = [k for k in self.keys if k in cheap]  # (in the cockpit's order)
        # the costly ones run together: the dearest that would leave no run in a window are left out
        group = [k for k in self.keys if k not in cheap and k not in self.solo_run]  # (unmeasured: kept)
        costly = [k for k in measured if k not in cheap]
        for i, key in enumerate(costly):
            if not self._affordable(cheap, group + [key], p):
                return cheap, [k for k in self.keys if k in costly[i:]]
            group.append(key)
        return cheap, []

    def _affordable(self, cheap: Sequence[str], group: list[str], p: float) -> bool:
        """Whether the ``cheap`` instruments and ``group`` running together leave room for at least one
        run in a window of WINDOW steps, by the warm-up's costs (the estimates :meth:`interval` starts from)."""
        return self._window_runs(*(self._initial(k, group, cheap) for k in (RUN, FOLLOW, REST)), p) >= 1

    def _check_cheap(self, step: int) -> None:
        """The rest steps (cheap instruments only) must leave room for the costly ones: when the last
        DEMOTE_STEPS of them took more than DEMOTE x budget of their wall time, the cheap instrument
        dearest alone joins the costly ones (from the next step on; a new ``budget/plan`` says so)."""
        assert self.cheap is not None
        c, w, n = self.ledger.last_rest(DEMOTE_STEPS, self.beyond_hooks)
        share = c / w
        if share <= DEMOTE * self.fraction:
            return
        key = max(self.cheap, key=lambda k: (self._solo(k), k))
        self.cheap.remove(key)
        self.ledger.forget((REST, FOLLOW), rest=True)  # (they described the old sets)
        self._replan(step)
        if not self._warned:
            self._warned = True
            self.warn(
                f"overhead budget {self.fraction:.3g}: the instruments that run every step took {100 * share:.2g}% "
                f"of the last {n} such steps' wall time, more than {100 * DEMOTE:.0f}% of the budget: {key} "
                "now runs with the costly ones (budget/plan says what runs every step)"
            )

    def _stalled(self, step: int) -> bool:
        """Whether the costly group has not fit a window for a whole window of steps (no run fits by the
        estimates, or the window check held every due run back for WINDOW steps in a row: estimates that no
        longer describe the group), while the rest steps fit (the cheap instruments leave room: otherwise
        :meth:`_check_cheap` acts): one of its instruments, or the hooks, grew after the warm-up, and waiting
        would keep every one of them dark."""
        p = self.ledger.plain_ms()
        if p is None or self.start is None:
            return False
        since = max(x for x in (self.start, self.last_run, self.changed) if x is not None)
        if step - since < WINDOW or not self.costly:
            return False
        return self.fraction * p - (1.0 - self.fraction) * self.estimate(REST) > 0

    def _leave_out(self, step: int) -> None:
        """Leave out the costly instrument dearest alone (by the warm-up's costs): the run estimates
        described the old group and start again from the warm-up's sums of the smaller one."""
        key = max(self.costly or [], key=lambda k: (self._solo(k), k))
        self.unaffordable = [k for k in self.keys if k in self.unaffordable or k == key]
        self.changed = step
        self.ledger.forget((RUN, FOLLOW))
        self._replan(step)
        self.warn(
            f"overhead budget {self.fraction:.3g}: the instruments that run together have not fit a window of "
            f"{WINDOW} steps for {step - max(x for x in (self.start, self.last_run) if x is not None)} steps (one "
            f"of them costs more than in the warm-up): {key} is left out and the others run again. Raise the "
            "budget, or leave budget=None and give the costly instruments every=..."
        )

    def hooks_ms(self, counted: bool = True) -> float:
        """The hooks' estimate h (ms a step): the upper quartile of the cockpit's hooks' own time
        (``cost/driver_ms``) and the budget's decision over the last HOOKS steps no instrument tracked,
        after a step no instrument tracked (what every step pays: a step's hooks' time holds the tail of
        the last step's, its records; the hooks' time of a step running instruments is in its measured
        c_t); with ``counted``, 0 once the budget counts the instruments' work beyond the hooks
        (:attr:`beyond_hooks`)."""
        return 0.0 if counted and self.beyond_hooks else self.ledger.hooks_ms()

    def _exceed(self, step: int, p: float, h: float, room: bool = False) -> None:
        """The hooks alone take more than the budget of a step (``room``: so much of it that no instrument
        could run in any window), so no schedule can keep it with a statistic computed. From ``step`` on the
        budget keeps the instruments' share beyond the hooks (c_t without ``cost/driver_ms``), and says so
        (a warning; the plan)."""
        self._count(beyond=True)
        said = (
            "which leaves no room for any instrument in it: nothing would run."
            if room
            else "more than the budget: it cannot be kept on this step."
        )
        self.warn(
            f"overhead budget {self.fraction:.3g}: the cockpit's hooks alone take {100 * h / (p + h):.2g}% of a step "
            f"({h:.3g} ms of {p + h:.3g} ms, cost/driver_ms), {said} From here the budget keeps the instruments' "
            "work beyond the hooks within it. A larger step (batch) or a larger budget keeps it in full"
        )

    def _check_back(self, step: int) -> None:
        """Counting beyond the hooks: when the last HOOKS rest steps, the hooks counted, took at most
        DEMOTE x budget of their wall time (the hooks shrank, or the warm-up measured them high) and
        counting them leaves room for an instrument, the budget counts them again (a new ``budget/plan``)."""
        ledger = self.ledger
        c, w, _ = ledger.last_rest(HOOKS, beyond=False)
        if c > DEMOTE * self.fraction * w or ledger.plain_ms() is None:
            return
        # the floor from these steps' hooks (an upper bound where the cheap instruments ran on them)
        floor = deque((h + (t if not self.cheap else 0.0) for t, h, _ in ledger.rest), maxlen=HOOKS)
        kept, self.beyond_hooks = ledger.hooks, False
        ledger.hooks = floor
        cheap, unaffordable = self._split(self._plain())
        if self._none_affordable(unaffordable):  # (no room for any: stay beyond them)
            self.beyond_hooks, ledger.hooks = True, kept
            return
        self._count(beyond=False)
        self._reclassify(step, (cheap, unaffordable))

    def _count(self, beyond: bool) -> None:
        """Count the hooks (``beyond`` False) or the instruments' work beyond them: the recent estimates and
        rest steps described the other accounting."""
        self.beyond_hooks = beyond
        self.ledger.forget(RECENT, rest=True)

    def _reclassify(self, step: int, split: tuple[list[str], list[str]] | None = None) -> None:
        """After the accounting changed: the cheap, costly and left-out instruments again by the warm-up's
        costs (``split``: :meth:`_split`'s, when already made; an instrument left out for want of room may
        fit now, one that still does not is left out again a window later), a new ``budget/plan``."""
        self.cheap, self.unaffordable = split if split is not None else self._split(self._plain())
        self.changed = step
        self._replan(step)

    def _replan(self, step: int) -> None:
        """``budget/plan`` at ``step``: the classification changed."""
        self._pending[(step, "budget/plan")] = self.plan(self._plain())

    def _check_hooks(self, step: int) -> None:
        """With no cheap instrument left, the rest steps are the hooks alone: when the last DEMOTE_STEPS of
        them took more than the budget of their wall time, the costly instruments could never run again;
        the budget counts the instruments' work beyond the hooks from here (:meth:`_exceed`)."""
        c, w, n = self.ledger.last_rest(DEMOTE_STEPS, self.beyond_hooks)
        if c > self.fraction * w:
            self._exceed(step, (w - c) / n, c / n)
            self._reclassify(step)

    def _plain(self) -> float:
        """The plain step p (0 before any step is measured)."""
        p = self.ledger.plain_ms()
        return 0.0 if p is None else p

    def _none_affordable(self, unaffordable: Collection[str]) -> bool:
        """Whether every measured instrument is among ``unaffordable``: no room for any."""
        measured = [k for k in self.keys if k in self.solo_run]
        return bool(measured) and len(unaffordable) == len(measured)

    def _solo(self, key: str) -> float:
        return self.solo_run.get(key, 0.0) + self.solo_follow.get(key, 0.0)

    def plan(self, plain_ms: float | None = None) -> str:
        """The schedule chosen, in words (also written as ``budget/plan``)."""
        if self.cheap is None:
            return f"overhead budget {self.fraction:.3g}: warming up (measuring each instrument alone)"
        cost = lambda k: f"{k} {self._solo(k):.3g} ms" if k in self.solo_run else f"{k} not measured"  # noqa: E731
        every = ", ".join(map(cost, self.cheap)) or "none"
        some = ", ".join(map(cost, self.costly)) or "none"
        plain = f"; plain step {plain_ms:.3g} ms" if plain_ms is not None else ""
        h = self.hooks_ms(counted=False)
        if self.beyond_hooks:
            hooks = (
                f" The cockpit's hooks alone ({h:.3g} ms a step, cost/driver_ms) take more than the budget, or so "
                "much of it that no instrument could run: it keeps the instruments' work beyond them."
            )
        else:
            hooks = f" The cockpit's hooks take {h:.3g} ms every step, counted."
        out = ""
        if self.unaffordable:
            out = (
                f" Left out: {', '.join(map(cost, self.unaffordable))}: one run with them costs more than a window "
                f"of {WINDOW} steps allows"
                + (f" (as measured by step {self.changed})." if self.changed is not None else ".")
            )
        return (
            f"overhead budget {self.fraction:.3g} of wall time over any {WINDOW} steps from step {self.start}. "
            f"Every step: {every}. Together, on the steps the budget allows: {some} "
            f"(cost alone, measured in the warm-up{plain}).{hooks}{out}"
        )

    def _initial(self, kind: str, costly: Sequence[str] | None = None, cheap: Sequence[str] | None = None) -> float:
        """The estimate of a kind of step before any measurement of it: the hooks' time h
        (:meth:`hooks_ms`) and the sums of the warm-up costs of the ``cheap`` instruments (default:
        :attr:`cheap`) and the ``costly`` ones (default: :attr:`costly`, those that run together)."""
        every = self.cheap if cheap is None else cheap
        assert every is not None
        group = self.costly if costly is None else costly
        base = self.hooks_ms() + sum(self.solo_run.get(k, 0.0) for k in every)
        if kind == RUN:
            return base + sum(self.solo_run.get(k, 0.0) for k in group)
        if kind == FOLLOW:
            return base + sum(self.solo_follow.get(k, 0.0) for k in [*every, *group])
        return base + sum(self.solo_follow.get(k, 0.0) for k in every)

    def estimate(self, kind: str) -> float:
        """The cost (ms) a step of ``kind`` (run, follow, rest) is expected to have: the upper quartile
        of its recent measurements (the ceil(3n/4)-th smallest of n: the largest of up to 3, and one
        or two preempted steps among 8 neither count nor stall the schedule), before any the sums of
        the warm-up costs."""
        found = self.ledger.estimate(kind)
        return self._initial(kind) if found is None else found

    def interval(self) -> int | None:
        """The interval k (steps) between runs of the costly instruments. A window of WINDOW steps with
        n runs, each a run step (r) and its follow-up (f), and WINDOW - 2n rest steps (b), each of plain
        time p plus its cost, keeps the budget iff n (1 - budget)(r + f - 2b) <= WINDOW (budget p -
        (1 - budget) b); N is the largest such n, and k = ceil(WINDOW / N) puts at most N runs in any
        window. None when not even one run fits (the costly instruments wait: the estimates may fall)."""
        p = self.ledger.plain_ms()
        if p is None:
            return None
        most = self._window_runs(self.estimate(RUN), self.estimate(FOLLOW), self.estimate(REST), p)
        return math.ceil(WINDOW / min(most, WINDOW)) if most >= 1 else None

    def _window_runs(self, r: float, f: float, b: float, p: float) -> int:
        """The most runs N a window of WINDOW steps holds within the budget, with a run step costing r, its
        follow-up f, a rest step b and the plain step p (WINDOW when a run costs no more than two rest steps
        and rest steps fit; < 1: none): the largest n with n (1 - budget)(r + f - 2b) <= WINDOW (budget p -
        (1 - budget) b)."""
        beta = self.fraction
        per_run = (1.0 - beta) * (r + f - 2.0 * b)
        room = WINDOW * (beta * p - (1.0 - beta) * b)
        if per_run <= 0:  # a run costs no more than two rest steps
            return WINDOW if room >= 0 else 0
        return math.floor(room / per_run + 1e-9)

    def _fits(self, step: int) -> bool:
        """Whether running the costly instruments at ``step`` keeps every window of WINDOW steps that
        starts at or after T0 and contains ``step`` or ``step + 1`` at a share <= the budget.

        With the surplus g_t = c_t - budget w_t of each step, a window W keeps S(W) <= budget iff
        sum_{t in W} g_t <= 0. The window starting k steps before ``step`` holds the k measured steps
        before it (a step not measured counts 0), the run step, the follow-up if k <= WINDOW - 2 and
        max(WINDOW - 2 - k, 0) rest steps, each predicted at wall time p + its cost."""
        p = self.ledger.plain_ms()
        if p is None or self.start is None:
            return False
        beta = self.fraction
        g_run, g_follow, g_rest = (x - beta * (p + x) for x in (self.estimate(k) for k in (RUN, FOLLOW, REST)))
        if g_follow + (WINDOW - 1) * g_rest > 0:  # the window that starts at step + 1
            return False
        lo = max(self.start, step - WINDOW + 1)
        g = [0.0] * (step - lo)  # measured steps lo .. step - 1
        for s, c, w in self.ledger.measured(lo, step):
            g[s - lo] = c - beta * w
        total = 0.0  # sum of g over the k measured steps before step
        for k in range(step - lo + 1):
            if k:
                total += g[-k]
            rest = WINDOW - 2 - k
            if total + g_run + (g_follow + rest * g_rest if rest >= 0 else 0.0) > 0:
                return False
        return True

    # --- measurements -----------------------------------------------------------------------------------
    def observe(
        self,
        step: int,
        cockpit_ms: float,
        wall_ms: float,
        ran: Collection[str] = (),
        hooks_ms: float = 0.0,
        quiet: bool | None = None,
    ) -> None:
        """Step ``step`` is over: the cockpit's timed work took ``cockpit_ms`` and its hooks' own time
        ``hooks_ms`` (``cost/driver_ms``) of the step's ``wall_ms`` (the first and the last with the
        sinks); ``ran`` are the instruments that ran on it by their schedule and the budget; ``quiet``:
        no instrument tracked it, not even for a follow-up (no records: default, ``ran`` is empty)."""
        d = self.decision if self.decision is not None and self.decision.step == step else None
        kind = d.kind if d is not None else REST
        timed, hooks, w = float(cockpit_ms), float(hooks_ms), float(wall_ms)
        if not (math.isfinite(timed) and math.isfinite(hooks) and math.isfinite(w)) or w <= 0:
            return
        self.steps += 1
        for key in ran:
            self.ran[key] = self.ran.get(key, 0) + 1
        quiet = not ran if quiet is None else quiet
        ledger = self.ledger
        ledger.add(step, kind, timed, hooks, w, quiet, self.beyond_hooks, kind == FIRST)
        # an instrument's cost alone leaves out the hooks' time: every step pays that (h, hooks_ms)
        if kind == PROBE and d is not None and d.probe is not None:
            self.solo_run[d.probe] = min(timed, self.solo_run.get(d.probe, math.inf))
        elif kind == AFTER and d is not None and d.probe is not None:
            self.solo_follow[d.probe] = min(timed, self.solo_follow.get(d.probe, math.inf))
        if kind == REST:
            if self.beyond_hooks and len(ledger.rest) == HOOKS:
                self._check_back(step)
            if len(ledger.rest) >= DEMOTE_STEPS:
                if self.cheap:
                    self._check_cheap(step)
                elif self.cheap is not None and not self.beyond_hooks:
                    self._check_hooks(step)
        self._pending[(step, "budget/share")] = ledger.share()

    def waiting(self) -> bool:
        """Whether records wait that a step nothing tracks should write now: anything but ``budget/share``
        (a plan, an interval), or FLUSH steps' shares (a live view sees them every FLUSH steps at most)."""
        pending = self._pending
        return len(pending) >= FLUSH or any(tag != "budget/share" for _, tag in pending)

    def records(self) -> dict[Any, Any]:
        """Records waiting to be written (late records ``(step, tag)``): ``budget/share`` of the steps
        observed, ``budget/interval`` of each run step, ``budget/plan`` when the warm-up ends and when the
        classification changes."""
        out, self._pending = self._pending, {}
        return out

    def thinned(self, key: str) -> tuple[int, int] | None:
        """``(steps instrument key ran on, steps seen)`` when the budget runs it on some steps only (a
        costly or left-out instrument, or any during the warm-up), else None."""
        if self.cheap is not None and key in self.cheap:
            return None
        return self.ran.get(key, 0), self.steps

    # --- state (resuming a run) ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The warm-up's progress and measurements, the classification, the last WINDOW steps' costs and
        the estimates, the steps each instrument ran on: plain Python values."""
        d = self.decision
        return {
            "fraction": self.fraction,
            "keys": list(self.keys),
            "stage": self.stage,
            "queue": list(self.queue),
            "waited": self.waited,
            "solo_run": dict(self.solo_run),
            "solo_follow": dict(self.solo_follow),
            "cheap": None if self.cheap is None else list(self.cheap),
            "unaffordable": list(self.unaffordable),
            "start": self.start,
            "changed": self.changed,
            "refused": self.refused,
            **self.ledger.state_dict(),
            "idle": self.idle,
            "beyond_hooks": self.beyond_hooks,
            "last_run": self.last_run,
            "every": self.every,
            "ran": dict(self.ran),
            "steps": self.steps,
            "decision": None if d is None else [d.step, d.kind, sorted(d.allowed), d.probe],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. This budget's fraction is kept (a resumed run may change it). A
        state saved with other instruments (by key) is refused with a ValueError."""
        if sorted(state["keys"]) != sorted(self.keys):
            raise ValueError(
                f"the saved overhead budget scheduled the instruments {sorted(state['keys'])}, this cockpit has "
                f"{sorted(self.keys)}: leave 'budget' out of the state to warm up afresh"
            )
        self._reset()
        self.stage, self.waited = str(state["stage"]), int(state["waited"])
        self.queue = [str(k) for k in state["queue"]]
        self.solo_run = {str(k): float(v) for k, v in state["solo_run"].items()}
        self.solo_follow = {str(k): float(v) for k, v in state["solo_follow"].items()}
        self.cheap = None if state["cheap"] is None else [str(k) for k in state["cheap"]]
        self.unaffordable = [str(k) for k in state.get("unaffordable", [])]
        self.start = None if state["start"] is None else int(state["start"])
        self.changed = None if state.get("changed") is None else int(state["changed"])
        self.refused = int(state.get("refused", 0))
        self.ledger.load_state_dict(state)
        self.idle = int(state.get("idle", IDLE))
        self.beyond_hooks = bool(state.get("beyond_hooks", False))
        self.last_run = None if state["last_run"] is None else int(state["last_run"])
        self.every = None if state["every"] is None else int(state["every"])
        self.ran = {str(k): int(v) for k, v in state["ran"].items()}
        self.steps = int(state["steps"])
        d = state["decision"]
        self.decision = None if d is None else Decision(int(d[0]), str(d[1]), frozenset(d[2]), d[3])
