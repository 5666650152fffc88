"""The driver's short paths (issue 15, Must 2) change how much Python a step costs, never what it
records: the History files steps in groups, a step of an every-step run reuses one plan, cost regions
take a short path without a profiler, and a step's objects are freed by reference counting."""

from __future__ import annotations

import contextlib
import gc
import random
import types
import weakref

import numpy as np
import pytest
import torch
from cockpit_lite.instruments import GradNorm, Loss
from torch import nn

from cockpit_lite import Cockpit, Instrument, Need
from cockpit_lite import profiling as profiling_mod
from cockpit_lite.emitter import Emitter
from cockpit_lite.profiling import Costs
from cockpit_lite.records import SETTLE_EVERY, History


def _steps(n: int, seed: int) -> list[tuple[int, dict]]:
    """Records of n steps with changing tag sets: a steady group, late records of the previous step
    (another group), tags that appear now and then, arrays and strings."""
    rng = random.Random(seed)
    out = []
    for s in range(n):
        recs = {"loss": float(s), "cost/step_ms": 1.0 + s, "per_sample": np.full(2, float(s))}
        if rng.random() < 0.2:
            recs["verdict"] = f"at {s}"
        out.append((s, recs))
        if s and rng.random() < 0.7:
            out.append((s - 1, {"cost/sinks_ms": 0.5 * s}))  # a late record (Emitter.late_sink_cost)
        if rng.random() < 0.05:
            out.append((s, {"loss": -float(s)}))  # a tag of the main group, alone: the groups overlap
    return out


def _naive(entries: list[tuple[int, dict]]) -> dict[str, list]:
    """tag -> [(step, value), ...] in the order the records were added: no window."""
    out: dict[str, list] = {}
    for step, recs in entries:
        for tag, value in recs.items():
            out.setdefault(tag, []).append((step, value))
    return out


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        sa == sb and (np.array_equal(va, vb) if isinstance(va, np.ndarray) else va == vb)
        for (sa, va), (sb, vb) in zip(a, b, strict=True)
    )


def test_history_groups_file_what_was_added_in_order():
    entries = _steps(5 * SETTLE_EVERY + 7, seed=0)
    h = History(window=None)
    for step, recs in entries:
        h.add(step, recs)
    want = _naive(entries)
    assert sorted(h) == sorted(want) and len(h) == len(want)
    for tag, pairs in want.items():
        assert _same(h[tag], pairs), tag


def test_history_filed_in_groups_equals_filed_at_every_step():
    """Thinning past the window: filing 64 steps at once keeps exactly what filing each step keeps."""
    entries = _steps(40 * 8 + 11, seed=1)
    grouped, eager = History(window=8), History(window=8)
    for step, recs in entries:
        grouped.add(step, recs)
        eager.add(step, recs)
        eager.tags()  # (a read files the pending steps: one step at a time)
    assert sorted(grouped) == sorted(eager)
    for tag in eager:
        assert _same(grouped[tag], eager[tag]), tag
        assert len(grouped[tag]) <= 3 * 8 + 1


def test_history_reads_every_step_without_filing():
    h = History()
    for s in range(3):
        h.add(s, {"cost/step_ms": float(s), "loss": 1.0})
    h.add(1, {"cost/sinks_ms": 0.25})
    assert h._pending  # nothing read yet: held as handed over
    assert h.last("cost/step_ms") == 2.0 and h.latest("cost/sinks_ms") == (1, 0.25) and len(h) == 3
    assert h._pending  # last(), latest() and len() file nothing
    assert h.last("absent", default="none") == "none"
    assert h["cost/sinks_ms"] == [(1, 0.25)] and not h._pending
    recs = {"loss": 3.0}
    h.add(3, recs)
    recs["loss"] = 99.0  # the caller's dict changes afterwards: the history holds a copy
    assert h.latest("loss") == (3, 3.0)


