"""Profiler traces and the cost records (ms and share of the step) of every instrument."""

from __future__ import annotations

import json
import warnings

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
    clock: list[float] = []
    schedule = torch.profiler.schedule(wait=1, warmup=1, active=2, repeat=1)
    cockpit = train(5, logdir=logdir, profile=schedule, clock=clock, cost_every=1)
    return logdir, cockpit, clock


def test_trace_has_every_cockpit_region(run):
    logdir, _, _ = run
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
    logdir, cockpit, clock = run
    h = cockpit.history
    for step in range(5):
        rec = {t: dict(h[t]).get(step) for t in h if t.startswith("cost/")}
        step_ms = rec["cost/step_ms"]
        names = [t[5:-3] for t, v in rec.items() if t.endswith("_ms") and v is not None]
        for k in INSTRUMENTS + ["engine", "loss", "after_step"]:
            assert k in names, (step, k)
        regions = [n for n in names if n not in ("step", "cockpit", "sinks", "driver")]
        for n in regions:
            assert rec[f"cost/{n}_share"] == pytest.approx(rec[f"cost/{n}_ms"] / step_ms)
        total = sum(rec[f"cost/{n}_ms"] for n in regions)
        assert rec["cost/cockpit_ms"] == pytest.approx(total)
        assert 0 < total <= step_ms  # exclusive times: nested regions are not counted twice
        # the hooks' own time outside the regions: from the last step's optimizer post-hook (where the
        # last records were taken) to this one's, so inside this iteration and the one before (the wall
        # clock read by the loop: a bound that holds however the machine is loaded), beside this step's regions
        # and the last one's sinks (tests/test_budget.py checks the exact split on a fake clock)
        window = clock[step + 1] - clock[max(step - 1, 0)]
        sinks_before = dict(h["cost/sinks_ms"]).get(step - 1, 0.0)
        assert 0 < rec["cost/driver_ms"]
        assert rec["cost/driver_ms"] + rec["cost/cockpit_ms"] + sinks_before <= window
        assert rec["cost/driver_share"] == pytest.approx(rec["cost/driver_ms"] / step_ms)
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


@pytest.mark.parametrize("fast", [True, False])
def test_a_timed_call_is_charged_as_a_region_is(now, fast):
    """``Costs.call`` (the short path's timed call) nested in regions and calls, and regions nested in it:
    each name is charged its own time only, and the exclusive times add up to the wall time, on the short
    path and on the region's (a device clock or a profiler)."""
    c = Costs()
    if fast:
        c.refresh()
    assert c.fast is fast

    def leaf():
        now[0] += 3.0

    def body():
        now[0] += 2.0
        with c.region("inner"):
            now[0] += 4.0
        c.call("engine", leaf)
        now[0] += 1.0
        return "done"

    with c.region("outer"):
        now[0] += 1.0
        assert c.call("step", body) == "done"
        now[0] += 5.0
    c.call("engine", leaf)
    assert dict(c.ms) == {
        "outer": pytest.approx(6.0),
        "step": pytest.approx(3.0),
        "inner": pytest.approx(4.0),
        "engine": pytest.approx(6.0),
    }
    assert c.total() == pytest.approx(now[0]) and c.timed_ms == pytest.approx(now[0])


class FakeEvent:
    """A CUDA event on a fake device timeline: ``time`` is where the device is when it reaches it."""

    def __init__(self, device_now):
        self.device_now, self.time = device_now, None

    def record(self, stream=None):
        self.time = self.device_now[0]

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return end.time - self.time


