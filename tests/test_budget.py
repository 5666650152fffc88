"""The overhead budget (``Cockpit(..., budget=...)``, cockpit_lite/budget.py).

No test here depends on the machine's speed: the cockpit's clock (``time.perf_counter`` as the timed
regions, the step and the sinks read it) is replaced by a fake one that moves only when a test says so.
The training loop advances it by the plain step (10 ms), and test instruments by their cost inside
their timed ``compute``. The window guarantee is then checked on the records (``cost/cockpit_ms``,
``cost/sinks_ms``, ``cost/step_ms``), i.e. on the costs as the cockpit measured them, summed here over
every window of 100 steps: an independent sum, not the budget's own bookkeeping.
"""

from __future__ import annotations

import io
import math
import types
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from cockpit_lite.instruments import presets
from torch import nn

from cockpit_lite import Cockpit, Instrument, Need, Needs, emitter, lifecycle, profiling
from cockpit_lite import budget as budget_mod
from cockpit_lite.budget import IDLE, ROUNDS, WINDOW, Budget
from cockpit_lite.errors import CockpitWarning

PLAIN_MS = 10.0


class Clock:
    """A perf_counter that moves only when told (seconds, like the real one)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def perf_counter(self) -> float:
        return self.t

    def advance(self, ms: float) -> None:
        self.t += ms / 1e3


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    fake = types.SimpleNamespace(perf_counter=c.perf_counter)
    for module in (profiling, lifecycle, emitter):
        monkeypatch.setattr(module, "time", fake)
    return c


class Costing(Instrument):
    """Costs ``ms`` of the cockpit's (fake) time on each step it runs, and ``follow_ms`` on the step
    after (a follow-up it asks for itself, like Alpha's end point); records the steps."""

    def __init__(self, clock: Clock, ms: float, follow_ms: float = 0.0, verdict: str | None = None, **kw):
        super().__init__(**kw)
        self.clock, self.ms, self.follow_ms, self.verdict = clock, ms, follow_ms, verdict
        self.last: int | None = None

    def requires(self, step: int) -> Needs:
        follow = self.follow_ms > 0 and self.last == step - 1
        return Needs({Need.LOSS}) if self.scheduled(step) or follow else Needs()

    def compute(self, record):
        out = {}
        if self.follow_ms > 0 and self.last == record.step - 1:
            self.clock.advance(self.follow_ms)
            out[self.tag("end")] = float(self.last)
        if self.scheduled(record.step):
            self.clock.advance(self.ms)
            self.last = record.step
            out[self.tag("value")] = float(record.step)
        return out

    def verdicts(self):
        return [self.verdict] if self.verdict else []

    def state_dict(self):
        return {"last": self.last}

    def load_state_dict(self, state):
        self.last = state["last"]


def instruments(clock: Clock) -> list[Instrument]:
    return [
        Costing(clock, 0.05, name="cheap"),
        Costing(clock, 8.0, name="costly", verdict="costly says so"),
        Costing(clock, 2.0, follow_ms=1.0, name="paired", verdict="paired says so"),
    ]


def tiny():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.01), nn.MSELoss()


