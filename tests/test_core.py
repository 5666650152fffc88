"""The core as a hook driver: atomic construction, no exception reaches the loop, one-way records
(notes, late records), the sealed step record, profile= without a logdir, global settings restored."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from cockpit_lite.instruments import GradientTests, GradNorm, Loss
from torch import nn

from cockpit_lite import Cockpit, CockpitWarning, Instrument, Need, Needs, load
from cockpit_lite.sinks import Dashboard, TensorBoard
from cockpit_lite.sinks.base import Sink
from tests import models
from tests.sinks_util import accumulator

B = 8


def _batches(n, b=B, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 6, generator=gen), torch.randint(0, 3, (b,), generator=gen)) for _ in range(n)]


def _train(model, opt, loss_fn, batches):
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()


def _setup(seed=0):
    torch.manual_seed(seed)
    model = models.mlp()
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), nn.CrossEntropyLoss()


def _no_hooks(model, opt, loss_fn):
    modules = list(model.modules()) + [loss_fn]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


class Raiser(Instrument):
    """Raises in every hook it has."""

    NEEDS = frozenset({Need.PER_SAMPLE_SQ_NORMS, Need.UPDATE})

    def __init__(self, where, **kw):
        super().__init__(**kw)
        self.where = where

    def _boom(self, hook):
        if hook in self.where:
            raise RuntimeError(f"boom in {hook}")

    def requires(self, step):
        self._boom("requires")
        return super().requires(step)

    def on_after_backward(self, record):
        self._boom("on_after_backward")

    def on_before_step(self, record):
        self._boom("on_before_step")

    def compute(self, record):
        self._boom("compute")
        return {"raiser/ok": 1.0}

    def on_close(self):
        self._boom("on_close")
        return {}

    def verdicts(self):
        self._boom("verdicts")
        return []


class FailingSink(Sink):
    def __init__(self, on=("write", "flush", "close", "open")):
        self.on, self.opened, self.closed = set(on), False, False

    def open(self, context):
        if "open" in self.on:
            raise OSError("cannot open")
        self.opened = True

    def write(self, step, records):
        if "write" in self.on:
            raise OSError("disk on fire")

    def flush(self):
        if "flush" in self.on:
            raise OSError("no flush")

    def close(self):
        self.closed = True
        if "close" in self.on:
            raise OSError("no close")


class RecordingSink(Sink):
    def __init__(self):
        self.rows, self.opened, self.closed = [], False, False

    def open(self, context):
        self.opened = True

    def write(self, step, records):
        self.rows.append((step, dict(records)))

    def close(self):
        self.closed = True


# --- construction is atomic -------------------------------------------------------------------------------
def test_failed_construction_leaves_nothing_attached_and_the_loop_runs(tmp_path):
    model, opt, loss_fn = _setup()
    blocker = tmp_path / "file"
    blocker.write_text("a file where the logdir should be")
    with pytest.raises(OSError):
        Cockpit(model, opt, loss_fn, logdir=blocker)
    _no_hooks(model, opt, loss_fn)
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    batches = _batches(3)
    _train(model, opt, loss_fn, batches)  # the loop goes on without the cockpit
    _train(reference, ref_opt, loss_fn, batches)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
    with Cockpit(model, opt, loss_fn, instruments=[Loss()]) as ck:  # a retry without the logdir works
        _train(model, opt, loss_fn, _batches(2))
    assert len(ck.history["loss"]) == 2


def test_a_sink_failing_to_open_closes_the_sinks_opened_before_it():
    model, opt, loss_fn = _setup()
    first = RecordingSink()
    with pytest.raises(OSError, match="cannot open"):
        Cockpit(model, opt, loss_fn, instruments=[Loss()], sinks=[first, FailingSink()])
    assert first.opened and first.closed
    _no_hooks(model, opt, loss_fn)


def test_bad_arguments_leave_nothing_attached():
    model, opt, loss_fn = _setup()
    with pytest.raises(ValueError, match="unknown instrument preset"):
        Cockpit(model, opt, loss_fn, instruments="nope")
    with pytest.raises(ValueError, match="profile"):
        Cockpit(model, opt, loss_fn, profile=True)
    _no_hooks(model, opt, loss_fn)


# --- after construction nothing reaches the loop -------------------------------------------------------
HOOKS = ["requires", "on_after_backward", "on_before_step", "compute", "on_close", "verdicts"]


@pytest.mark.parametrize("where", [[h] for h in HOOKS] + [HOOKS])
def test_instruments_raising_in_any_hook_never_reach_the_loop(where):
    model, opt, loss_fn = _setup()
    reference, _, _ = _setup()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    batches = _batches(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Cockpit(model, opt, loss_fn, instruments=[Raiser(where), Loss(), GradNorm()]) as ck:
            _train(model, opt, loss_fn, batches)
            assert ck.verdicts() == []
    _train(reference, ref_opt, loss_fn, batches)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)  # training unchanged, bit for bit
    assert len(ck.history["loss"]) == 4 and len(ck.history["grad_norm"]) == 4  # the others went on
    ours = [w for w in caught if "boom" in str(w.message)]
    assert ours and all(w.category is CockpitWarning for w in ours)
    assert len(ours) == len({str(w.message) for w in ours})  # once per cause, not once per step


class Direction(Instrument):
    """Asks for the projection onto a fixed direction under a shared key."""

    def __init__(self, scale, **kw):
        super().__init__(**kw)
        self.scale, self.seen = scale, []

    def requires(self, step):
        return Needs(directions={"shared": self._direction})

    def _direction(self, record):
        return {n: torch.full_like(p, self.scale) for n, p in record.params.items()}

    def compute(self, record):
        self.seen.append(record.projections.get("shared"))
        return {}


def test_two_instruments_with_one_direction_key_warn_and_the_first_keeps_its_numbers():
    model, opt, loss_fn = _setup()
    first, second = Direction(1.0, name="first"), Direction(2.0, name="second")
    with pytest.warns(CockpitWarning, match="shared"):
        with Cockpit(model, opt, loss_fn, instruments=[first, second, Loss()]) as ck:
            _train(model, opt, loss_fn, _batches(2))
    assert len(first.seen) == 2 and all(s is not None for s in first.seen)
    assert second.seen == []  # skipped: never handed the other instrument's projections as its own
    assert len(ck.history["loss"]) == 2


def test_schedules_that_alternate_give_each_step_its_own_instruments_and_work():
    """Steps with different scheduled instruments (the plans of a step are reused by their instrument
    set): per-sample work and its records only on the steps whose instruments ask for it."""
    model, opt, loss_fn = _setup()
    with Cockpit(
        model, opt, loss_fn, instruments=[Loss(), GradientTests(every=2), GradNorm(every=3)], cost_every=1
    ) as ck:
        _train(model, opt, loss_fn, _batches(7))
    steps = lambda tag: [s for s, _ in ck.history[tag]]  # noqa: E731
    assert steps("loss") == list(range(7))
    assert steps("tests/norm") == [0, 2, 4, 6]
    assert steps("grad_norm") == [0, 3, 6]
    assert steps("cost/engine_ms") == [0, 2, 4, 6]  # the per-sample engine ran on the tests' steps only
    assert steps("cost/grad_norms_ms") == [0, 3, 6]


def test_sinks_that_raise_never_reach_the_loop_and_the_others_still_get_records():
    model, opt, loss_fn = _setup()
    good = RecordingSink()
    bad = FailingSink(on=("write", "flush", "close"))
    with pytest.warns(CockpitWarning, match="disk on fire"):
        with Cockpit(model, opt, loss_fn, instruments=[Loss()], sinks=[bad, good]):
            _train(model, opt, loss_fn, _batches(3))
    assert [s for s, r in good.rows if "loss" in r] == [0, 1, 2]
    assert bad.closed and good.closed


class Mutator(Instrument):
    NEEDS = frozenset({Need.LOSS})

    def compute(self, record):
        record.loss = 0.0  # not allowed
        return {}


def test_the_step_record_is_read_only_for_instruments():
    model, opt, loss_fn = _setup()
    with pytest.warns(CockpitWarning, match="read-only"):
        with Cockpit(model, opt, loss_fn, instruments=[Mutator(), Loss()]) as ck:
            _train(model, opt, loss_fn, _batches(1))
    assert ck.history["loss"][0][1] > 0.0  # Loss saw the real loss


# --- records flow one way: notes reach the disk -----------------------------------------------------------
def test_notes_reach_json_lines_and_tensorboard(tmp_path):
    model, opt, loss_fn = _setup()
    with Cockpit(model, opt, loss_fn, instruments=[GradientTests(), Loss()], logdir=tmp_path):
        _train(model, opt, loss_fn, _batches(2, b=1))  # batch size 1: the tests are NaN, and say why
    run = load(tmp_path)
    assert all(np.isnan(v) for v in run.values("tests/norm"))
    notes = run.values("note/gradient_tests")
    assert len(notes) == 2 and all("at least 2 samples" in n for n in notes)
    acc = accumulator(tmp_path)
    assert "note/gradient_tests/text_summary" in acc.Tags()["tensors"]


def test_a_failing_per_sample_step_notes_every_instrument_that_needed_it(tmp_path):
    # train-mode BatchNorm with two backward passes through one model call: the coupled path serves one
    # backward per model call
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    opt, loss_fn = torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss()
    with Cockpit(model, opt, loss_fn, instruments=[GradientTests(), Loss()]) as ck:
        ((x, y),) = _batches(1)
        out = model(x)
        loss_fn(out, y).backward(retain_graph=True)
        loss_fn(out, y).backward()
        opt.step()
    assert "one backward per model call" in ck.history.last("note/gradient_tests")
    assert "note/loss" not in ck.history  # Loss needed nothing per-sample


def test_late_records_are_filed_under_their_step(tmp_path):
    class Late(Instrument):
        def compute(self, record):
            out = {"late/now": float(record.step)}
            if record.step > 0:
                out[(record.step - 1, "late/previous")] = float(record.step - 1)
            return out

    model, opt, loss_fn = _setup()
    with Cockpit(model, opt, loss_fn, instruments=[Late()], logdir=tmp_path) as ck:
        _train(model, opt, loss_fn, _batches(3))
    for run in (ck.history, load(tmp_path)):
        assert [(s, v) for s, v in run["late/previous"]] == [(0, 0.0), (1, 1.0)]
        assert [s for s, _ in run["cost/sinks_ms"]] == [0, 1]  # the sinks' own time: the same mechanism


# --- profile= with sinks but no logdir ------------------------------------------------------------------
def test_the_streaming_example_with_profile_runs_as_written(tmp_path):
    model, optimizer, loss_fn = _setup()
    run = tmp_path / "exp1"
    cockpit = Cockpit(
        model,
        optimizer,
        loss_fn,
        instruments="economy",
        sinks=[TensorBoard(run), Dashboard(run / "dashboard.png")],
        profile=True,
    )
    with cockpit:
        _train(model, optimizer, loss_fn, _batches(6))
    assert list(run.glob("*.pt.trace.json")), "the profiler trace goes where the TensorBoard sink writes"
    assert (run / "dashboard.png").exists() and list(run.glob("events.out.tfevents.*"))


# --- global torch settings are restored ----------------------------------------------------------------
def test_the_dynamo_setting_is_restored_on_close():
    config = torch._dynamo.config
    before = config.skip_nnmodule_hook_guards
    model, opt, loss_fn = _setup()
    compiled = torch.compile(model, backend="eager")
    with Cockpit(compiled, opt, loss_fn, instruments=[Loss()]):
        assert config.skip_nnmodule_hook_guards is False
        _train(compiled, opt, loss_fn, _batches(1))
    assert config.skip_nnmodule_hook_guards == before


def test_a_closed_cockpit_used_again_raises_clearly():
    model, opt, loss_fn = _setup()
    ck = Cockpit(model, opt, loss_fn, instruments=[Loss()])
    ck.close()
    with pytest.raises(RuntimeError, match="closed"):
        with ck:
            pass


def test_framework_optimizer_wrappers_are_unwrapped():
    """An object holding the optimizer as ``optimizer`` (accelerate) or ``_optimizer`` (Lightning),
    whose step() calls the inner one's: the cockpit hooks the inner optimizer and tracks the steps."""

    class Wrapper:  # the shape of AcceleratedOptimizer / LightningOptimizer
        def __init__(self, inner, attr):
            setattr(self, attr, inner)
            self._attr = attr

        def step(self, closure=None):
            return getattr(self, self._attr).step(closure)

        def zero_grad(self):
            getattr(self, self._attr).zero_grad()

    for attr in ("optimizer", "_optimizer"):
        model, opt, loss_fn = _setup()
        wrapped = Wrapper(opt, attr)
        with Cockpit(model, wrapped, loss_fn, instruments=[Loss(), GradNorm()]) as ck:
            _train(model, wrapped, loss_fn, _batches(3))
        assert len(ck.history["grad_norm"]) == 3, attr
