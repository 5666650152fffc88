"""Alpha against an independent implementation: a float64 loop over samples at both points of each step
(one autograd call per sample, on model copies at theta_t and theta_{t+1}) and numpy least squares on the
whitened system; closed-form alphas on an exact 1-D quadratic; the edge cases; the verdict; the demo."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from cockpit_lite.instruments import Alpha
from cockpit_lite.instruments.alpha import fit_alpha, lr_verdict
from torch import nn

from cockpit_lite import Cockpit, load
from tests import models

# ---------------------------------------------------------------------------------------------------------
# the independent reference


def _losses_and_grads(template: nn.Module, state: dict, loss_fn: nn.Module, x, y):
    """float64 per-sample losses (B,) and flattened per-sample gradients (B, D) at parameters ``state``."""
    m = copy.deepcopy(template).double()
    m.load_state_dict({k: v.double() for k, v in state.items()})
    lf = copy.deepcopy(loss_fn).double()
    params = [p for p in m.parameters() if p.requires_grad]
    losses, grads = [], []
    for i in range(len(y)):
        xi = x[i : i + 1].double() if torch.is_floating_point(x) else x[i : i + 1]
        yi = y[i : i + 1].double() if torch.is_floating_point(y) else y[i : i + 1]
        li = lf(m(xi), yi)  # a batch of one: l_i (for MSELoss the mean over the sample's elements)
        gs = torch.autograd.grad(li, params)
        losses.append(float(li.detach()))
        grads.append(torch.cat([g.reshape(-1) for g in gs]))
    return np.array(losses), torch.stack(grads).cpu().numpy()


def _flat_state(state: dict) -> np.ndarray:
    return np.concatenate([v.double().cpu().numpy().reshape(-1) for v in state.values()])


def reference_alpha(template, loss_fn, state_t, state_t1, batch_t, batch_t1) -> float:
    """Cockpit's alpha of the step theta_t -> theta_{t+1} (REFERENCE.md section 3), all in float64."""
    d = _flat_state(state_t1) - _flat_state(state_t)
    s = np.linalg.norm(d)
    l0, g0 = _losses_and_grads(template, state_t, loss_fn, *batch_t)
    l1, g1 = _losses_and_grads(template, state_t1, loss_fn, *batch_t1)
    p0, p1 = g0 @ d / s, g1 @ d / s
    y = np.array([l0.mean(), l1.mean(), p0.mean(), p1.mean()])
    var = np.array([l0.var(ddof=1), l1.var(ddof=1), p0.var(ddof=1), p1.var(ddof=1)])
    var[var == 0] = 1e-10
    phi = np.array([[1, 0, 0], [1, s, s**2], [0, 1, 0], [0, 1, 2 * s]])
    w = 1 / np.sqrt(var)
    m, *_ = np.linalg.lstsq(w[:, None] * phi, w * y, rcond=None)
    return 2 * s / (-m[1] / m[2]) - 1 if m[2] > 0 else math.nan  # NaN: concave fit


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train(model, optimizer, loss_fn, batches, instruments=None, clip=None, cockpit_kw=None):
    """The user's loop; returns the parameters before every step and after the last, and the cockpit."""
    states = []
    cp = Cockpit(model, optimizer, loss_fn, instruments=instruments or [Alpha()], **(cockpit_kw or {}))
    with cp:
        for x, y in batches:
            states.append(_state(model))
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        states.append(_state(model))
    return states, cp


def _batches(n, b=8, d_in=6, classes=3, seed=0, device="cpu"):
    """Drawn on the CPU (the same numbers on every device), moved to ``device``."""
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(b, d_in, generator=gen), torch.randint(0, classes, (b,), generator=gen)) for _ in range(n)]
    return [(x.to(device), y.to(device)) for x, y in batches]


OPTIMIZERS = {
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.5), None),
    "sgd_momentum": (lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9), None),
    "adam": (lambda p: torch.optim.Adam(p, lr=0.05), None),
    "sgd_clip": (lambda p: torch.optim.SGD(p, lr=0.5), 0.05),
    "adamw_decay": (lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.5), None),
}


