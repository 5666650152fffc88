"""StabilityMonitor on a real training run (scikit-learn's digits, shipped with the package) with a batch
of corrupted examples injected at a known step: the spike is flagged there and nowhere else, the
injected examples (by dataset index, through cockpit.track) top the attribution, and no spike is
flagged in the same run without them. The per-sample losses and gradient norms it ranks by are checked
against a float64 loop at the spike step, the layer jumps and the precursor score against norms the
loop measured itself, the Adam eps share against a float64 Adam recurrence, Megatron's rule on a
scaled loss, and resuming from a saved state against the uninterrupted run."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from cockpit_lite.instruments.stability import StabilityMonitor
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cockpit_lite import Cockpit, load
from tests.reference import per_sample_grads_loop

B = 32
SPIKE = 150  # the step of the corrupted batch (after OLMo's warm-up of 128 steps)
STEPS = 160
BAD_POS = (3, 11, 20, 29)  # positions of the corrupted examples in that batch


def digits_with_corruption():
    """The 1797 digits in [0, 1], plus len(BAD_POS) corrupted copies at the end of the dataset: inverted
    pixels scaled x30 and a wrong label (only the injected batch draws them)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    base = torch.arange(len(BAD_POS)) * 97
    bad_x = (1.0 - x[base]) * 30.0
    bad_y = (y[base] + 5) % 10
    return torch.cat([x, bad_x]), torch.cat([y, bad_y]), len(y)


def batches(n: int, inject: bool, steps: int, spike: int, seed: int = 0) -> list[list[int]]:
    """Random batches of the clean examples; batch ``spike`` holds the corrupted ones when ``inject``."""
    rng = np.random.default_rng(seed)
    out = [rng.choice(n, B, replace=False).tolist() for _ in range(steps)]
    if inject:
        for k, pos in enumerate(BAD_POS):
            out[spike][pos] = n + k
    return out


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def train(
    inject: bool,
    make_monitor,
    steps: int = STEPS,
    spike: int = SPIKE,
    adam: bool = False,
    logdir=None,
    split: int | None = None,
):
    """Train with a StabilityMonitor from ``make_monitor()``; the loop records, per step, its own
    numbers: the loss, ||p.grad||, ||theta_p|| before the step and ||Delta theta_p|| (float64), the
    gradients (for Adam's recurrence), and the model and batch at the spike step. With ``split``: the
    cockpit is closed after ``split`` steps, its state saved and loaded (torch.save, weights_only) into a
    new cockpit with a fresh monitor, which continues the run."""
    torch.manual_seed(0)
    x, y, n = digits_with_corruption()
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2) if adam else torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    plan = batches(n, inject, steps, spike)
    log = {"loss": [], "grad": [], "param": [], "update": [], "grads": [], "at_spike": None, "monitors": []}
    bounds = [0, steps] if split is None else [0, split, steps]
    state = None
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        monitor = make_monitor()
        log["monitors"].append(monitor)
        cockpit = Cockpit(model, opt, loss_fn, instruments=[monitor], logdir=logdir if a == 0 else None, sinks=[])
        if state is not None:
            cockpit.load_state_dict(state)
        loader = DataLoader(TensorDataset(x, y), batch_sampler=plan[a:b])
        for step, (xb, yb) in enumerate(cockpit.track(loader), start=a):
            if step == spike:
                log["at_spike"] = (copy.deepcopy(model), xb.clone(), yb.clone())
            before = {k: p.detach().clone() for k, p in model.named_parameters()}
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            log["loss"].append(loss.item())
            log["grad"].append({k: p.grad.double().norm().item() for k, p in model.named_parameters()})
            log["grads"].append({k: p.grad.detach().double().clone() for k, p in model.named_parameters()})
            opt.step()
            log["param"].append({k: v.double().norm().item() for k, v in before.items()})
            log["update"].append(
                {k: (p.detach().double() - before[k].double()).norm().item() for k, p in model.named_parameters()}
            )
        log["history"] = cockpit.history
        buf = io.BytesIO()
        torch.save(cockpit.state_dict(), buf)
        cockpit.close()
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
    return log, opt


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stability")
    out = {}
    for inject in (True, False):
        log, _ = train(inject, lambda: StabilityMonitor(top_k=8), logdir=root / str(inject))
        out[inject] = (log, load(root / str(inject)))
    return out


