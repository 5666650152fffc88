"""The per-sample engine takes its layer hooks off after ``SLEEP_AFTER`` steps without per-sample
work (an overhead budget's rest steps, ``every=``) and puts them back at the model's forward pre-hook of
the next step that needs them: the numbers of that step are exact (float64 loop), with one micro-batch or
several, and a torch.compile'd model keeps its hooks (its compiled code guards on them)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from cockpit_lite import Cockpit
from cockpit_lite.persample import engine as engine_mod
from tests.reference import Probe, flat, per_sample_grads_loop

FLAGS = {"per_sample_sq_norms", "per_sample_sq_norms_by_param", "per_sample_dot_mean"}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _layer_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules() if m is not model)


def _engine(cockpit: Cockpit):
    return next(p.engine for p in cockpit.providers if hasattr(p, "engine"))


def _check(record, theta: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """The record's per-sample numbers against the float64 loop at ``theta`` (the parameters the step
    started from), for the mean loss over all of ``x``."""
    ref = per_sample_grads_loop(theta, nn.CrossEntropyLoss(), x, y)
    g = flat(ref)
    np.testing.assert_allclose(record.per_sample_sq_norms, (g**2).sum(1), rtol=1e-10)
    np.testing.assert_allclose(record.per_sample_dot_mean, g @ g.mean(0), rtol=1e-10)
    for name, gp in ref.items():
        want = (gp.reshape(len(y), -1) ** 2).sum(1)
        np.testing.assert_allclose(record.per_sample_sq_norms_by_param[name], want, rtol=1e-10)


def _training(every: int, seed: int):
    """A float64 MLP, SGD, cross-entropy, a probe asking FLAGS every ``every`` steps, a batch generator."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, nn.CrossEntropyLoss(), Probe(flags=FLAGS, every=every), torch.Generator().manual_seed(seed)


def _batch(g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_layer_hooks_sleep_between_steps_that_need_them_and_wake_exact():
    model, opt, loss_fn, probe, g = _training(every=6, seed=1)
    with Cockpit(model, opt, loss_fn, instruments=[probe], sinks=[]) as cockpit:
        engine = _engine(cockpit)
        assert engine.may_sleep and _layer_hooks(model) == 3
        # the Cockpit drives the engine from its own hooks on the model (one pre-hook, one hook): none of its own
        assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1
        hooked = {}
        for step in range(20):
            x, y = _batch(g, 5)
            theta = copy.deepcopy(model) if step % 6 == 0 else None
            hooked[step] = _layer_hooks(model)
            loss_fn(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            if theta is not None:
                _check(probe.records[-1], theta, x, y)
        assert len(probe.records) == 4  # steps 0, 6, 12, 18
    # (counted before each step's forward) awake for step 0, asleep from the SLEEP_AFTER-th step without
    # per-sample work (step 4, as it begins), woken inside step 6's forward (its numbers above are exact), asleep again
    assert engine_mod.SLEEP_AFTER == 4
    assert [hooked[s] for s in range(8)] == [3, 3, 3, 3, 3, 0, 0, 3]
    assert hooked[11] == 0 and hooked[13] == 3 and hooked[17] == 0
    assert _layer_hooks(model) == 0  # closed: none left


def test_a_step_after_sleeping_that_accumulates_micro_batches_is_exact():
    model, opt, loss_fn, probe, g = _training(every=7, seed=2)
    with Cockpit(model, opt, loss_fn, instruments=[probe], sinks=[]) as cockpit:
        cockpit.engine.expect_accumulation()
        for step in range(15):
            x, y = _batch(g, 6)
            theta = copy.deepcopy(model)
            for a, b in ((0, 2), (2, 6)):  # the mean loss of the whole batch, in two micro-batches
                (loss_fn(model(x[a:b]), y[a:b]) * (b - a) / 6).backward()
            opt.step()
            opt.zero_grad()
            if step % 7 == 0:
                _check(probe.records[-1], theta, x, y)
        assert len(probe.records) == 3  # steps 0, 7 and 14, each after six steps asleep but the first


def test_a_compiled_model_keeps_its_layer_hooks():
    model, opt, loss_fn, probe, g = _training(every=8, seed=3)
    compiled = torch.compile(model, backend="eager")
    with Cockpit(compiled, opt, loss_fn, instruments=[probe], sinks=[]) as cockpit:
        assert not _engine(cockpit).may_sleep
        for step in range(9):
            x, y = _batch(g, 5)
            theta = copy.deepcopy(model) if step == 8 else None
            loss_fn(compiled(x), y).backward()
            opt.step()
            opt.zero_grad()
            assert _layer_hooks(model) == 3
        _check(probe.records[-1], theta, x, y)