def test_alpha_on_a_transformer_matches_float64_reference(device, monkeypatch):
    """Sequences (Linear calls at T positions) with g_i . gbar asked too, which forms each layer's g_i: the end
    point's projections onto d_{t-1}, known before the step, are taken from those during backward (B o i a
    layer, not B T o i from the factors after the step); alpha still equals the float64 loop's."""
    from cockpit_lite.instruments import GradientTests

    from cockpit_lite.persample import engine

    early = []
    project_early = engine.PerSampleEngine.project_early
    monkeypatch.setattr(
        engine.PerSampleEngine, "project_early", lambda self, d: (early.append(sorted(d)), project_early(self, d))
    )
    torch.manual_seed(0)
    model = models.TinyTransformer().to(device)
    template = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randint(1, 11, (6, 5), generator=gen), torch.randint(0, 3, (6,), generator=gen)) for _ in "abcd"]
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    states, cp = _train(model, optimizer, loss_fn, batches, instruments=[Alpha(), GradientTests()])
    assert early == [["alpha/end"]] * 3  # steps 1-3 project onto the update before them during backward
    got = dict(cp.history["alpha"])
    finite = 0
    for t in range(3):
        expected = reference_alpha(template, loss_fn, states[t], states[t + 1], batches[t], batches[t + 1])
        if not math.isnan(expected):
            finite += 1
            np.testing.assert_allclose(got[t], expected, rtol=1e-3, atol=1e-4, err_msg=f"step {t}")
    assert finite >= 2


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_alpha_matches_float64_reference(device, opt):
    torch.manual_seed(0)
    model = models.mlp().to(device)
    template = copy.deepcopy(model)
    make_opt, clip = OPTIMIZERS[opt]
    optimizer = make_opt(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    batches = _batches(4, device=device)
    states, cp = _train(model, optimizer, loss_fn, batches, clip=clip)
    got = dict(cp.history["alpha"])
    assert sorted(got) == [0, 1, 2, 3]
    status = dict(cp.history.get("alpha/status", []))
    assert math.isnan(got[3]) and status[3] == "no_end_point"
    finite = 0
    for t in range(3):
        expected = reference_alpha(template, loss_fn, states[t], states[t + 1], batches[t], batches[t + 1])
        if math.isnan(expected):
            assert status.get(t) == "concave" and math.isnan(got[t]), f"{opt} step {t}"
        else:
            finite += 1
            np.testing.assert_allclose(got[t], expected, rtol=1e-3, atol=1e-4, err_msg=f"{opt} step {t}")
    assert finite >= 2
    if clip is not None:  # the clipped gradient really is what moved the parameters
        d = _flat_state(states[1]) - _flat_state(states[0])
        np.testing.assert_allclose(np.linalg.norm(d), 0.5 * clip, rtol=1e-4)


def test_alpha_with_lr_scheduler_and_sum_reduction(device):
    torch.manual_seed(1)
    model = models.mlp().to(device)
    template = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.3)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    batches = _batches(3, seed=3, device=device)
    states = []
    with Cockpit(model, optimizer, loss_fn, instruments=[Alpha()]) as cp:
        for x, y in batches:
            states.append(_state(model))
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
            sched.step()
    got = dict(cp.history["alpha"])
    for t in range(2):
        expected = reference_alpha(template, loss_fn, states[t], states[t + 1], batches[t], batches[t + 1])
        np.testing.assert_allclose(got[t], expected, rtol=1e-3, atol=1e-4)