def values(history, tag) -> dict[int, object]:
    return {int(s): v for s, v in history[tag]}


def test_spike_flagged_at_the_injected_step_and_nowhere_else(runs):
    spikes = values(runs[True][1], "stability/spike")
    assert len(spikes) == STEPS
    assert [s for s, v in spikes.items() if v == 1.0] == [SPIKE]
    clean = values(runs[False][1], "stability/spike")
    assert len(clean) == STEPS and all(v == 0.0 for v in clean.values())
    # warm-up: no check (loss_z NaN) until the window holds 128 losses
    z = values(runs[True][1], "stability/loss_z")
    assert all(math.isnan(z[s]) for s in range(128)) and all(math.isfinite(z[s]) for s in range(128, STEPS))


def test_threshold_and_loss_z_against_the_loops_losses(runs):
    """mu + 6 sigma (population std) of the previous 128 losses the loop itself saw."""
    log, h = runs[True]
    losses = np.array(log["loss"])
    z, thr = values(h, "stability/loss_z"), values(h, "stability/threshold")
    for step in (128, 140, SPIKE, STEPS - 1):
        window = losses[step - 128 : step]
        mu, sigma = window.mean(), window.std()
        np.testing.assert_allclose(thr[step], mu + 6 * sigma, rtol=1e-6)
        np.testing.assert_allclose(z[step], (losses[step] - mu) / sigma, rtol=1e-6)
    assert z[SPIKE] > 6


def test_injected_examples_top_the_attribution_and_match_a_float64_loop(runs):
    log, h = runs[True]
    n = 1797
    injected = list(range(n, n + len(BAD_POS)))
    for tag in ("stability/examples/by_loss", "stability/examples/by_grad_norm"):
        ((step, table),) = h[tag]
        assert step == SPIKE
        assert len(table["index"]) == 8
        assert sorted(table["index"][: len(BAD_POS)].tolist()) == injected  # the injected ones first
        assert sorted(table["position"][: len(BAD_POS)].tolist()) == list(BAD_POS)
    # per-sample losses and gradient norms of the spike step: float64 loop, one autograd call each
    model, xb, yb = log["at_spike"]
    ref = per_sample_grads_loop(model, nn.CrossEntropyLoss(), xb, yb)
    ref_norm = np.sqrt(sum((g.reshape(len(yb), -1) ** 2).sum(1) for g in ref.values()))
    with torch.no_grad():
        ref_loss = nn.CrossEntropyLoss(reduction="none")(model.double()(xb.double()), yb).numpy()
    for tag, key in (("stability/examples/by_loss", ref_loss), ("stability/examples/by_grad_norm", ref_norm)):
        ((_, table),) = h[tag]
        pos = table["position"].astype(int)
        np.testing.assert_array_equal(pos, np.argsort(-key, kind="stable")[:8])
        np.testing.assert_allclose(table["loss"], ref_loss[pos], rtol=1e-5)
        np.testing.assert_allclose(table["grad_norm"], ref_norm[pos], rtol=1e-5)
    text = h["stability/attribution"][0][1]
    assert text.startswith(f"loss spike at step {SPIKE}") and str(n) in text


def test_layer_jumps_against_the_loops_norms(runs):
    log, h = runs[True]
    ((step, table),) = h["stability/layers"]
    assert step == SPIKE
    hist = 32
    for name, gj, uj in zip(table["layer"], table["grad_jump"], table["update_jump"], strict=True):
        g = [log["grad"][s][name] for s in range(SPIKE - hist, SPIKE)]
        u = [log["update"][s][name] for s in range(SPIKE - hist, SPIKE)]
        np.testing.assert_allclose(gj, log["grad"][SPIKE][name] / np.median(g), rtol=1e-5)
        np.testing.assert_allclose(uj, log["update"][SPIKE][name] / np.median(u), rtol=1e-5)
    every = {name: log["grad"][SPIKE][name] / np.median([log["grad"][s][name] for s in range(SPIKE - hist, SPIKE)])
             for name in log["grad"][SPIKE]}  # fmt: skip
    assert list(table["layer"]) == sorted(every, key=lambda k: -every[k])[: len(table["layer"])]
    assert table["grad_jump"][0] > 10  # the x30 inputs make the first layer's gradient jump