def _model_and_batches(n: int = 6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    batches = [(torch.randn(8, 5), torch.randint(0, 3, (8,))) for _ in range(n)]
    return model, batches


def _train(cockpit: Cockpit, model: nn.Module, opt: torch.optim.Optimizer, batches, between=None) -> None:
    for k, (x, y) in enumerate(batches):
        if between is not None:
            between(k)
        opt.zero_grad()
        cockpit.loss_fn(model(x), y).backward()
        opt.step()


def test_gates_and_needs_changed_mid_run_are_obeyed():
    """The every-step plan is reused only while every instrument tracks every step with its NEEDS: a gate
    set and lifted during the run, and NEEDS changed on an instance, take effect at the next step."""
    model, batches = _model_and_batches(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, gnorm = Loss(), GradNorm()
    cockpit = Cockpit(model, opt, nn.CrossEntropyLoss(), instruments=[loss, gnorm], sinks=[])

    def between(k: int) -> None:
        if k == 2:
            gnorm.gate(lambda step: step % 2 == 0)
        if k == 5:
            gnorm.gate(None)
        if k == 6:
            loss.NEEDS = frozenset({Need.LOSS})  # (no per-sample losses from here on)

    _train(cockpit, model, opt, batches, between)
    cockpit.close()
    assert [s for s, _ in cockpit.history["grad_norm"]] == [0, 1, 2, 4, 5, 6, 7]
    assert [s for s, _ in cockpit.history["loss"]] == list(range(8))
    assert [s for s, _ in cockpit.history["loss/per_sample/p50"]] == list(range(6))


def test_costs_are_recorded_on_the_short_path_and_with_a_profiler(tmp_path):
    model, batches = _model_and_batches(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cockpit = Cockpit(model, opt, nn.CrossEntropyLoss(), instruments=[Loss(), GradNorm()], sinks=[], cost_every=1)
    with torch.profiler.profile() as prof:
        _train(cockpit, model, opt, batches[:2])
    _train(cockpit, model, opt, batches[2:])
    cockpit.close()
    labels = {e.name for e in prof.events()}
    assert "cockpit_lite/grad_norms" in labels and "cockpit_lite/loss" in labels  # (steps 0-1: labelled)
    for tag in ("cost/grad_norms_ms", "cost/loss_ms", "cost/cockpit_ms"):
        steps = [s for s, v in cockpit.history[tag] if v >= 0.0]
        assert steps == [0, 1, 2, 3], tag


@pytest.mark.parametrize("profiled", [False, True])
def test_region_times_are_exclusive_on_both_paths(profiled, monkeypatch):
    """Nested regions: each is charged its own time only, on the short path and on the labelled one a
    running profiler takes (a fake clock the test moves: exact times on any machine load)."""
    now = [0.0]  # seconds
    monkeypatch.setattr(profiling_mod, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    costs = Costs()
    with torch.profiler.profile() if profiled else contextlib.nullcontext():
        costs.reset()
        assert costs.fast is not profiled
        with costs.region("outer"):
            now[0] += 0.02
            with costs.region("inner"):
                now[0] += 0.03
            with costs.region("outer"):  # (re-entered inside itself)
                now[0] += 0.01
    assert costs.ms["outer"] == pytest.approx(30.0) and costs.ms["inner"] == pytest.approx(30.0), dict(costs.ms)
    assert costs.timed_ms == pytest.approx(60.0)


class _Keeps(Instrument):
    """Keeps a weak reference to each step record it is handed."""

    NEEDS = frozenset({Need.GRAD_NORMS, Need.UPDATE, Need.LOSS})

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[weakref.ref] = []

    def compute(self, record):
        self.refs.append(weakref.ref(record))
        return {"kept": float(len(self.refs))}


def test_a_step_is_freed_without_the_garbage_collector():
    model, batches = _model_and_batches(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    keeps = _Keeps()
    cockpit = Cockpit(model, opt, nn.CrossEntropyLoss(), instruments=[keeps, Loss(), GradNorm()], sinks=[])
    was = gc.isenabled()
    gc.disable()
    try:
        _train(cockpit, model, opt, batches)
        # every step's record but the cockpit's current one is gone by reference counting alone
        assert all(r() is None for r in keeps.refs[:-1])
    finally:
        if was:
            gc.enable()
    cockpit.close()
    assert [v for _, v in cockpit.history["kept"]] == [1.0, 2.0, 3.0, 4.0]


def test_emitter_groups_normalises_and_drops_what_is_no_value():
    warned: list[str] = []
    history = History(window=None)
    emitter = Emitter(history, [], warned.append)
    records = {
        "a": 1.5,
        "b": np.float32(2.5),
        "c": 3,
        "d": True,
        "e": np.arange(3, dtype=np.float32),
        "f": torch.tensor([1.0, 2.0]),
        "g": "a note",
        "h": {"rows": [1, 2]},
        "bad": object(),
        (4, "late"): 7.0,
        (5, "own"): np.float64(8.0),
        (4, "bad"): object(),
    }
    emitter.emit(5, records)
    assert len(warned) == 2 and all("dropped" in w for w in warned)
    got = {t: history[t] for t in history}
    assert sorted(got) == ["a", "b", "c", "d", "e", "f", "g", "h", "late", "own"]
    assert got["a"] == [(5, 1.5)] and got["b"] == [(5, 2.5)] and type(got["b"][0][1]) is float
    assert got["c"] == [(5, 3.0)] and got["d"] == [(5, True)] and got["g"] == [(5, "a note")]
    assert got["late"] == [(4, 7.0)] and got["own"] == [(5, 8.0)]
    for tag, want in (("e", [0.0, 1.0, 2.0]), ("f", [1.0, 2.0])):
        value = got[tag][0][1]
        assert isinstance(value, np.ndarray) and value.dtype == np.float64 and value.tolist() == want
    assert np.asarray(got["h"][0][1]["rows"]).tolist() == [1, 2]
    assert emitter.sinks_ms is not None and emitter.sinks_ms[0] == 5


@pytest.mark.parametrize("every", [1, 2])
def test_driver_time_is_the_hooks_own_outside_regions_sinks_and_the_loop(monkeypatch, every):
    """``cost/driver_ms``: time spent in the cockpit's hooks outside any region. With a clock that moves
    only when told: the loop's own forward (3 ms), an instrument's compute (a region, 7 ms) and a sink's
    write (2 ms) are not in it; 1 ms of the driver's bookkeeping (building the step) is, every measured step.
    With ``cost_every=2`` steps 0-2 and 4 are measured (the first three, then every other one): the same
    times on those, the step's wall time on every step, and no cost of an unmeasured step's sinks."""
    import types

    from cockpit_lite import cockpit as cockpit_mod
    from cockpit_lite import emitter as emitter_mod
    from cockpit_lite import lifecycle, profiling
    from cockpit_lite.sinks.base import Sink

    now = [1000.0]
    fake = types.SimpleNamespace(perf_counter=lambda: now[0])
    for module in (profiling, lifecycle, emitter_mod, cockpit_mod):
        monkeypatch.setattr(module, "time", fake)

    def advance(ms: float) -> None:
        now[0] += ms / 1e3

    class Slow(Instrument):
        NEEDS = frozenset({Need.LOSS})

        def compute(self, record):
            advance(7.0)
            return {"slow": 1.0}

    class SlowSink(Sink):
        def write(self, step, records):
            advance(2.0)

    start = lifecycle.Step.__init__

    def building(self, *args, **kwargs):
        advance(1.0)
        start(self, *args, **kwargs)

    monkeypatch.setattr(lifecycle.Step, "__init__", building)
    model, batches = _model_and_batches(5)
    forward = model.forward

    def user_forward(x):
        advance(3.0)
        return forward(x)

    model.forward = user_forward
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cockpit = Cockpit(model, opt, nn.CrossEntropyLoss(), instruments=[Slow()], sinks=[SlowSink()], cost_every=every)
    _train(cockpit, model, opt, batches)
    cockpit.close()
    h = cockpit.history
    measured = [0, 1, 2, 3, 4] if every == 1 else [0, 1, 2, 4]
    assert dict(h["cost/driver_ms"]) == pytest.approx(dict.fromkeys(measured, 1.0))
    assert dict(h["cost/slow_ms"]) == pytest.approx(dict.fromkeys(measured, 7.0))
    # (a step's records, then from the second on also the last step's late sinks record: one write each;
    # recorded under the step written, with the next step's records)
    sinks = {0: 2.0, 1: 4.0, 2: 4.0, 3: 4.0} if every == 1 else {0: 2.0, 1: 4.0, 2: 4.0}
    assert dict(h["cost/sinks_ms"]) == pytest.approx(sinks)
    steps = [v for _, v in h["cost/step_ms"]]
    assert steps == pytest.approx([3.0 + 7.0] * 5)  # (from the step's start: its building is before)
    assert dict(h["cost/driver_share"]) == pytest.approx({s: 1.0 / steps[s] for s in measured})


def _cost_steps(cockpit: Cockpit, tag: str) -> list[int]:
    return [s for s, _ in cockpit.history.get(tag, [])]


def test_costs_are_measured_on_a_cadence_and_the_other_records_are_unchanged():
    """The default cadence (``cost_every=10``): the regions, the total and the hooks' own time on steps 0-2,
    10 and 20 (then from a profiler started at step 13 on, every step it records); the step's wall time on
    every step. Every other record, and the trained parameters, are those of a run measured every step."""
    runs = {}
    for every in (1, None):
        model, batches = _model_and_batches(23)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        kw = {} if every is None else {"cost_every": every}
        cockpit = Cockpit(model, opt, nn.CrossEntropyLoss(), instruments=[Loss(), GradNorm()], sinks=[], **kw)
        _train(cockpit, model, opt, batches[:13])
        with torch.profiler.profile():
            _train(cockpit, model, opt, batches[13:16])
        _train(cockpit, model, opt, batches[16:])
        cockpit.close()
        runs[every] = cockpit, [p.detach().clone() for p in model.parameters()]
    cadence, every_step = runs[None][0], runs[1][0]
    assert _cost_steps(cadence, "cost/step_ms") == list(range(23))
    measured = [0, 1, 2, 10, 13, 14, 15, 20]
    for tag in ("cost/cockpit_ms", "cost/loss_ms", "cost/grad_norms_ms", "cost/driver_ms", "cost/cockpit_share"):
        assert _cost_steps(cadence, tag) == measured, tag
        assert _cost_steps(every_step, tag) == list(range(23)), tag
    assert set(_cost_steps(cadence, "cost/sinks_ms")) <= set(measured)
    others = {t for t in every_step.history if not t.startswith("cost/")}
    assert others == {t for t in cadence.history if not t.startswith("cost/")} and "grad_norm" in others
    for tag in others:
        assert _same(cadence.history[tag], every_step.history[tag]), tag
    assert all(torch.equal(a, b) for a, b in zip(runs[None][1], runs[1][1], strict=True))


def test_a_budget_measures_every_step_and_a_bad_cadence_is_refused():
    model, batches = _model_and_batches(5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Cockpit(model, opt, nn.CrossEntropyLoss(), instruments=[Loss()], sinks=[], budget=0.5, cost_every=4) as ck:
        _train(ck, model, opt, batches)
    tracked = _cost_steps(ck, "cost/step_ms")
    assert tracked and _cost_steps(ck, "cost/cockpit_ms") == tracked == _cost_steps(ck, "cost/loss_ms")
    assert 4 in tracked  # (not a step of the cadence)
    for bad in (0, -3, 2.5, True, "10"):
        with pytest.raises(ValueError, match="cost_every="):
            Cockpit(model, opt, nn.CrossEntropyLoss(), instruments=[Loss()], sinks=[], cost_every=bad)


def test_the_cost_summary_reads_a_cadence_as_every_step_and_a_schedule_as_its_runs():
    """Under the default cadence an every-step piece of work (Loss) is recorded on the measured steps only
    and still reads as every step's (gap 1), while work on some steps (GradNorm every 3 steps) is measured on
    each of its runs, the steps where the work changes: 1 in 3 steps."""
    from cockpit_lite.panels import instrument_cost

    for grad_norm_every in (None, 3):
        model, batches = _model_and_batches(25)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        insts = [Loss()] + ([GradNorm(every=grad_norm_every)] if grad_norm_every else [])
        with Cockpit(model, opt, nn.CrossEntropyLoss(), instruments=insts, sinks=[]) as ck:
            _train(ck, model, opt, batches)
        if grad_norm_every is None:
            assert _cost_steps(ck, "cost/loss_ms") == [0, 1, 2, 10, 20]
        else:
            assert _cost_steps(ck, "cost/grad_norm_ms") == list(range(0, 25, 3))
            per_step, run, gap = instrument_cost(ck.history, "grad_norm")
            assert gap == 3.0 and per_step == pytest.approx(run / 3)
        per_step, run, gap = instrument_cost(ck.history, "loss")
        assert gap == 1.0 and per_step == run