def train(cockpit: Cockpit, model, opt, loss_fn, clock: Clock, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
        loss_fn(model(x), y).backward()
        clock.advance(PLAIN_MS)  # the plain step's own work
        opt.step()
        opt.zero_grad()


def series(history, tag: str) -> dict[int, float]:
    try:
        return {s: v for s, v in history[tag]}
    except KeyError:  # no record under tag
        return {}


def window_shares(history, start: int, stop: int) -> list[tuple[int, float]]:
    """(first step, share) of every window of WINDOW steps within [start, stop), from the records (a
    step where nothing ran has none: the cockpit took 0 ms of its PLAIN_MS)."""
    cockpit, step, sinks = (series(history, t) for t in ("cost/cockpit_ms", "cost/step_ms", "cost/sinks_ms"))
    c = np.array([cockpit.get(s, 0.0) + sinks.get(s, 0.0) for s in range(start, stop)])
    w = np.array([step.get(s, PLAIN_MS) + sinks.get(s, 0.0) for s in range(start, stop)])
    return [(start + i, c[i : i + WINDOW].sum() / w[i : i + WINDOW].sum()) for i in range(len(c) - WINDOW + 1)]


def run(clock, steps, budget=0.05, tmp_path=None, **kw):
    model, opt, loss_fn = tiny()
    cockpit = Cockpit(model, opt, loss_fn, instruments=instruments(clock), sinks=[], budget=budget, **kw)
    train(cockpit, model, opt, loss_fn, clock, steps)
    return cockpit


# --- the window guarantee ------------------------------------------------------------------------------------
def test_every_window_after_warmup_within_budget_cheap_every_step(clock):
    steps = 420
    with run(clock, steps) as cockpit:
        b, h = cockpit.budget, cockpit.history
        # warm-up: step 0 all, 1 none, then ROUNDS times each instrument alone (each followed by a step of
        # nothing else), then IDLE steps of nothing (the hooks alone)
        assert ROUNDS == 3 and IDLE == 2 and b.start == 2 + 2 * 3 * 3 + 2
        assert b.cheap == ["cheap"] and b.costly == ["costly", "paired"]
        assert b.solo_run == pytest.approx({"cheap": 0.05, "costly": 8.0, "paired": 2.0}, abs=1e-6)
        assert b.solo_follow == pytest.approx({"cheap": 0.0, "costly": 0.0, "paired": 1.0}, abs=1e-6)
        shares = window_shares(h, b.start, steps)
        assert len(shares) == steps - b.start - WINDOW + 1
        worst = max(s for _, s in shares)
        assert worst <= 0.05 + 1e-9, worst
        # cheap statistics on every step after the warm-up; during it on step 0 and its probe step only
        cheap = set(series(h, "cheap/value"))
        assert set(range(b.start, steps)) <= cheap
        assert cheap & set(range(b.start)) == {0, 2, 8, 14}
        # the costly ones run together, and as often as the budget allows: a window of 100 steps with n
        # runs costs c = n * 11.1 ms (10.05 at the run step, 1.05 after it) + (100 - 2n) * 0.05 ms of
        # w = 1000 ms + c, which holds 4 runs and not 5: every window holds 4
        share_of = lambda n: (n * 11.1 + (100 - 2 * n) * 0.05) / (1000 + n * 11.1 + (100 - 2 * n) * 0.05)  # noqa: E731
        assert share_of(4) <= 0.05 < share_of(5)
        runs = sorted(s for s in series(h, "costly/value") if s >= b.start)
        assert runs == sorted(s for s in series(h, "paired/value") if s >= b.start)
        for first, _ in shares:
            assert sum(first <= r < first + WINDOW for r in runs) == 4
        # its follow-ups: after step 0 (everything runs), after its probes (steps 6, 12, 18), after each run
        assert set(series(h, "paired/end")) == {1, 7, 13, 19} | {r + 1 for r in runs if r + 1 < steps}


def test_schedule_recorded_share_and_interval(clock):
    steps = 260
    with run(clock, steps) as cockpit:
        b, h = cockpit.budget, cockpit.history
        runs = sorted(s for s in series(h, "costly/value") if s >= b.start)
        interval = series(h, "budget/interval")
        assert interval == {r: float(r - q) for q, r in zip(runs, runs[1:], strict=False)}
        # the interval chosen: 100 / 4, 4 being the most runs a window can hold (the test above)
        assert series(h, "budget/every") == {b.start: 25.0}
        assert set(interval.values()) == {25.0} and runs[0] == b.start
        plan = series(h, "budget/plan")
        assert list(plan) == [b.start]
        assert "Every step: cheap 0.05 ms" in plan[b.start] and "costly 8 ms, paired 3 ms" in plan[b.start]
        # budget/share of step t: the measured share of steps t-99..t (fewer at the start), from the records
        share = series(h, "budget/share")
        cockpit_ms, step_ms = series(h, "cost/cockpit_ms"), series(h, "cost/step_ms")
        # nothing ran (not even a follow-up) after the probes of cheap and costly, nor on the IDLE steps: 0 ms
        assert set(range(steps)) - set(step_ms) == {3, 5, 9, 11, 15, 17, 20, 21}
        for t in (0, 5, 50, 99, 150, steps - 2):
            ws = range(max(0, t - WINDOW + 1), t + 1)
            want = sum(cockpit_ms.get(s, 0.0) for s in ws) / sum(step_ms.get(s, PLAIN_MS) for s in ws)
            assert share[t] == pytest.approx(want, rel=1e-9)
    assert series(cockpit.history, "budget/share").keys() == set(range(steps))  # the last one at close


def test_an_instrument_no_window_can_hold_is_left_out_and_the_others_still_run(clock):
    """One run of `huge` (200 ms) costs more than a window's 5% of 100 plain steps (about 53 ms) holds: the
    costly group with it would never run (`budget/every` inf, everything but the cheap ones dark); it is
    left out instead, the plan and a warning say so, its verdicts say on how few steps they rest, and the
    affordable costly instrument runs as often as the budget allows."""
    model, opt, loss_fn = tiny()
    insts = [
        Costing(clock, 0.05, name="cheap"),
        Costing(clock, 8.0, name="costly"),
        Costing(clock, 200.0, name="huge", verdict="huge says so"),
    ]
    steps = 300
    with pytest.warns(CockpitWarning, match="huge cannot run within it"):
        cockpit = Cockpit(model, opt, loss_fn, instruments=insts, sinks=[], budget=0.05)
        train(cockpit, model, opt, loss_fn, clock, steps)
    with cockpit:
        b, h = cockpit.budget, cockpit.history
        assert b.cheap == ["cheap"] and b.costly == ["costly"] and b.unaffordable == ["huge"]
        plan = series(h, "budget/plan")[b.start]
        assert "Left out: huge 200 ms" in plan and "Together, on the steps the budget allows: costly 8 ms" in plan
        assert all(s < b.start for s in series(h, "huge/value"))  # the warm-up only
        runs = [s for s in series(h, "costly/value") if s >= b.start]
        assert len(runs) >= (steps - b.start) // WINDOW * 4  # 10.05 ms a run: 4 fit in a window, as above
        assert max(s for _, s in window_shares(h, b.start, steps)) <= 0.05 + 1e-9
        warmup_runs = len(series(h, "huge/value"))
        assert cockpit.verdicts() == [
            f"huge says so (from {warmup_runs} of {steps} steps: the overhead budget ran huge on these only)"
        ]
        state = cockpit.state_dict()["budget"]
    assert state["unaffordable"] == ["huge"]


def test_a_costly_instrument_that_grows_past_any_window_is_left_out_later(clock):
    """`costly` grows from 8 ms to 200 ms after the warm-up: its runs push windows over until the run
    estimate has grown (upper quartile of the last 8 runs), then no run fits a window (`budget/every`
    inf) and, without the re-check, `paired` would stay dark with it. After a whole window without a run
    the dearest costly instrument is left out (a warning, a new plan, the state), `paired` runs again,
    and every window after that keeps the budget."""
    model, opt, loss_fn = tiny()
    insts = instruments(clock)
    steps = 1000
    with pytest.warns(CockpitWarning, match="costly is left out and the others run again"):
        cockpit = Cockpit(model, opt, loss_fn, instruments=insts, sinks=[], budget=0.05)
        train(cockpit, model, opt, loss_fn, clock, 100)
        insts[1].ms = 200.0
        train(cockpit, model, opt, loss_fn, clock, steps - 100, seed=1)
    with cockpit:
        b, h = cockpit.budget, cockpit.history
        assert b.unaffordable == ["costly"] and b.costly == ["paired"] and b.changed is not None
        every = series(h, "budget/every")
        assert math.inf in every.values() and every[max(every)] < math.inf  # stalled, then runs again
        stalled = [s for s, v in every.items() if v == math.inf]
        runs = sorted(series(h, "paired/value"))
        assert b.changed - max(r for r in runs if r < b.changed) >= WINDOW  # a whole window without a run
        assert sum(r > b.changed for r in runs) >= (steps - b.changed) // WINDOW * 10  # 3 ms a run: 10 fit
        assert all(s <= b.changed for s in series(h, "costly/value")) and min(stalled) < b.changed
        plans = series(h, "budget/plan")
        assert "Left out: costly 8 ms" in plans[b.changed] and "Together, on the steps the budget allows: paired" in (
            plans[b.changed]
        )
        assert max(s for _, s in window_shares(h, b.changed, steps)) <= 0.05 + 1e-9
        state = cockpit.state_dict()["budget"]
    assert state["unaffordable"] == ["costly"] and state["changed"] == b.changed


def test_instruments_own_schedule_and_budget_both_apply(clock):
    model, opt, loss_fn = tiny()
    insts = [
        Costing(clock, 0.05, name="cheap", every=3),
        Costing(clock, 8.0, name="costly", every=2),
    ]
    with Cockpit(model, opt, loss_fn, instruments=insts, sinks=[], budget=0.05) as cockpit:
        train(cockpit, model, opt, loss_fn, clock, 300)
        b, h = cockpit.budget, cockpit.history
        assert b.cheap == ["cheap"] and b.costly == ["costly"]
        assert set(series(h, "cheap/value")) >= {s for s in range(b.start, 300) if s % 3 == 0}
        assert all(s % 3 == 0 for s in series(h, "cheap/value"))
        costly = [s for s in series(h, "costly/value") if s >= b.start]
        assert costly and all(s % 2 == 0 for s in costly) and len(costly) < (300 - b.start) / 2
        assert max(s for _, s in window_shares(h, b.start, 300)) <= 0.05 + 1e-9


def test_costs_above_the_estimate_hold_costly_work_back(clock):
    """A costly step that costs more than measured in the warm-up (here: 3x from step 100 on) pushes
    at most the windows around that one step over; the next run waits until the measured window is
    back under the budget."""
    steps = 400
    model, opt, loss_fn = tiny()
    insts = instruments(clock)
    with Cockpit(model, opt, loss_fn, instruments=insts, sinks=[], budget=0.05) as cockpit:
        train(cockpit, model, opt, loss_fn, clock, 100)
        insts[1].ms = 24.0
        train(cockpit, model, opt, loss_fn, clock, steps - 100, seed=1)
        h = cockpit.history
        runs = sorted(s for s in series(h, "costly/value") if s >= 100)
        over = [first for first, s in window_shares(h, cockpit.budget.start, steps) if s > 0.05 + 1e-9]
        assert over and all(first <= runs[0] < first + WINDOW for first in over)  # only the first dear run
        assert all(s <= 0.05 + 1e-9 for first, s in window_shares(h, runs[0] + 1, steps))


class Spiky(Costing):
    """Costs ``spike_ms`` more on its first run at or after step 100 (a preempted step)."""

    spike_ms, spiked = 400.0, None

    def compute(self, record):
        if self.spiked is None and record.step >= 100 and self.scheduled(record.step):
            self.spiked = record.step
            self.clock.advance(self.spike_ms)
        return super().compute(record)


def test_one_preempted_run_neither_counts_nor_stalls(clock):
    """A run 40x dearer than usual (another process took the CPU) pushes the windows that hold it over
    the budget; it does not enter the estimates (upper quartile of the last 8 runs), so the schedule
    goes on at the same interval, and every window without it keeps the budget."""
    model, opt, loss_fn = tiny()
    insts = instruments(clock)
    insts[1] = Spiky(clock, 8.0, name="costly")
    with Cockpit(model, opt, loss_fn, instruments=insts, sinks=[], budget=0.05) as cockpit:
        train(cockpit, model, opt, loss_fn, clock, 500)
        b, h, spike = cockpit.budget, cockpit.history, insts[1].spiked
        assert spike is not None and series(h, "budget/every") == {b.start: 25.0}
        runs = [s for s in series(h, "costly/value") if s > spike]
        assert len(runs) >= 10 and b.every == 25
        shares = window_shares(h, b.start, 500)
        assert all(s <= 0.05 + 1e-9 for first, s in shares if not first <= spike < first + WINDOW)
        assert any(s > 0.05 for first, s in shares if first <= spike < first + WINDOW)


def test_cheap_set_fills_half_the_budget_and_an_overrun_moves_one_to_the_costly(clock, recwarn):
    model, opt, loss_fn = tiny()
    insts = [Costing(clock, 0.2, name=f"c{i}") for i in range(4)] + [Costing(clock, 8.0, name="costly")]
    with Cockpit(model, opt, loss_fn, instruments=insts, sinks=[], budget=0.05) as cockpit:
        train(cockpit, model, opt, loss_fn, clock, 42)
        b = cockpit.budget
        # each alone is 2% of a step: the cheap set takes them while their sum stays <= budget / 2
        assert b.cheap == ["c0"] and b.costly == ["c1", "c2", "c3", "costly"]
        assert not [w for w in recwarn if "budget" in str(w.message)]
        grown = cockpit.step
        insts[0].ms = 1.0  # the cheap one grows to 9% of a step: more than 3/4 of the budget
        # after two such steps the last 8 rest steps measure (6 x 0.2 + 2 x 1) / (8 x 10 + 3.2) = 3.8% > 3.75%
        with pytest.warns(
            Warning, match=r"took 3.8% of the last 8 such steps' wall time, more than 75% of the budget: c0"
        ):
            train(cockpit, model, opt, loss_fn, clock, 30)
        assert b.cheap == [] and b.costly == ["c0", "c1", "c2", "c3", "costly"]
        plans = series(cockpit.history, "budget/plan")
        assert len(plans) == 2 and "Every step: none" in plans[max(plans)]
        moved = max(plans)
        train(cockpit, model, opt, loss_fn, clock, 300)
        h = cockpit.history
        assert not set(series(h, "c0/value")) >= set(range(moved + 1, cockpit.step))
        shares = window_shares(h, b.start, cockpit.step)
        assert all(s <= 0.05 + 1e-9 for first, s in shares if first > moved or first + WINDOW <= grown)
        assert sum(first > moved for first, _ in shares) > 100 and len(series(h, "costly/value")) > 10


# --- the hooks' own time (cost/driver_ms) -----------------------------------------------------------------
@pytest.fixture
def hooks(clock, monkeypatch):
    """The cockpit's hooks take ``hooks.ms`` of the fake clock on every step, outside any timed region
    (while the step is formed, inside its wall time): ``cost/driver_ms``."""
    start = lifecycle.Step._start
    state = types.SimpleNamespace(ms=0.0)

    def slow(self, *args, **kwargs):
        clock.advance(state.ms)
        return start(self, *args, **kwargs)

    monkeypatch.setattr(lifecycle.Step, "_start", slow)
    return state


def shares_with_hooks(
    history, hooks_ms: dict[int, float], start: int, stop: int, counted: bool = True
) -> list[tuple[int, float]]:
    """(first step, share) of every window of WINDOW steps in [start, stop), the hooks' time counted: c_t =
    cost/cockpit_ms + cost/sinks_ms + cost/driver_ms (a step without records: its hooks, ``hooks_ms``),
    w_t = cost/step_ms + cost/sinks_ms (without records: PLAIN_MS and its hooks). Without ``counted``, c_t
    leaves the hooks out (w_t still holds them)."""
    cockpit, step, sinks, driver = (
        series(history, t) for t in ("cost/cockpit_ms", "cost/step_ms", "cost/sinks_ms", "cost/driver_ms")
    )
    own = {s: driver.get(s, hooks_ms[s]) if counted else 0.0 for s in range(start, stop)}
    c = np.array([cockpit.get(s, 0.0) + sinks.get(s, 0.0) + own[s] for s in range(start, stop)])
    w = np.array([step.get(s, PLAIN_MS + hooks_ms[s]) + sinks.get(s, 0.0) for s in range(start, stop)])
    return [(start + i, c[i : i + WINDOW].sum() / w[i : i + WINDOW].sum()) for i in range(len(c) - WINDOW + 1)]


def test_the_hooks_own_time_is_counted_every_step(clock, hooks):
    """The hooks take 0.2 ms a step (2% of the plain step): the budget counts them on every step, so a
    window holds 2 runs of the costly group instead of 4 (the first test), and every window keeps 5% with
    them counted (independently summed from the records, cost/driver_ms included)."""
    hooks.ms, steps = 0.2, 420
    with run(clock, steps) as cockpit:
        b, h = cockpit.budget, cockpit.history
        assert b.hooks_ms() == pytest.approx(0.2) and not b.beyond_hooks
        assert b.cheap == ["cheap"] and b.costly == ["costly", "paired"]
        assert [v for _, v in h["cost/driver_ms"]] == pytest.approx([0.2] * len(h["cost/driver_ms"]))
        shares = shares_with_hooks(h, {s: 0.2 for s in range(steps)}, b.start, steps)
        assert max(s for _, s in shares) <= 0.05 + 1e-9
        # a window with n runs: n x 11.1 ms of runs, (100 - 2n) x 0.05 ms of rest steps, 100 x 0.2 ms of hooks
        share_of = lambda n: (n * 11.1 + (100 - 2 * n) * 0.05 + 20) / (1020 + n * 11.1 + (100 - 2 * n) * 0.05)  # noqa: E731
        assert share_of(2) <= 0.05 < share_of(3)
        runs = sorted(s for s in series(h, "costly/value") if s >= b.start)
        assert all(sum(first <= r < first + WINDOW for r in runs) == 2 for first, _ in shares)
        assert "The cockpit's hooks take 0.2 ms every step, counted." in series(h, "budget/plan")[b.start]


def test_the_hooks_alone_are_measured_after_a_step_that_ran_nothing(clock, hooks, monkeypatch):
    """A tracked step's hooks go on after its records are made (0.1 ms here, outside any region): that tail
    is in the next step's ``cost/driver_ms``. The floor h is what a step with nothing running pays after
    one with nothing running (the warm-up ends with IDLE such steps): 0.2 ms, not the 0.3 ms of a step
    after a probe."""
    from cockpit_lite import cockpit as cockpit_mod

    report = cockpit_mod.Cockpit._report

    def with_tail(self, *args, **kwargs):
        report(self, *args, **kwargs)
        clock.advance(0.1)

    monkeypatch.setattr(cockpit_mod.Cockpit, "_report", with_tail)
    hooks.ms = 0.2
    with run(clock, 60) as cockpit:
        b, h = cockpit.budget, cockpit.history
        driver = series(h, "cost/driver_ms")
        assert driver[b.start - IDLE - 1] == pytest.approx(0.3)  # (the last probe's follow-up, after the probe)
        assert b.hooks_ms() == pytest.approx(0.2) and not b.beyond_hooks
        assert "The cockpit's hooks take 0.2 ms every step, counted." in series(h, "budget/plan")[b.start]


def test_hooks_alone_over_the_budget_say_so_and_the_instruments_still_run(clock, hooks):
    """The hooks take 0.6 ms of a 10.6 ms step: 5.7%, more than the whole budget of 5%, so no schedule can
    keep it (every window would be over with nothing running). The plan and a warning say so, and the budget
    keeps the instruments' work beyond the hooks within 5% (the accounting without cost/driver_ms): the
    costly ones still run, 4 in each window, rather than never."""
    hooks.ms, steps = 0.6, 420
    with pytest.warns(CockpitWarning, match=r"hooks alone take 5.7% of a step \(0.6 ms of 10.6 ms"):
        cockpit = run(clock, steps)
    with cockpit:
        b, h = cockpit.budget, cockpit.history
        assert b.beyond_hooks and b.hooks_ms() == 0.0 and b.hooks_ms(counted=False) == pytest.approx(0.6)
        assert "The cockpit's hooks alone (0.6 ms a step, cost/driver_ms) take more than the budget" in (
            series(h, "budget/plan")[b.start]
        )
        assert b.cheap == ["cheap"] and b.costly == ["costly", "paired"]
        runs = sorted(s for s in series(h, "costly/value") if s >= b.start)
        hooks_ms = {s: 0.6 for s in range(steps)}
        shares = shares_with_hooks(h, hooks_ms, b.start, steps, counted=False)
        assert max(s for _, s in shares) <= 0.05 + 1e-9
        assert all(sum(first <= r < first + WINDOW for r in runs) == 4 for first, _ in shares)
        assert min(s for _, s in shares_with_hooks(h, hooks_ms, b.start, steps)) > 0.05


def test_hooks_that_shrink_below_the_budget_are_counted_again(clock, hooks):
    """The warm-up measures the hooks at 0.6 ms (5.7% of a step: beyond the budget alone); later they
    take 0.2 ms. Once 16 rest steps with them counted took at most 3/4 of the budget, the budget counts
    them again (a new plan) and every window from then on keeps 5% with them counted."""
    hooks.ms = 0.6
    model, opt, loss_fn = tiny()
    with pytest.warns(CockpitWarning, match="hooks alone take 5.7% of a step"):
        cockpit = Cockpit(model, opt, loss_fn, instruments=instruments(clock), sinks=[], budget=0.05)
        train(cockpit, model, opt, loss_fn, clock, 60)
    with cockpit:
        b = cockpit.budget
        assert b.beyond_hooks
        hooks.ms = 0.2
        train(cockpit, model, opt, loss_fn, clock, 400, seed=1)
        assert not b.beyond_hooks and b.cheap == ["cheap"] and b.costly == ["costly", "paired"]
        h = cockpit.history
        plans = series(h, "budget/plan")
        back = max(plans)
        assert back > 60 and "The cockpit's hooks take 0.2 ms every step, counted." in plans[back]
        hooks_ms = {s: 0.6 if s < 60 else 0.2 for s in range(cockpit.step)}
        shares = shares_with_hooks(h, hooks_ms, back, cockpit.step)
        assert max(s for _, s in shares) <= 0.05 + 1e-9
        runs = [s for s in series(h, "costly/value") if s > back]
        assert len(runs) >= (cockpit.step - back) // WINDOW * 2


def test_hooks_that_leave_no_room_for_any_instrument_are_counted_beyond(clock, hooks):
    """The hooks take 0.45 ms of a 10.45 ms step (4.3%): under the budget, but a window counting them holds
    no run of the only instrument (8 ms: 100 (0.05 x 10 - 0.95 x 0.45) = 7.25 ms of room against 7.6 ms a
    run), which would leave it out and every statistic dark. The budget says so and keeps the instrument's
    work beyond the hooks within 5% instead, running it as often as that allows."""
    hooks.ms, steps = 0.45, 420
    model, opt, loss_fn = tiny()
    with pytest.warns(CockpitWarning, match="which leaves no room for any instrument in it: nothing would run"):
        cockpit = Cockpit(model, opt, loss_fn, instruments=[Costing(clock, 8.0, name="costly")], sinks=[], budget=0.05)
        train(cockpit, model, opt, loss_fn, clock, steps)
    with cockpit:
        b, h = cockpit.budget, cockpit.history
        assert b.beyond_hooks and b.unaffordable == [] and b.costly == ["costly"]
        runs = sorted(s for s in series(h, "costly/value") if s >= b.start)
        shares = shares_with_hooks(h, {s: 0.45 for s in range(steps)}, b.start, steps, counted=False)
        assert max(s for _, s in shares) <= 0.05 + 1e-9
        # (beyond the hooks a window holds 6 runs: 6 x 0.95 x 8 <= 100 x 0.05 x 10; every ceil(100 / 6) = 17 steps)
        assert b.every == 17 and {sum(first <= r < first + WINDOW for r in runs) for first, _ in shares} == {5, 6}


def test_hooks_that_grow_until_no_run_fits_switch_rather_than_leave_the_last_one_out(clock, hooks):
    """The hooks grow from 0.2 ms to 0.45 ms a step after the warm-up: the rest steps still fit the budget,
    but no window fits a run of the only costly instrument any more. After a whole window without one, the
    budget would leave it out (every statistic dark); it counts its work beyond the hooks instead."""
    hooks.ms = 0.2
    model, opt, loss_fn = tiny()
    insts = [Costing(clock, 8.0, name="costly")]
    with Cockpit(model, opt, loss_fn, instruments=insts, sinks=[], budget=0.05) as cockpit:
        train(cockpit, model, opt, loss_fn, clock, 100)
        b = cockpit.budget
        assert not b.beyond_hooks and b.every is not None
        hooks.ms = 0.45
        # (the run and follow-up estimates, upper quartiles of the last 8, take 3 runs to hold the new hooks)
        with pytest.warns(CockpitWarning, match="which leaves no room for any instrument in it"):
            train(cockpit, model, opt, loss_fn, clock, 700, seed=1)
        assert b.beyond_hooks and b.unaffordable == [] and b.costly == ["costly"]
        plans = series(cockpit.history, "budget/plan")
        switched = max(plans)
        assert switched > 100 and "so much of it that no instrument could run" in plans[switched]
        runs = [s for s in series(cockpit.history, "costly/value") if s > switched]
        assert len(runs) >= (cockpit.step - switched) // WINDOW * 5


def test_hooks_that_grow_past_the_budget_later_switch_the_accounting(clock, hooks):
    """The hooks grow from 0.1 ms to 0.7 ms a step after the warm-up: the rest steps (cheap + hooks) no
    longer fit 3/4 of the budget, so the cheap instrument joins the costly ones (as in the test above);
    the rest steps, the hooks alone now, still take 6.5% > 5%: the costly ones could never run again. The
    budget says so, keeps the instruments' work beyond the hooks and classifies them again by the warm-up's
    costs: the cheap one runs every step again, the costly ones run again."""
    hooks.ms = 0.1
    model, opt, loss_fn = tiny()
    with Cockpit(model, opt, loss_fn, instruments=instruments(clock), sinks=[], budget=0.05) as cockpit:
        train(cockpit, model, opt, loss_fn, clock, 100)
        b = cockpit.budget
        assert b.cheap == ["cheap"] and not b.beyond_hooks
        hooks.ms = 0.7
        with pytest.warns(CockpitWarning) as caught:
            train(cockpit, model, opt, loss_fn, clock, 400, seed=1)
        said = [str(w.message) for w in caught]
        assert any("the instruments that run every step took" in m and ": cheap now runs" in m for m in said)
        assert any("hooks alone take 6.5% of a step (0.7 ms of 10.7 ms" in m for m in said)
        assert b.beyond_hooks and b.cheap == ["cheap"]  # (classified again beyond the hooks: it fits again)
        h = cockpit.history
        plans = series(h, "budget/plan")
        switched = max(plans)
        assert "take more than the budget, or so much of it that no instrument could run: it keeps" in plans[switched]
        runs = [s for s in series(h, "costly/value") if s > switched]
        assert len(runs) >= (cockpit.step - switched) // WINDOW * 4
        assert set(series(h, "cheap/value")) >= set(range(switched + 1, cockpit.step))
        beyond = shares_with_hooks(h, {s: 0.7 for s in range(cockpit.step)}, switched + 1, cockpit.step, counted=False)
        assert max(s for _, s in beyond) <= 0.05 + 1e-9


def test_steps_nothing_tracks_write_their_shares_in_groups(clock):
    """A step no instrument tracks holds its ``budget/share`` back (one record a step costs as much as
    the step's hooks): written with the next tracked step, or once FLUSH wait; all of them by the close."""
    model, opt, loss_fn = tiny()
    insts = [Costing(clock, 8.0, name="costly")]  # nothing cheap: most steps track nothing
    with Cockpit(model, opt, loss_fn, instruments=insts, sinks=[], budget=0.05) as cockpit:
        written = []
        for _ in range(300):
            train(cockpit, model, opt, loss_fn, clock, 1)
            written.append(max(series(cockpit.history, "budget/share"), default=-1))
        start = cockpit.budget.start
        assert max(t - w for t, w in enumerate(written) if t > start) <= budget_mod.FLUSH
        assert any(t - w > 1 for t, w in enumerate(written) if t > start)
    assert series(cockpit.history, "budget/share").keys() == set(range(300))


# --- verdicts, state, arguments ------------------------------------------------------------------------------
def test_verdicts_say_how_many_steps_they_rest_on(clock):
    model, opt, loss_fn = tiny()
    insts = [Costing(clock, 0.05, name="cheap", verdict="cheap says so")] + instruments(clock)[1:]
    with Cockpit(model, opt, loss_fn, instruments=insts, sinks=[], budget=0.05) as cockpit:
        train(cockpit, model, opt, loss_fn, clock, 150)
        ran = len(series(cockpit.history, "costly/value"))
        assert 3 <= ran < 150
        assert cockpit.verdicts() == [
            "cheap says so",
            f"costly says so (from {ran} of 150 steps: the overhead budget ran costly on these only)",
            f"paired says so (from {ran} of 150 steps: the overhead budget ran paired on these only)",
        ]
    model, opt, loss_fn = tiny()
    with Cockpit(model, opt, loss_fn, instruments=instruments(clock), sinks=[]) as cockpit:
        train(cockpit, model, opt, loss_fn, clock, 3)
        assert cockpit.verdicts() == ["costly says so", "paired says so"]


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("split", [5, 160])  # in the warm-up, and after it
def test_state_dict_resumes_the_schedule(clock, split):
    steps = 300
    whole = run(clock, steps)
    whole.close()
    model, opt, loss_fn = tiny()
    first = Cockpit(model, opt, loss_fn, instruments=instruments(clock), sinks=[], budget=0.05)
    train(first, model, opt, loss_fn, clock, split)
    state = _roundtrip(first.state_dict())
    first.close()
    second = Cockpit(model, opt, loss_fn, instruments=instruments(clock), sinks=[], budget=0.05)
    second.load_state_dict(state)
    g = torch.Generator().manual_seed(1)
    train(second, model, opt, loss_fn, clock, steps - split, seed=1)
    second.close()
    for tag in ("costly/value", "paired/value", "cheap/value", "budget/interval", "budget/plan"):
        want = {s: v for s, v in series(whole.history, tag).items() if s >= split}
        assert series(second.history, tag) == want, tag
    got_share = series(second.history, "budget/share")
    want_share = {s: v for s, v in series(whole.history, "budget/share").items() if s >= split}
    assert got_share.keys() == want_share.keys()
    assert all(got_share[s] == pytest.approx(want_share[s], rel=1e-9) for s in got_share)
    assert second.budget.ran == whole.budget.ran and second.budget.steps == whole.budget.steps
    del g


def test_state_without_budget_warns_and_warms_up(clock):
    model, opt, loss_fn = tiny()
    plain = Cockpit(model, opt, loss_fn, instruments=instruments(clock), sinks=[])
    train(plain, model, opt, loss_fn, clock, 3)
    state = plain.state_dict()
    plain.close()
    assert "budget" not in state
    with Cockpit(model, opt, loss_fn, instruments=instruments(clock), sinks=[], budget=0.05) as cockpit:
        with pytest.warns(Warning, match="warms up afresh from step 3"):
            cockpit.load_state_dict(state)
    with Cockpit(model, opt, loss_fn, instruments=instruments(clock)[:2], sinks=[], budget=0.05) as cockpit:
        other = run(clock, 3)
        other.close()
        with pytest.raises(ValueError, match="leave 'budget' out of the state"):
            cockpit.load_state_dict(other.state_dict())


@pytest.mark.parametrize("bad", [0, 0.0, 1, 1.0, -0.1, 1.5, math.nan, math.inf, True, "0.05", [0.05]])
def test_bad_budget_is_refused_and_nothing_attached(bad):
    model, opt, loss_fn = tiny()
    with pytest.raises(ValueError, match="between 0 and 1"):
        Cockpit(model, opt, loss_fn, instruments=["loss"], sinks=[], budget=bad)
    assert not model._forward_pre_hooks and not model._forward_hooks and not opt._optimizer_step_pre_hooks


def test_close_restores_the_instruments_schedule(clock):
    insts = instruments(clock)
    model, opt, loss_fn = tiny()
    with Cockpit(model, opt, loss_fn, instruments=insts, sinks=[], budget=0.05) as cockpit:
        train(cockpit, model, opt, loss_fn, clock, 1)
        assert not insts[1].scheduled(1)  # the follow-up step of the first: nothing runs
    assert all(i.scheduled(1) for i in insts) and all("scheduled" not in vars(i) for i in insts)


def test_budget_alone_policy():
    """The controller without a cockpit: fed costs directly (run, follow-up, rest)."""
    b = Budget(0.1)

    class Fake:
        def __init__(self, key):
            self.key = key

        def due(self, step):
            return True

        def gate(self, allows):
            self.allows = allows

    insts = [Fake("a"), Fake("b")]
    b.attach(insts)
    cost = {"a": 0.1, "b": 5.0}
    for t in range(400):
        d = b.decide(t)
        c = sum(cost[k] for k in d.allowed)
        b.observe(t, c, PLAIN_MS + c, sorted(d.allowed))
    assert b.cheap == ["a"] and b.costly == ["b"] and b.start == 2 + 2 * 2 * ROUNDS + IDLE
    obs = {s: (c, w) for s, c, w, _ in b.ledger.obs}
    c = np.array([obs[s][0] for s in range(300, 400)])
    w = np.array([obs[s][1] for s in range(300, 400)])
    assert c.sum() / w.sum() <= 0.1 + 1e-12
    # (100 * 0.1 + 5 r) / (1000 + 100 * 0.1 + 5 r) <= 0.1 allows r = 20 runs of b in 100 steps
    assert sum(1 for s, _, _, k in b.ledger.obs if k == "run") == 20


# --- the real instruments: thinned, and exact where they ran --------------------------------------------------
@contextmanager
def dear_engine(monkeypatch, clock: Clock, ms: float):
    """The per-sample engine's timed region (or timed call, ``Costs.call``) costs ``ms`` more (fake) time each
    time it is entered."""
    region, call = profiling.Costs.region, profiling.Costs.call

    @contextmanager
    def costly_region(self, name):
        with region(self, name):
            yield
            if name == "engine":
                clock.advance(ms)

    def costly_call(self, name, fn, *args):
        def work(*a):
            out = fn(*a)
            if name == "engine":
                clock.advance(ms)
            return out

        return call(self, name, work, *args)

    monkeypatch.setattr(profiling.Costs, "region", costly_region)
    monkeypatch.setattr(profiling.Costs, "call", costly_call)
    yield


def _mlp_run(clock, budget, steps):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    with Cockpit(model, opt, loss_fn, instruments=presets.economy(), sinks=[], budget=budget) as cockpit:
        for _ in range(steps):
            x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            loss_fn(model(x), y).backward()
            clock.advance(PLAIN_MS)
            opt.step()
            opt.zero_grad()
    return cockpit


def test_economy_thinned_and_exact_on_the_steps_it_ran(monkeypatch, clock):
    steps = 2 + 6 * 7 + 110
    with dear_engine(monkeypatch, clock, 2.0):
        thin = _mlp_run(clock, 0.3, steps)
        full = _mlp_run(clock, None, steps)
    b, h, ref = thin.budget, thin.history, full.history
    assert b.cheap == ["loss", "grad_norm", "update_size", "distance"]
    assert b.costly == ["per_sample_grad_norms", "gradient_tests", "alpha"]
    for tag in ("loss", "grad_norm", "update_size", "distance"):
        assert set(range(b.start, steps)) <= set(series(h, tag)), tag
    ran = sorted(s for s in series(h, "tests/norm") if s >= b.start)
    assert b.every >= 2 and ran == list(range(b.start, steps, b.every))  # evenly spaced, never all
    assert ran == sorted(s for s in series(h, "persample/grad_norm/mean") if s >= b.start)
    # same trajectory, so the statistics of the steps both ran are the same numbers
    for tag in ("loss", "grad_norm", "update_size", "distance", "tests/norm", "tests/inner", "tests/ortho"):
        got, want = series(h, tag), series(ref, tag)
        assert all(got[s] == want[s] for s in got), tag
    got, want = dict(h["persample/grad_norm"]), dict(ref["persample/grad_norm"])
    assert all(np.array_equal(got[s], want[s]) for s in got)
    alpha, alpha_ref = series(h, "alpha"), series(ref, "alpha")
    assert {s for s in alpha if s >= b.start} == {s for s in ran if s + 1 < steps}
    # alpha's projections g_i . d come from one float32 pass over the layer factors: the cockpit without
    # budget projects step t onto d_t and d_{t-1} together, the thinned one onto d_t alone, so the sums
    # are rounded in another order (differences of alpha about 1e-8 here; alpha is O(1))
    assert all(alpha[s] == pytest.approx(alpha_ref[s], rel=1e-6, abs=1e-6, nan_ok=True) for s in alpha)
    assert max(s for _, s in window_shares(h, b.start, steps)) <= 0.3 + 1e-9


class Steady(Instrument):
    """Keeps the base ``requires`` (its NEEDS on its scheduled steps): a step takes its gate from the kept
    table (``Guard.gated``) instead of asking it. Costs ``ms`` of the fake clock a run; records the step."""

    NEEDS = frozenset({Need.LOSS})

    def __init__(self, clock: Clock, ms: float, **kw):
        super().__init__(**kw)
        self.clock, self.ms = clock, ms

    def compute(self, record):
        self.clock.advance(self.ms)
        return {self.tag("value"): float(record.step)}


def test_base_schedule_instruments_follow_the_gate_and_a_lifted_gate_is_seen(clock):
    """Instruments asking their NEEDS every step run where the budget allows them (the cheap one every step,
    the costly one on the run steps only), by the step's kept table of gates; once the costly one's gate is
    lifted (``inst.gate(None)``), the table no longer holds it and it runs on every step again."""
    model, opt, loss_fn = tiny()
    insts = [Steady(clock, 0.05, name="cheap"), Steady(clock, 8.0, name="dear")]
    with Cockpit(model, opt, loss_fn, instruments=insts, sinks=[], budget=0.05) as cockpit:
        train(cockpit, model, opt, loss_fn, clock, 260)
        b, h = cockpit.budget, cockpit.history
        assert b.cheap == ["cheap"] and b.costly == ["dear"]
        assert set(range(b.start, 260)) <= set(series(h, "cheap/value"))
        runs = sorted(s for s in series(h, "dear/value") if s >= b.start)
        # a window holds 5 runs of 8 ms (45 of 1045 ms) and not 6: every 20 steps
        assert len(runs) > 5 and all(q - r >= 20 for r, q in zip(runs, runs[1:], strict=False))
        assert max(s for _, s in window_shares(h, b.start, 260)) <= 0.05 + 1e-9
        insts[1].gate(None)
        train(cockpit, model, opt, loss_fn, clock, 20, seed=1)
        assert set(series(h, "dear/value")) >= set(range(260, 280))