def _robust_z(history: list[float], x: float) -> float:
    logs = np.log(np.array(history))
    med = np.median(logs)
    return (np.log(x) - med) / max(1.4826 * np.median(np.abs(logs - med)), 0.05)


def test_precursor_score_against_the_loops_norms_and_rises_at_the_spike(runs):
    for inject in (True, False):
        log, h = runs[inject]
        score = values(h, "stability/score")
        g = [math.sqrt(sum(v * v for v in d.values())) for d in log["grad"]]
        u = [max(log["update"][s][k] / log["param"][s][k] for k in log["param"][s]) for s in range(STEPS)]
        for step in (8, 60, SPIKE - 1, SPIKE, STEPS - 1):
            lo = max(0, step - 32)
            want = max(_robust_z(g[lo:step], g[step]), _robust_z(u[lo:step], u[step]))
            np.testing.assert_allclose(score[step], want, rtol=1e-5)
        assert all(math.isnan(score[s]) for s in range(8))
    clean = values(runs[False][1], "stability/score")
    spiky = values(runs[True][1], "stability/score")
    assert spiky[SPIKE] > 3 and spiky[SPIKE] > max(v for s, v in clean.items() if s >= 8)


def test_verdict_and_summary(runs):
    log, h = runs[True]
    (monitor,) = log["monitors"]
    (verdict,) = monitor.verdicts()
    assert verdict.startswith(f"loss spike at step {SPIKE}") and "1797" in verdict and "0.weight" in verdict
    assert h["verdict/stability"][-1][1] == verdict
    (clean,) = runs[False][0]["monitors"][0].verdicts()
    assert clean.startswith(
        f"no loss spike in {STEPS} tracked steps (rule: loss > mean + 6 sigma of the last 128 steps)"
    )
    clean_scores = values(runs[False][1], "stability/score")
    alarms = [s for s, v in clean_scores.items() if v > 3][-10:]
    assert (
        ("precursor score exceeded 3 at step(s) " + ", ".join(map(str, alarms))) in clean
        if alarms
        else clean.endswith(")")
    )


def test_resume_continues_as_if_never_interrupted(runs):
    log, _ = train(True, lambda: StabilityMonitor(top_k=8), split=140)
    resumed, full = log["history"], runs[True][1]
    for tag in ("stability/spike", "stability/loss_z", "stability/threshold", "stability/score"):
        got = values(resumed, tag)
        want = values(full, tag)
        assert sorted(got) == list(range(140, STEPS))
        np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-12)
    assert resumed["stability/layers"][0][1]["layer"].tolist() == full["stability/layers"][0][1]["layer"].tolist()


def test_adam_eps_share_against_a_float64_adam_recurrence():
    """Spike at the last step (so the optimizer state after training is the spike step's); v is rebuilt
    from the loop's gradients: v_t = beta2 v_{t-1} + (1 - beta2) g_t^2, v_hat = v / (1 - beta2^t)."""
    steps, spike = 48, 47
    log, opt = train(True, lambda: StabilityMonitor(window=32), steps=steps, spike=spike, adam=True)
    h = log["history"]
    assert [s for s, v in h["stability/spike"] if v == 1.0] == [spike]
    ((step, table),) = h["stability/adam"]
    assert step == spike
    beta2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
    shares = dict(zip(table["layer"], table["eps_share"], strict=True))
    assert set(shares) == set(log["grads"][0])
    for name in shares:
        v = torch.zeros_like(log["grads"][0][name])
        for g in log["grads"]:
            v = beta2 * v + (1 - beta2) * g[name] ** 2
        root = (v / (1 - beta2**steps)).sqrt()
        below = (root < eps).double()
        assert abs(shares[name] - below.mean().item()) <= 1.0 / below.numel()
    assert shares["0.weight"] > 0  # the digits' always-blank pixels: zero gradients, eps-limited
    assert "eps-limited" in h["stability/attribution"][0][1]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("rule", ["megatron", "olmo", "either"])