def test_alpha_every_k_steps_uses_the_next_step_as_end_point(device):
    torch.manual_seed(2)
    model = models.mlp().to(device)
    template = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
    loss_fn = nn.CrossEntropyLoss()
    batches = _batches(6, seed=4, device=device)
    states, cp = _train(model, optimizer, loss_fn, batches, instruments=[Alpha(every=2)])
    got = dict(cp.history["alpha"])
    assert sorted(got) == [0, 2, 4]
    for t in (0, 2):
        expected = reference_alpha(template, loss_fn, states[t], states[t + 1], batches[t], batches[t + 1])
        np.testing.assert_allclose(got[t], expected, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# closed form: gradient descent on an exact 1-D quadratic


@pytest.mark.parametrize("target", [-0.5, 0.0, 1.0])
def test_closed_form_alpha_on_a_quadratic(device, target):
    """l_i = (w x_i - y_i)^2, full batch: L(w) = a w^2 - 2 b w + c with a = mean x^2. A GD step of rate lr
    has s = 2 a lr |w - w*| and x* = |w - w*|, so alpha = s / x* - 1 = 2 a lr - 1 exactly."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, generator=gen)
    y = 0.7 * x + 0.3 * torch.randn(16, 1, generator=gen)
    a = float((x.double() ** 2).mean())
    x, y = x.to(device), y.to(device)
    model = nn.Linear(1, 1, bias=False).to(device)
    with torch.no_grad():
        model.weight.fill_(-2.0)
    lr = (target + 1) / (2 * a)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    _, cp = _train(model, optimizer, nn.MSELoss(), [(x, y)] * 4)
    # alpha = 0 lands on w* after one step (the next steps have s ~ float rounding): check that step only
    alphas = [v for s, v in cp.history["alpha"] if s < (1 if target == 0 else 3)]
    np.testing.assert_allclose(alphas, target, atol=2e-4)


# ---------------------------------------------------------------------------------------------------------
# fit function against Cockpit's own formula


def _cockpit_formula(t, fs, dfs, fs_var, dfs_var):
    """Cockpit 1.0.2's _fit_quadratic + _get_alpha, transcribed (inv of the normal equations)."""
    phi = np.array([[1, 0, 0], [1, t, t**2], [0, 1, 0], [0, 1, 2 * t]]).T
    fs_var = [1e-10 if v == 0 else v for v in fs_var]
    dfs_var = [1e-10 if v == 0 else v for v in dfs_var]
    lam_inv = np.linalg.inv(np.diag(fs_var + dfs_var))
    mu = np.linalg.inv(phi @ lam_inv @ phi.T) @ phi @ lam_inv @ np.array(fs + dfs)
    if mu[2] < 0:
        return -1.0
    return 2 * t / (-mu[1] / mu[2]) - 1


def test_fit_matches_cockpit_formula_on_random_observations():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        s = float(10 ** rng.uniform(-2, 1))
        fs = list(rng.normal(size=2))
        dfs = list(rng.normal(size=2))
        fv = list(10 ** rng.uniform(-3, 1, size=2))
        dv = list(10 ** rng.uniform(-3, 1, size=2))
        if rng.random() < 0.2:
            fv[0] = 0.0  # Cockpit's 1e-10 replacement
        fit = fit_alpha(s, tuple(fs), tuple(fv), tuple(dfs), tuple(dv))
        expected = _cockpit_formula(s, fs, dfs, fv, dv)
        if fit.status == "concave":
            assert expected == -1.0
        else:
            assert fit.status == "ok"
            np.testing.assert_allclose(fit.alpha, expected, rtol=1e-6, atol=1e-9)
            checked += 1
    assert checked > 100


def test_fit_edge_cases_are_distinguishable():
    ok = fit_alpha(1.0, (1.0, 0.5), (0.1, 0.1), (-1.0, 0.0), (0.1, 0.1))
    assert ok.status == "ok" and ok.alpha == pytest.approx(0.0, abs=1e-9)  # derivative 0 at the end: floor
    concave = fit_alpha(1.0, (1.0, 0.2), (0.1, 0.1), (-0.5, -1.0), (0.1, 0.1))
    assert concave.status == "concave" and math.isnan(concave.alpha) and concave.m[2] < 0
    zero = fit_alpha(0.0, (1.0, 1.0), (0.1, 0.1), (0.0, 0.0), (0.0, 0.0))
    assert zero.status == "zero_step" and math.isnan(zero.alpha)
    nonfinite = fit_alpha(1.0, (math.nan, 1.0), (0.1, 0.1), (-1.0, 0.0), (0.1, 0.1))
    assert nonfinite.status == "nonfinite"
    # the f observations weigh 1e300, the derivatives 1e-300: only two independent rows remain
    singular = fit_alpha(1.0, (1.0, 0.5), (1e-300, 1e-300), (-1.0, 0.0), (1e300, 1e300))
    assert singular.status == "singular" and math.isnan(singular.alpha)
    # a tiny step is not singular: the fit is solved in the step-normalised coordinate
    tiny = fit_alpha(1e-9, (1.0, 1.0 - 0.5e-9), (0.1, 0.1), (-1.0, 0.0), (0.1, 0.1))
    assert tiny.status == "ok" and tiny.alpha == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# edge cases in a run


class _Sin(nn.Module):
    def forward(self, z):
        return torch.sin(z)


def test_concave_fit_recorded_as_concave_not_minus_one(device):
    """l = sin(w x)^2 with w x near 1.2 is concave in w (second derivative 2 cos(2 w x) x^2 < 0)."""
    gen = torch.Generator().manual_seed(0)
    x = (1 + 0.05 * torch.randn(16, 1, generator=gen)).to(device)
    model = nn.Sequential(nn.Linear(1, 1, bias=False), _Sin()).to(device)
    with torch.no_grad():
        model[0].weight.fill_(1.2)
    _, cp = _train(
        model, torch.optim.SGD(model.parameters(), lr=0.01), nn.MSELoss(), [(x, torch.zeros(16, 1, device=device))] * 3
    )
    status = dict(cp.history["alpha/status"])
    alphas = dict(cp.history["alpha"])
    assert status[0] == status[1] == "concave"
    assert math.isnan(alphas[0]) and math.isnan(alphas[1])


def test_zero_step_and_missing_data_and_small_batch(device):
    torch.manual_seed(0)
    model = models.mlp().to(device)
    loss_fn = nn.CrossEntropyLoss()
    # lr = 0: the parameters never move
    _, cp = _train(model, torch.optim.SGD(model.parameters(), lr=0.0), loss_fn, _batches(3, device=device))
    assert [v for _, v in cp.history["alpha/status"]] == ["zero_step"] * 3
    assert all(math.isnan(v) for _, v in cp.history["alpha"])
    # batches of one sample: no variance
    _, cp = _train(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, _batches(2, b=1, device=device))
    assert dict(cp.history["alpha/status"])[0] == "batch_too_small"
    # gradient accumulation (two forward/backward passes in step 2): the step's objective is the sum of
    # both; alpha is defined there too (the per-sample numbers are checked in tests/test_accumulation.py)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = _batches(6, device=device)
    with Cockpit(model, optimizer, loss_fn, instruments=[Alpha()]) as cp:
        for i, (x, y) in enumerate(batches):
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            if i == 2:
                loss_fn(model(x), y).backward()
            optimizer.step()
    status = dict(cp.history["alpha/status"])
    alphas = dict(cp.history["alpha"])
    assert all(math.isfinite(alphas[s]) for s in range(5)), status
    assert status[5] == "no_end_point"


def test_trajectory_unchanged_and_memory_is_one_update(device):
    torch.manual_seed(0)
    model = models.mlp().to(device)
    plain = copy.deepcopy(model)
    batches = _batches(5, device=device)
    loss_fn = nn.CrossEntropyLoss()
    opt_a = torch.optim.Adam(model.parameters(), lr=0.05)
    opt_p = torch.optim.Adam(plain.parameters(), lr=0.05)
    alpha = Alpha()
    with Cockpit(model, opt_a, loss_fn, instruments=[alpha]):
        for i, (x, y) in enumerate(batches):
            opt_a.zero_grad()
            loss_fn(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            opt_a.step()
            if i == 2:  # between steps Alpha holds the previous update (D floats) and scalars only
                held = alpha._pending
                assert held is not None and set(held.update) == {n for n, _ in model.named_parameters()}
                assert all(torch.is_tensor(v) for v in held.update.values())
                assert all(isinstance(v, float) for v in held.stats.values())
    for x, y in batches:
        opt_p.zero_grad()
        loss_fn(plain(x), y).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.1)
        opt_p.step()
    for (n, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_records_stream_to_disk_and_economy_includes_alpha(tmp_path):
    torch.manual_seed(0)
    model = models.mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    _, cp = _train(model, optimizer, nn.CrossEntropyLoss(), _batches(4), instruments="economy",
                   cockpit_kw={"logdir": tmp_path})  # fmt: skip
    assert any(isinstance(i, Alpha) for i in cp.instruments)
    back = load(tmp_path)
    assert [s for s, _ in back["alpha"]] == [0, 1, 2, 3]
    np.testing.assert_allclose(back.values("alpha")[:3], cp.history.values("alpha")[:3])
    assert back["alpha/status"] == [(3, "no_end_point")]
    assert isinstance(back.last("verdict/lr"), str)  # written when the cockpit closes
    assert cp.verdicts() and cp.verdicts()[0].startswith("learning rate: ")
    lines = [json.loads(line) for line in open(tmp_path / "cockpit.jsonl")]
    assert any("verdict/lr" in line["records"] for line in lines)


# ---------------------------------------------------------------------------------------------------------
# the verdict


def test_verdict_thresholds():
    assert lr_verdict(np.full(50, -0.8))[0] == "too small"
    assert lr_verdict(np.full(50, 0.1))[0] == "about right"
    assert lr_verdict(np.full(50, 0.9))[0] == "too large"
    mixed = np.r_[np.zeros(60), np.full(40, 2.0)]  # median 0 but 40% of the steps overshoot uphill
    label, text = lr_verdict(mixed, window=100)
    assert label == "too large" and "40% of steps overshoot" in text and "last 100" in text
    assert lr_verdict(np.array([]))[0] == "undecided"


def test_verdict_window_and_written_every_n():
    a = Alpha(window=5, verdict_every=3, min_alphas=2)
    for step, v in enumerate([-0.9, -0.9, -0.9, -0.9, 0.1, 0.1, 0.1, 0.1, 0.1]):
        out = a._result(step, v, "ok", 1.0)
        if step % 3 == 2:
            assert (step, "verdict/lr") in out
    assert a.verdict() == "about right"  # only the last 5 count
    assert Alpha(min_alphas=3).verdict() == "undecided"


# ---------------------------------------------------------------------------------------------------------
# the demo


def test_demo_verdicts_are_right(tmp_path):
    from demos import lr_debugging

    results = lr_debugging.main(steps=400, quiet=True, root=tmp_path)
    assert [r["verdict"] for r in results] == [r["expected"] for r in results]
    assert [r["expected"] for r in results] == ["too small", "about right", "too large"]
    good = results[1]["test_acc"]
    assert good > 0.9 and good > results[0]["test_acc"] and good > results[2]["test_acc"]
    for r in results:
        assert (tmp_path / f"lr={r['lr']}" / "cockpit.jsonl").exists()
