"""Every built-in instrument on degenerate loops (all gradients zero, lr = 0, one or two examples per
batch, identical examples, a frozen or unused parameter, a NaN loss, a saturated softmax, Adam, a summed
loss, train-mode BatchNorm, gradient accumulation): no instrument fails (a
"failed" warning), no tag holds an infinity, and every NaN a numeric tag holds has its reason recorded
at that step (a ``note/<instrument>`` record, or Alpha's ``alpha/status``)."""

from __future__ import annotations

import re
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

from cockpit_lite import Cockpit
from tests import models
from tests.models_lm import NanoGPT, token_batch

SCENARIOS = [
    "plain", "zero_grads", "lr0", "batch_of_one", "batch_of_two", "identical", "frozen", "unused", "nan_loss",
    "saturated", "adam", "sum", "batchnorm", "batchnorm_identical", "accumulation",
]  # fmt: skip


def _instruments() -> list:
    probes = (torch.randn(3, 6), torch.randint(0, 3, (3,)))
    return [
        Loss(), GradNorm(), UpdateSize(), Distance(), PerSampleGradNorms(per_param=True), GradientTests(),
        Alpha(window=4, verdict_every=4, min_alphas=2), Clipping(), GradientNoiseScale(verdict_every=4, min_steps=2),
        Sharpness(), StabilityMonitor(), UpdateRatio(), TracIn(probes=probes),
    ]  # fmt: skip


class _Zero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.0