def test_megatron_rule_on_a_scaled_loss(rule):
    """|L| >= 10 x the largest of the first 10 losses: the step whose loss the loop multiplies by 50."""
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.MSELoss()
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    monitor = StabilityMonitor(rule=rule, megatron_samples=10, window=16, per_sample=False)
    losses = []
    with Cockpit(model, opt, loss_fn, instruments=[monitor]) as cockpit:
        for step in range(30):
            opt.zero_grad()
            xb, yb = x[step % 4 * 16 : step % 4 * 16 + 16], y[step % 4 * 16 : step % 4 * 16 + 16]
            out = model(xb)
            loss = loss_fn(out, yb)
            if step == 25:
                loss = loss * 50
                at_spike = (out - yb).pow(2).detach().double().squeeze(1).numpy()
            loss.backward()
            losses.append(loss.item())
            opt.step()
    flagged = [s for s, v in cockpit.history["stability/spike"] if v == 1.0]
    assert max(losses[25:]) == losses[25] >= 10 * max(losses[:10])
    if rule == "olmo":  # the window of 16 is full from step 16 on: OLMo's rule sees the same step
        window = np.array(losses[9:25])
        assert (losses[25] > window.mean() + 6 * window.std()) == (flagged == [25])
    else:
        assert flagged == [25]
        text = cockpit.history["stability/attribution"][0][1]
        if rule == "megatron":
            assert "the largest of the first 10 tracked losses" in text
        # no cockpit.track(): examples by position in the batch; the note says why, once
        ((_, table),) = cockpit.history["stability/examples/by_loss"]
        assert "index" not in table and "batch positions" in text
        np.testing.assert_array_equal(table["position"], np.argsort(-at_spike, kind="stable")[:5])
        np.testing.assert_allclose(table["loss"], at_spike[table["position"].astype(int)], rtol=1e-6)
        notes = cockpit.history["note/stability"]
        assert [s for s, t in notes if "cockpit.track" in t] == [0]
        # the loss check's window (16 losses) and the score (8 steps) warm up: a note on each such step
        warm = [(s, t) for s, t in notes if "warm-up" in t]
        assert [s for s, _ in warm] == list(range(16))
        assert all("precursor score" in t for s, t in warm if s < 8) and not any("precursor" in t for s, t in warm[8:])
        assert all(math.isnan(v) for _, v in cockpit.history["stability/loss_z"][:16])
        assert math.isfinite(cockpit.history["stability/loss_z"][16][1])


def test_settings_are_checked():
    with pytest.raises(ValueError, match="rule"):
        StabilityMonitor(rule="zscore")
    with pytest.raises(ValueError, match="warmup"):
        StabilityMonitor(window=8, warmup=16)
    with pytest.raises(ValueError, match="window"):
        StabilityMonitor(window=0)


def test_dashboard_panels_charts_and_summary(runs):
    """The declared panels draw this run (spike mark, attribution box, layer bars equal to the table), the
    TensorBoard layout holds the Stability charts, and the summary names the spike."""
    from cockpit_lite.figure import DashboardFigure
    from cockpit_lite.presentation import Presenter, summary_text

    log, h = runs[True]
    (monitor,) = log["monitors"]
    fig = DashboardFigure(instruments=[monitor])
    fig.update(h)
    spikes = fig.panel("stability")
    assert [m.get_xdata()[0] for m in spikes._marks] == [SPIKE]
    box = spikes._box.get_text()
    ((_, by_loss),) = h["stability/examples/by_loss"]
    top = ", ".join(str(int(i)) for i in by_loss["index"][:4])
    assert box.startswith(f"1 spike(s); latest at step {SPIKE}\ntop losses: examples {top}\n0.weight: grad norm")
    assert not spikes._note.get_visible()
    layers = fig.panel("stability_layers")
    ((_, table),) = h["stability/layers"]
    np.testing.assert_allclose([b.get_width() for b in layers._bars[0]], table["grad_jump"])
    score = fig.panel("stability_score")
    np.testing.assert_array_equal(score._lines["stability/score"].get_ydata(), h.values("stability/score"))
    charts = Presenter([monitor])(h).charts
    assert charts["Stability"]["loss spikes (1 = spike)"] == ["Multiline", ["^stability/spike$"]]
    text = summary_text(h, instruments=[monitor])
    assert f"loss spikes: 1 (steps {SPIKE})" in text and f"latest (step {SPIKE}): loss spike at step {SPIKE}" in text