@pytest.fixture
def device_clock(monkeypatch, now):
    """Costs on a fake CUDA timeline: ``dev[0]`` (ms) is where the device is; ``now`` the host."""
    dev = [0.0]
    monkeypatch.setattr(profiling_mod.torch.cuda, "Event", lambda enable_timing: FakeEvent(dev))
    monkeypatch.setattr(profiling_mod.torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(profiling_mod.torch.cuda, "is_current_stream_capturing", lambda: False)
    c = Costs()
    c.clock = c._clocks[torch.device("cuda")] = profiling_mod.DeviceClock(torch.device("cuda"))
    return c, dev


def test_on_cuda_regions_cost_their_device_time_exclusive(device_clock, now):
    """The host waits 40 ms inside `after_step` for the training's queued kernels (its transfer): the
    device reaches the region's start only then, so the region costs its own 1 ms, not 41. `loss`'s
    host work (3 ms) hid behind queued kernels: the device reached its end as soon as its start.
    `outer` holds `inner`: each counts its own device time once."""
    c, dev = device_clock
    with c.region("loss"):
        now[0] += 3.0  # host work only; the device is busy with the training's forward meanwhile
    dev[0] = 50.0
    with c.region("outer"):
        dev[0] += 2.0
        with c.region("inner"):
            dev[0] += 5.0
        dev[0] += 1.0
    with c.region("after_step"):
        now[0] += 41.0
        dev[0] += 1.0
    c.host_clock()  # the values are on the host: what follows is host work, timed on the host's clock
    with c.region("alpha"):
        now[0] += 2.0
        dev[0] += 0.5  # (a copy it launched runs on behind the host)
    assert c.ms["after_step"] == pytest.approx(41.0) and c.ms["loss"] == pytest.approx(3.0)  # the host's view
    records = profiling_mod.cost_records(c, 100.0)
    assert records["cost/alpha_ms"] == pytest.approx(2.0)
    assert records["cost/after_step_ms"] == pytest.approx(1.0)
    assert records["cost/loss_ms"] == pytest.approx(0.0)
    assert records["cost/outer_ms"] == pytest.approx(3.0) and records["cost/inner_ms"] == pytest.approx(5.0)
    assert records["cost/cockpit_ms"] == pytest.approx(11.0)
    assert records["cost/outer_share"] == pytest.approx(0.03)
    clock = c._clocks[torch.device("cuda")]
    assert clock._used == 8  # two events for each of the four regions before host_clock(), none after
    c.reset()
    assert not c.ms and not c._spans and clock._used == 0  # (the events are reused next step)


def test_a_region_entered_during_graph_capture_keeps_its_host_time(device_clock, now, monkeypatch):
    c, dev = device_clock
    monkeypatch.setattr(profiling_mod.torch.cuda, "is_current_stream_capturing", lambda: True)
    with c.region("engine"):
        now[0] += 2.0
        dev[0] += 7.0
    monkeypatch.setattr(profiling_mod.torch.cuda, "is_current_stream_capturing", lambda: False)
    with c.region("loss"):
        dev[0] += 1.0
    assert profiling_mod.cost_records(c, 10.0)["cost/engine_ms"] == pytest.approx(2.0)
    assert dict(c.ms) == {"engine": pytest.approx(2.0), "loss": pytest.approx(1.0)}


def test_costs_follow_the_model_to_its_device(monkeypatch):
    c = Costs()
    c.follow(torch.zeros(1))
    assert c.clock is None
    c.follow(torch.zeros(1, device="meta"))
    assert c.clock is None
    if torch.cuda.is_available():
        c.follow(torch.zeros(1, device="cuda"))
        assert c.clock is not None and c.clock.device.type == "cuda"


def test_the_wait_for_queued_training_kernels_is_not_the_cockpits_cost(device):
    """A step whose plain work is long (a chain of large products in the model) and whose cockpit work is
    the loss alone: on CUDA the kernels are queued and the step's one transfer to the host waits for
    them inside the cockpit's `after_step`; the cost records must not charge that wait to the cockpit
    (without the device clock `cost/after_step_ms` was most of the step there)."""
    from cockpit_lite.instruments import Loss
    from torch import nn

    from cockpit_lite import Cockpit

    class Chain(nn.Module):  # the plain work: products with a fixed matrix (no parameters)
        def __init__(self, n: int, d: int):
            super().__init__()
            self.n = n
            self.register_buffer("big", torch.randn(d, d) / d**0.5)

        def forward(self, x):
            for _ in range(self.n):
                x = x @ self.big
            return x

    torch.manual_seed(0)
    # on CUDA about 100 ms of kernels a step (fp32) behind a few ms of launches; on the CPU a small one
    d = 4096 if torch.device(device).type == "cuda" else 256
    model = nn.Sequential(nn.Linear(d, d), Chain(20, d)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    loss_fn = nn.MSELoss()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cockpit = Cockpit(model, opt, loss_fn, instruments=[Loss()], sinks=[], cost_every=1)
        for _ in range(6):
            x, y = torch.randn(d, d, device=device), torch.randn(d, d, device=device)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        cockpit.close()
    h = cockpit.history
    assert len(dict(h["loss"])) == 6
    # the wait would be charged on every step; the machine preempting a region on one step is not the
    # cockpit's cost: three of the four steps after the first two (warm-up) must hold the bound
    shares = {s: dict(h["cost/cockpit_ms"])[s] / dict(h["cost/step_ms"])[s] for s in range(2, 6)}
    assert sum(v < 0.25 for v in shares.values()) >= 3, (shares, {t: dict(h[t]) for t in h if t.startswith("cost/")})


def test_profile_needs_a_logdir():
    with pytest.raises(ValueError, match="logdir"):
        train(1, profile=True)


def test_profile_true_uses_the_default_schedule(tmp_path):
    train(6, talker=False, logdir=tmp_path, sinks=[], profile=True)
    [trace] = tmp_path.glob("*.pt.trace.json")
    names = {e.get("name", "") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {n for n in names if n.startswith("ProfilerStep#")} == {"ProfilerStep#2", "ProfilerStep#3", "ProfilerStep#4"}