class _WithUnused(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.unused = inner, nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _loop(name: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(48, 6), torch.randint(0, 3, (48,))
    lr, batch = 0.05, 8
    if name == "zero_grads":
        model.append(_Zero())
    elif name == "lr0":
        lr = 0.0
    elif name in ("batch_of_one", "batch_of_two"):
        batch = 1 if name == "batch_of_one" else 2
    elif name.startswith("batchnorm"):  # train mode: the examples interact (the coupled path)
        model.insert(1, nn.BatchNorm1d(5))
        if name == "batchnorm_identical":  # the batch's variance is 0
            x[:], y[:] = x[0].clone(), y[0].clone()
    elif name == "unused":  # a parameter the forward never uses: no gradient, ever
        model = _WithUnused(model)
    elif name == "identical":
        x[:], y[:] = x[0].clone(), y[0].clone()
    elif name == "frozen":
        model[0].weight.requires_grad_(False)
    elif name == "saturated":  # logits so large that most per-sample gradients underflow to 0
        with torch.no_grad():
            model[2].weight.mul_(1e4)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr) if name == "adam" else torch.optim.SGD(params, lr=lr, momentum=0.9)
    return model, opt, DataLoader(TensorDataset(x, y), batch_size=batch)


def _numbers(value) -> np.ndarray | None:
    if isinstance(value, str):
        return None
    arr = np.asarray(value)
    return arr.astype(float).ravel() if arr.dtype.kind in "fiu" else None


def _check(cockpit: Cockpit, caught: list) -> None:
    """No failed instrument, no infinity, every NaN with its instrument's reason at its step."""
    failed = [str(w.message) for w in caught if "fail" in str(w.message)]
    assert not failed, failed
    history = cockpit.history

    def owner(tag: str):
        found = [i for i in cockpit.instruments if any(re.fullmatch(p, tag) for p in i.TAGS)]
        assert len(found) == 1, (tag, found)
        return found[0]

    def reasons(inst) -> set[int]:  # the steps with a recorded reason of this instrument
        tags = [f"note/{inst.key}"] + [t for t in inst.TAGS if t.endswith("/status")]
        return {step for t in tags if t in history for step, _ in history[t]}

    infinite, unexplained = [], []
    for tag in history:
        if tag.startswith(("note/", "cost/")):
            continue
        for step, value in history[tag]:
            values = _numbers(value)
            if values is None:
                continue
            if np.isinf(values).any():
                infinite.append((tag, step))
            if np.isnan(values).any() and step not in reasons(owner(tag)):
                unexplained.append((tag, step))
    assert not infinite, infinite
    assert not unexplained, unexplained


@pytest.mark.parametrize("name", SCENARIOS)
def test_no_instrument_fails_and_every_nan_has_its_reason(name):
    model, opt, loader = _loop(name)
    lf = nn.CrossEntropyLoss(reduction="sum" if name == "sum" else "mean")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Cockpit(model, opt, lf, instruments=_instruments(), sinks=[]) as cockpit:
            for k, (x, y) in enumerate(cockpit.track(loader)):
                if k == 6:
                    break
                opt.zero_grad()
                if name == "accumulation":  # two micro-batches of 4 per step
                    for half in (slice(0, 4), slice(4, 8)):
                        (lf(model(x[half]), y[half]) / 2).backward()
                else:
                    loss = lf(model(x), y)
                    (loss * float("nan") if name == "nan_loss" and k == 3 else loss).backward()
                opt.step()
    _check(cockpit, caught)


def test_the_reasons_of_a_nan_loss_and_of_a_step_without_gradients():
    """A NaN loss: every instrument of the step notes it, and GradNorm that p.grad is non-finite; a step
    whose loop called no backward: GradNorm notes that no parameter has a gradient."""
    model, opt, loader = _loop("plain")
    lf = nn.CrossEntropyLoss()
    with (
        warnings.catch_warnings(record=True) as caught,
        Cockpit(model, opt, lf, instruments=[Loss(), GradNorm(), UpdateSize()], sinks=[]) as cockpit,
    ):
        warnings.simplefilter("always")
        for k, (x, y) in enumerate(loader):
            opt.zero_grad()
            loss = lf(model(x), y)
            if k == 1:
                (loss * float("nan")).backward()
            elif k != 2:  # step 2: no backward (p.grad None after zero_grad)
                loss.backward()
            opt.step()
            if k == 2:
                break
    assert not [str(w.message) for w in caught if "fail" in str(w.message)]
    notes = {tag: dict(cockpit.history[tag]) for tag in ("note/loss", "note/grad_norm", "note/update_size")}
    for tag in notes:
        assert "non-finite loss nan" in notes[tag][1], tag
    assert "p.grad holds non-finite values (0.weight, 0.bias, 2.weight, 2.bias)" in notes["note/grad_norm"][1]
    assert "no parameter has a gradient" in notes["note/grad_norm"][2]
    assert 0 not in notes["note/grad_norm"]


def test_a_language_model_with_its_loss_inside_forward_and_ignored_targets():
    """nanoGPT (the loss is a functional cross-entropy inside forward, ignore_index=-1): a sequence with
    every target ignored, then a step with every target ignored (the loss is 0/0): the same three rules."""
    torch.manual_seed(0)
    model = NanoGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    instruments = [i for i in _instruments() if not isinstance(i, TracIn)]  # (TracIn needs a loss module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Cockpit(model, opt, instruments=instruments, sinks=[]) as cockpit:
            for k in range(5):
                x, y = token_batch(b=4, seed=k)
                y[0] = -1
                if k == 2:
                    y[:] = -1
                opt.zero_grad()
                model(x, y)[1].backward()
                opt.step()
    _check(cockpit, caught)
    per_sample = dict(cockpit.history["loss/per_sample"])
    assert np.isnan(per_sample[2]).all() and per_sample[1][0] == 0.0 and (per_sample[1][1:] > 0).all()


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
@pytest.mark.parametrize("scenario", ["plain", "zero_grads", "batch_of_one", "identical"])
def test_convolutions_and_attention_on_degenerate_batches(kind, scenario):
    """A grouped CNN and a TransformerEncoderLayer (fused attention, LayerNorm) with every instrument,
    TracIn's probes included: the same three rules."""
    torch.manual_seed(0)
    if kind == "cnn":
        model, make = models.GroupedCNN(), lambda b: models.cnn_batch(b)
    else:
        model, make = models.TinyTransformer(), lambda b: tuple(t[:b] for t in models.token_batch(b=4, t=5))
    opt, lf = torch.optim.SGD(model.parameters(), lr=0.05), nn.CrossEntropyLoss()
    instruments = [i for i in _instruments() if not isinstance(i, TracIn)] + [TracIn(probes=make(3))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Cockpit(model, opt, lf, instruments=instruments, sinks=[]) as cockpit:
            for _ in range(4):
                x, y = make(1 if scenario == "batch_of_one" else 4)
                if scenario == "identical":
                    x, y = x[:1].expand_as(x).clone(), y[:1].expand_as(y).clone()
                opt.zero_grad()
                out = model(x)
                lf(out * 0.0 if scenario == "zero_grads" else out, y).backward()
                opt.step()
    _check(cockpit, caught)


class _Act(nn.Module):
    def __init__(self, once: bool):
        super().__init__()
        self.once = once

    def forward(self, x):
        return models.OnceDifferentiableTanh.apply(x) if self.once else x.tanh()


def test_an_op_without_a_second_derivative_gives_notes_not_wrong_numbers():
    """Train-mode BatchNorm (the coupled path, whose projections fall back to reverse over reverse when
    forward mode fails) and Sharpness (Hessian-vector products) through a tanh marked once_differentiable,
    in the middle of the network: a further derivative through it silently misses the layers before it.
    Every number written equals the same network's with a plain tanh; the rest is left out with a note."""
    runs = {}
    for once in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), _Act(once), nn.Linear(5, 3)).double()
        opt, lf = torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss()
        instruments = [GradientTests(), Alpha(), Sharpness(every=1)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Cockpit(model, opt, lf, instruments=instruments, sinks=[]) as cockpit:
                for _ in range(3):
                    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
                    opt.zero_grad()
                    lf(model(x), y).backward()
                    opt.step()
        runs[once] = cockpit.history
    plain, once = runs[False], runs[True]
    written = [t for t in once if not t.startswith(("note/", "cost/", "verdict/")) and t != "alpha/status"]
    for tag in written:
        for step, value in once[tag]:
            if isinstance(value, float) and not np.isnan(value):
                assert value == pytest.approx(dict(plain[tag])[step], rel=1e-9), (tag, step)
    assert len(plain["tests/inner"]) == 3 and [s for s, _ in once["tests/inner"]] == [0]  # the norms step only
    assert "sharpness/lambda_max" in plain and "sharpness/lambda_max" not in once
    assert "no second derivative" in once["note/sharpness"][0][1]
    assert all("second derivative" in text for _, text in once["note/gradient_tests"][1:])
