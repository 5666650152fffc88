"""``Cockpit(..., overlap=True)``: each step's records are made during the next step (after its forward),
so the step's transfer to the host never waits. The records must be the very numbers the synchronous
mode writes (every tag but the costs, bit for bit), arrive in step order, one step later, the last at
``close()``; training must be untouched (parameters bit-identical to a run without a cockpit)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from cockpit_lite.instruments import (
    Alpha,
    Clipping,
    Distance,
    GradientNoiseScale,
    GradientTests,
    GradNorm,
    Loss,
    PerSampleGradNorms,
    Sharpness,
    StabilityMonitor,
    TracIn,
    UpdateRatio,
    UpdateSize,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cockpit_lite import Cockpit, load
from cockpit_lite.host import HostBatch
from tests import models_lm as M

STEPS = 6


def _every_instrument(xp: torch.Tensor, yp: torch.Tensor) -> list:
    return [
        Loss(), GradNorm(), UpdateSize(), Distance(), PerSampleGradNorms(), GradientTests(), Alpha(),
        Clipping(), Sharpness(every=2, iterations=3), StabilityMonitor(), GradientNoiseScale(), UpdateRatio(),
        TracIn(probes=(xp, yp)),
    ]  # fmt: skip


def _data(seed: int = 1, n: int = 28):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))


def _train(overlap: bool | None, loop: str, logdir=None, seen: list | None = None):
    """Train STEPS steps of ``loop`` (None: no cockpit); returns (cockpit, parameters, warnings)."""
    torch.manual_seed(0)
    model = M.NanoGPT(dropout=0.0) if loop == "own loss" else _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    X, Y = _data()
    xp, yp = X[:3].clone(), Y[:3].clone()
    cockpit = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if overlap is not None:
            if loop == "own loss":
                cockpit = Cockpit(
                    model, opt, instruments="economy", sinks=[], logdir=logdir, overlap=overlap, cost_every=1
                )
            else:
                chosen = _every_instrument(xp, yp) if loop == "every instrument" else "economy"
                cockpit = Cockpit(
                    model, opt, loss_fn, instruments=chosen, sinks=[], logdir=logdir, overlap=overlap, cost_every=1
                )
        if loop == "own loss":
            for step in range(STEPS):
                tokens, targets = M.token_batch(4, 8, seed=step)
                opt.zero_grad()
                model(tokens, targets)[1].backward()
                opt.step()
                if seen is not None:
                    seen.append(cockpit.history.last_step())
        elif loop == "grad scaler":  # an overflowing step the scaler skips (no optimizer step: one record less)
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
            for step in range(STEPS + 1):
                x = X[4 * step : 4 * step + 4].clone()
                if step == 2:
                    x[0, 0] = float("inf")
                opt.zero_grad()
                scaler.scale(loss_fn(model(x), Y[4 * step : 4 * step + 4])).backward()
                scaler.step(opt)
                scaler.update()
        elif loop == "accumulation":
            for step in range(STEPS):
                opt.zero_grad()
                for k in range(2):
                    rows = slice(4 * ((2 * step + k) % 6), 4 * ((2 * step + k) % 6) + 4)
                    (loss_fn(model(X[rows]), Y[rows]) / 2).backward()
                opt.step()
        else:
            loader = DataLoader(TensorDataset(X, Y), batch_size=6, shuffle=False)
            batches = cockpit.track(loader) if cockpit is not None and loop == "every instrument" else loader
            step = 0
            while step < STEPS:
                for x, y in batches:
                    opt.zero_grad()
                    loss_fn(model(x), y).backward()
                    opt.step()
                    if seen is not None:
                        seen.append(cockpit.history.last_step())
                    step += 1
                    if step == STEPS:
                        break
                if cockpit is not None and loop == "every instrument":
                    batches = cockpit.track(loader)
        if cockpit is not None:
            cockpit.close()
    params = [p.detach().clone() for p in model.parameters()]
    return cockpit, params, [str(w.message) for w in caught]


def _same(a, b) -> bool:
    """Equal values, bit for bit (NaN equal to NaN), through dicts, sequences and arrays."""
    if isinstance(a, dict) or isinstance(b, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and not isinstance(a, str):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and _same(a.cpu().numpy(), b.cpu().numpy())
    if isinstance(a, (str, bytes)) or a is None:
        return a == b
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype == object or b.dtype == object:
        return repr(a) == repr(b)
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")


@pytest.mark.parametrize("loop", ["economy", "every instrument", "accumulation", "own loss", "grad scaler"])
def test_overlap_writes_the_synchronous_numbers_and_leaves_training_unchanged(loop):
    plain = _train(None, loop)[1]
    sync, sync_params, sync_warnings = _train(False, loop)
    lagged, lagged_params, lagged_warnings = _train(True, loop)
    assert all(torch.equal(a, b) for a, b in zip(plain, lagged_params, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(plain, sync_params, strict=True))
    assert lagged_warnings == sync_warnings
    tags = {t for t in sync.history if not t.startswith("cost/")}
    assert tags == {t for t in lagged.history if not t.startswith("cost/")}
    assert {"loss", "grad_norm", "tests/norm"} <= tags
    if loop not in ("accumulation", "grad scaler"):
        assert any(math.isfinite(v) for _, v in sync.history["alpha"])  # (alpha chains two steps)
    if loop == "grad scaler":
        assert dict(lagged.history["skipped"]) == {2: 1.0}
    if loop == "every instrument":
        assert {"sharpness/lambda_max", "tracin/self_influence/max"} & tags
    for tag in tags:
        a, b = sync.history[tag], lagged.history[tag]
        assert [s for s, _ in a] == [s for s, _ in b], tag
        assert all(_same(x, y) for (_, x), (_, y) in zip(a, b, strict=True)), tag
    for cost in ("cost/cockpit_ms", "cost/step_ms"):
        assert [s for s, _ in lagged.history[cost]] == list(range(STEPS))
    # the previous step's records are made during each later step, and timed there (at the overflowing
    # iteration of step 2 under the scaler: its costs go with it, as the iteration is retried)
    made = [1, 3, 4, 5] if loop == "grad scaler" else list(range(1, STEPS))
    assert [s for s, _ in lagged.history["cost/records_ms"]] == made


def test_records_arrive_one_step_later_and_the_last_at_close(tmp_path):
    seen_sync, seen_lagged = [], []
    _train(False, "economy", seen=seen_sync)
    lagged = _train(True, "economy", logdir=tmp_path / "run", seen=seen_lagged)[0]
    assert seen_sync == list(range(STEPS))
    assert seen_lagged == [None, *range(STEPS - 1)]
    run = load(lagged.logdir)  # what reached the disk: every step, the last one written by close()
    assert [s for s, _ in run["loss"]] == list(range(STEPS))
    assert [s for s, _ in run["alpha"]] == list(range(STEPS))


def test_state_dict_makes_the_last_records_first():
    """A checkpoint taken between steps holds the state after the last step's compute (Alpha's start
    point awaiting its end), as without overlap."""
    states = []
    for overlap in (False, True):
        torch.manual_seed(0)
        model, (X, Y) = _mlp(), _data()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss_fn = nn.CrossEntropyLoss()
        cockpit = Cockpit(model, opt, loss_fn, instruments="economy", sinks=[], overlap=overlap)
        for k in range(3):
            opt.zero_grad()
            loss_fn(model(X[6 * k : 6 * k + 6]), Y[6 * k : 6 * k + 6]).backward()
            opt.step()
        states.append(cockpit.state_dict())
        assert cockpit.history.last_step() == 2
        cockpit.close()
    sync, lagged = (s["instruments"]["alpha"]["pending"] for s in states)
    assert sync is not None and lagged["step"] == sync["step"] == 2
    assert lagged["s"] == sync["s"] and lagged["stats"] == sync["stats"]
    assert all(torch.equal(sync["update"][n], lagged["update"][n]) for n in sync["update"])


def test_a_started_transfer_is_finished_by_a_read_and_keeps_the_order():
    batch = HostBatch()
    got = []
    first = batch.defer([torch.tensor([1.0, 2.0])], lambda v: got.append(("first", v[0].tolist())))
    batch.start()
    assert batch.started and not batch.pending and first.values is None
    second = batch.defer([torch.tensor([[3.0]], dtype=torch.float16)], lambda v: got.append(("second", v[0].tolist())))
    assert second.get()[0].tolist() == [[3.0]]  # a read flushes: the started transfer is finished first
    assert got == [("first", [1.0, 2.0]), ("second", [[3.0]])]
    assert not batch.started and first.get()[0].dtype == np.float64


def test_overlap_on_each_device_matches_the_synchronous_records(device):
    """The transfer is launched without waiting on CUDA (pinned host memory and an event), done at once on
    the CPU; the overlapped run writes the synchronous run's numbers on either."""
    batch = HostBatch()
    d = batch.defer([torch.arange(5.0, device=device) * 2])
    batch.start()
    copy = batch._started[0][1]
    if torch.device(device).type == "cuda":
        assert copy.array is None and copy.pinned.is_pinned() and copy.event is not None
    else:
        assert copy.array is not None
    batch.finish()
    assert d.get()[0].tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]
    histories = []
    for overlap in (False, True):
        torch.manual_seed(0)
        model, (X, Y) = _mlp().to(device), _data()
        X, Y = X.to(device), Y.to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss()
        with Cockpit(model, opt, loss_fn, instruments="economy", sinks=[], overlap=overlap) as cockpit:
            for k in range(4):
                opt.zero_grad()
                loss_fn(model(X[6 * k : 6 * k + 6]), Y[6 * k : 6 * k + 6]).backward()
                opt.step()
        histories.append(cockpit.history)
    sync, lagged = histories
    for tag in (t for t in sync if not t.startswith("cost/")):
        assert all(_same(x, y) for (_, x), (_, y) in zip(sync[tag], lagged[tag], strict=True)), tag


def test_overlap_with_a_budget_is_refused_with_the_reason():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="budget= and overlap=True together"):
        Cockpit(model, opt, nn.CrossEntropyLoss(), sinks=[], budget=0.05, overlap=True)
    assert not model._forward_pre_hooks  # nothing stays attached
