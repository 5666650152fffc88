"""Profiler traces and the cost records (ms and share of the step) of every instrument."""

from __future__ import annotations

import json

import pytest
import torch
from cockpit_lite.instruments.presets import economy

from cockpit_lite import load
from cockpit_lite import profiling as profiling_mod
from cockpit_lite.profiling import Costs
from tests.sinks_util import accumulator, train

INSTRUMENTS = [i.key for i in economy() if i.key != "alpha"] + ["talker"]  # sinks_util swaps Alpha for the Talker


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("prof")
    cockpit = train(5, logdir=logdir, profile=torch.profiler.schedule(wait=1, warmup=1, active=2, repeat=1))
    return logdir, cockpit


def test_trace_has_every_cockpit_region(run):
    logdir, _ = run
    traces = list(logdir.glob("*.pt.trace.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    ours = {n for n in names if n.startswith("cockpit_lite/")}
    expected = {f"cockpit_lite/{k}" for k in INSTRUMENTS} | {
        "cockpit_lite/loss",
        "cockpit_lite/engine",  # per-layer work inside backward hooks
        "cockpit_lite/after_backward",
        "cockpit_lite/before_step",
        "cockpit_lite/after_step",
        "cockpit_lite/sink/JsonLines",
        "cockpit_lite/sink/TensorBoard",
    }
    assert expected <= ours, expected - ours
    steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#2", "ProfilerStep#3"}  # the schedule's active window
    # the engine's work runs inside the user's backward: it is recorded on the autograd path
    engine = [e for e in events if e.get("name") == "cockpit_lite/engine"]
    assert len(engine) >= 2 * 3  # 3 layers x 2 active steps


def test_cost_records_ms_and_share(run):
    logdir, cockpit = run
    h = cockpit.history
    for step in range(5):
        rec = {t: dict(h[t]).get(step) for t in h if t.startswith("cost/")}
        step_ms = rec["cost/step_ms"]
        names = [t[5:-3] for t, v in rec.items() if t.endswith("_ms") and v is not None]
        for k in INSTRUMENTS + ["engine", "loss", "after_step"]:
            assert k in names, (step, k)
        regions = [n for n in names if n not in ("step", "cockpit", "sinks")]
        for n in regions:
            assert rec[f"cost/{n}_share"] == pytest.approx(rec[f"cost/{n}_ms"] / step_ms)
        total = sum(rec[f"cost/{n}_ms"] for n in regions)
        assert rec["cost/cockpit_ms"] == pytest.approx(total)
        assert 0 < total <= step_ms  # exclusive times: nested regions are not counted twice
        if step < 4:  # the sinks' time of a step is recorded with the next tracked step
            assert rec["cost/sinks_ms"] > 0
            assert rec["cost/sinks_share"] == pytest.approx(rec["cost/sinks_ms"] / step_ms)
    # and they reach the JSON lines and the TensorBoard scalars
    saved = load(logdir)
    acc = accumulator(logdir)
    for tag in ["cost/gradient_tests_share", "cost/engine_ms", "cost/talker_ms", "cost/sinks_ms"]:
        assert saved.values(tag) == h.values(tag)
        assert [e.step for e in acc.Scalars(tag)] == list(h.steps(tag))


@pytest.fixture
def now(monkeypatch):
    """A fake clock for Costs: ``now[0]`` is the time in ms."""
    clock = [0.0]
    monkeypatch.setattr(profiling_mod.time, "perf_counter", lambda: clock[0] / 1e3)
    return clock


def test_costs_are_exclusive(now):
    c = Costs()
    with c.region("outer"):
        now[0] = 2.0
        with c.region("inner"):
            now[0] = 7.0
        now[0] = 10.0
    with c.region("inner"):
        now[0] = 11.0
    assert dict(c.ms) == {"outer": pytest.approx(5.0), "inner": pytest.approx(6.0)}
    assert c.total() == pytest.approx(11.0)


def test_a_region_nested_in_itself_counts_its_time_once(now):
    """One region object per name: entered again inside itself (re-entrant), the step's time under the
    name is the outer block's wall time, neither doubled nor lost."""
    c = Costs()
    with c.region("engine"):
        now[0] = 1.0
        with c.region("engine"):
            now[0] = 4.0
        now[0] = 6.0
    assert dict(c.ms) == {"engine": pytest.approx(6.0)}
    assert c.region("engine") is c.region("engine")


def test_profile_needs_a_logdir():
    with pytest.raises(ValueError, match="logdir"):
        train(1, profile=True)


def test_profile_true_uses_the_default_schedule(tmp_path):
    train(6, talker=False, logdir=tmp_path, sinks=[], profile=True)
    [trace] = tmp_path.glob("*.pt.trace.json")
    names = {e.get("name", "") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {n for n in names if n.startswith("ProfilerStep#")} == {"ProfilerStep#2", "ProfilerStep#3", "ProfilerStep#4"}
