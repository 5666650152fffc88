"""Clipping statistics and the AGC clipper versus independent computations.

References: a per-unit Python loop for AGC (bit for bit), gradients recomputed on a model copy (raw,
before any clipping), and float64 per-sample gradients from a loop with one autograd call per sample.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import warnings

import numpy as np
import pytest
import torch
from cockpit_lite.instruments import Clipping, agc
from torch import nn

from cockpit_lite import Cockpit
from tests.reference import flat, per_sample_grads_loop

RTOL = 2e-4


# --- models and helpers -------------------------------------------------------------------------------
class Gain(nn.Module):
    """A 1-D gain (and offset) as in NFNets' scaled activations: y = x * gain + offset."""

    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.offset = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return x * self.gain + self.offset


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.gain = Gain(4 * 6 * 6)
        self.fc = nn.Linear(4 * 6 * 6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.tanh(self.fc(self.gain(h))))


def conv_batch(b=6, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, 8, 8, generator=g).to(device), torch.randint(0, 3, (b,), generator=g).to(device)


def small_cnn():
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4))


def mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))


def mlp_batch(b=8, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 5, generator=g) * 2).to(device), torch.randint(0, 3, (b,), generator=g).to(device)


def raw_grads(model, loss_fn, x, y) -> dict[str, torch.Tensor]:
    """The mini-batch gradient from a separate backward on a copy of the model."""
    m = copy.deepcopy(model)
    m.zero_grad()
    loss_fn(m(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


def last(cockpit, tag):
    return cockpit.history.last(tag)


def at(cockpit, step):
    return {tag: v for tag in cockpit.history for s, v in cockpit.history[tag] if s == step}


# --- the AGC clipper, bit for bit ---------------------------------------------------------------------
def loop_agc(weights: dict, grads: dict, clip: float, eps: float) -> dict:
    """Independent AGC: a Python loop over units; 1-D tensors are one unit."""
    out = {}
    for name, g in grads.items():
        w = weights[name]
        new = g.clone()
        units = [(slice(None),)] if g.ndim <= 1 else [(i,) for i in range(g.shape[0])]
        for idx in units:
            w_norm, g_norm = w[idx].norm(2), g[idx].norm(2)
            max_norm = torch.clamp(w_norm, min=eps) * clip
            if not bool(g_norm < max_norm):
                new[idx] = g[idx] * (max_norm / torch.clamp(g_norm, min=1e-6))
        out[name] = new
    return out


def _agc_setup(seed=0):
    torch.manual_seed(seed)
    model = ConvNet()
    with torch.no_grad():
        model.conv.weight[1].zero_()  # a unit floored at eps
        model.fc.weight[2] *= 1e-4  # a small unit: clipped hard
    x, y = conv_batch(8, seed)
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(model(x) * 5, y).backward()
    return model


@pytest.mark.parametrize("clip", [0.01, 0.05, 0.5])
def test_agc_clip_matches_unit_loop_bit_for_bit(clip):
    model = _agc_setup()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    expected = loop_agc(weights, grads, clip, 1e-3)
    agc.clip_(model.parameters(), clip=clip)
    changed = 0
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, expected[n]), n  # Linear, Conv2d, biases, 1-D gains
        changed += int(not torch.equal(p.grad, grads[n]))
        assert torch.equal(p.detach(), weights[n])
    assert changed > 0  # the test clips something


def test_agc_clip_excludes_final_layer_and_skips_missing_grads():
    model = _agc_setup()
    model.gain.offset.grad = None  # a parameter without gradient
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = loop_agc(weights, grads, 0.01, 1e-3)
    assert agc.final_layer(model) == ["head.weight", "head.bias"]
    agc.clip_(model, clip=0.01, exclude="final")
    for n, p in model.named_parameters():
        if n.startswith("head."):
            assert torch.equal(p.grad, grads[n]), n
        elif p.grad is not None:
            assert torch.equal(p.grad, expected[n]), n
    assert model.gain.offset.grad is None
    # the same with (name, parameter) pairs and explicit names
    model2 = _agc_setup()
    model2.gain.offset.grad = None
    agc.clip_(model2.named_parameters(), clip=0.01, exclude=["head.weight", "head.bias"])
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters(), strict=True):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad), n


def _timm_adaptive_clip_grad():
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed (it is not a dependency)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "utils", "agc.py")
    mod_spec = importlib.util.spec_from_file_location("_timm_agc", path)  # no import of timm's model zoo
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.adaptive_clip_grad


def test_agc_clip_matches_timm_if_installed():
    adaptive_clip_grad = _timm_adaptive_clip_grad()
    for clip in (0.01, 0.1):
        a, b = _agc_setup(1), _agc_setup(1)
        agc.clip_(a.parameters(), clip=clip)
        adaptive_clip_grad(b.parameters(), clip_factor=clip)
        for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
            assert torch.equal(p.grad, q.grad), n


# --- AGC statistics -----------------------------------------------------------------------------------
def unit_ratios(weights, grads, eps):
    """{name: (w_norms, g_norms)} in float64 by a loop over units."""
    out = {}
    for n, g in grads.items():
        w = weights[n].double()
        g = g.double()
        units = [g] if g.ndim <= 1 else [g[i] for i in range(g.shape[0])]
        wunits = [w] if w.ndim <= 1 else [w[i] for i in range(w.shape[0])]
        out[n] = (np.array([float(u.norm()) for u in wunits]), np.array([float(u.norm()) for u in units]))
    return out


def _expected_unit_stats(wn, gn, lam, eps):
    ws = np.maximum(wn, eps)
    r = gn / ws
    clipped = r >= lam
    scale = np.where(clipped, lam * ws / np.maximum(gn, 1e-6), 1.0)
    return r, clipped, scale, wn < eps


@pytest.mark.parametrize("exclude", ["final", ()])
def test_agc_statistics_match_unit_loop_on_raw_gradients(device, exclude):
    torch.manual_seed(0)
    model = ConvNet().to(device)
    with torch.no_grad():
        model.conv.weight[1].zero_()
    loss_fn = nn.CrossEntropyLoss()
    x, y = conv_batch(8, device=device)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = raw_grads(model, loss_fn, x, y)
    units = unit_ratios(weights, grads, 1e-3)
    excluded = {"head.weight", "head.bias"} if exclude == "final" else set()
    kept = [n for n in grads if n not in excluded]
    all_r = np.concatenate([units[n][1] / np.maximum(units[n][0], 1e-3) for n in kept])
    s = np.sort(all_r)
    k = int(0.6 * len(s))
    lam = float((s[k - 1] + s[k]) / 2)  # clips 40% of the units, midway between two ratios (no ties)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clip = Clipping(agc_clip=lam, kinds=("agc",), agc_exclude=exclude)
    with Cockpit(model, opt, loss_fn, instruments=[clip]) as cp:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        agc.clip_(model.parameters(), clip=lam)  # the user clips: statistics are still the raw ones
        opt.step()
    all_w = np.concatenate([units[n][0] for n in kept])
    all_g = np.concatenate([units[n][1] for n in kept])
    for prefix, wn, gn in [("clip/agc", all_w, all_g)] + [(f"clip/agc/{n}", *units[n]) for n in kept]:
        r, clipped, scale, floored = _expected_unit_stats(wn, gn, lam, 1e-3)
        assert last(cp, f"{prefix}/frac_clipped") == pytest.approx(clipped.mean()), prefix
        assert last(cp, f"{prefix}/min_scale") == pytest.approx(scale.min(), rel=RTOL), prefix
        assert last(cp, f"{prefix}/floored") == floored.sum(), prefix
        for k, q in {"p5": 0.05, "p50": 0.5, "p95": 0.95}.items():
            assert last(cp, f"{prefix}/ratio/{k}") == pytest.approx(np.quantile(r, q), rel=RTOL), prefix
        assert last(cp, f"{prefix}/ratio/max") == pytest.approx(r.max(), rel=RTOL), prefix
        if prefix == "clip/agc":
            assert last(cp, f"{prefix}/units") == len(wn)
            assert last(cp, f"{prefix}/frac_floored") == pytest.approx(floored.mean()), prefix
            for k, q in {"p25": 0.25, "p75": 0.75}.items():
                assert last(cp, f"{prefix}/ratio/{k}") == pytest.approx(np.quantile(r, q), rel=RTOL), prefix
            assert last(cp, f"{prefix}/ratio/mean") == pytest.approx(r.mean(), rel=RTOL), prefix
    assert last(cp, "clip/agc/floored") == 2  # the zeroed conv filter and the zero-initialised offset
    assert 0 < last(cp, "clip/agc/frac_clipped") < 1
    for n in excluded:
        assert f"clip/agc/{n}/floored" not in cp.history
    assert last(cp, "clip/suggest/agc/p50") == pytest.approx(
        np.quantile(all_g / np.maximum(all_w, 1e-3), 0.5), rel=RTOL
    )


# --- global -------------------------------------------------------------------------------------------
def test_global_statistics_pre_clip_received_and_rolling_fraction(device):
    torch.manual_seed(0)
    model = mlp().to(device)
    loss_fn = nn.CrossEntropyLoss()
    batches = [mlp_batch(8, seed=s, device=device) for s in range(6)]
    # raw norms along the trajectory, by an independent run with the same user clipping
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    pre, received = [], []
    for x, y in batches:
        ref_opt.zero_grad()
        loss_fn(ref(x), y).backward()
        pre.append(math.sqrt(sum(float(p.grad.double().square().sum()) for p in ref.parameters())))
        torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm=0.3)
        received.append(math.sqrt(sum(float(p.grad.double().square().sum()) for p in ref.parameters())))
        ref_opt.step()
    max_norm = float(np.median(pre))  # evaluate a threshold that clips about half of the steps
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    clip = Clipping(max_norm=max_norm, window=3, kinds=("global",))
    with Cockpit(model, opt, loss_fn, instruments=[clip]) as cp:
        for x, y in batches:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.3)  # the user really clips at 0.3
            opt.step()
    np.testing.assert_allclose(cp.history.values("clip/global/norm"), pre, rtol=RTOL)
    np.testing.assert_allclose(cp.history.values("clip/global/received_norm"), received, rtol=RTOL)
    np.testing.assert_allclose(cp.history.values("clip/global/received_ratio"), np.array(received) / pre, rtol=RTOL)
    assert max(received) <= 0.3 + 1e-5 < min(pre)  # the user's clipping is seen
    coef = np.minimum(1.0, max_norm / (np.array(pre) + 1e-6))
    np.testing.assert_allclose(cp.history.values("clip/global/coef"), coef, rtol=RTOL)
    would = (coef < 1).astype(float)
    assert cp.history.values("clip/global/would_clip") == list(would)
    rolling = [would[max(0, t - 2) : t + 1].mean() for t in range(len(pre))]
    np.testing.assert_allclose(cp.history.values("clip/global/frac_clipped"), rolling)
    sugg = [np.quantile(pre[max(0, t - 2) : t + 1], 0.9) for t in range(len(pre))]
    np.testing.assert_allclose(cp.history.values("clip/suggest/global/p90"), sugg, rtol=RTOL)
    assert set(cp.history.values("clip/global/would_clip")) == {0.0, 1.0}


def test_user_agc_between_backward_and_step_is_measured(device):
    torch.manual_seed(1)
    model = mlp().to(device)
    loss_fn = nn.CrossEntropyLoss()
    x, y = mlp_batch(8, device=device)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = raw_grads(model, loss_fn, x, y)
    clipped = loop_agc(weights, grads, 0.01, 1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Cockpit(model, opt, loss_fn, instruments=[Clipping(max_norm=1.0, agc_clip=0.01)]) as cp:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        agc.clip_(model.parameters(), clip=0.01)
        opt.step()
    norm = lambda gs: math.sqrt(sum(float(g.double().square().sum()) for g in gs.values()))  # noqa: E731
    assert last(cp, "clip/global/norm") == pytest.approx(norm(grads), rel=RTOL)
    assert last(cp, "clip/global/received_norm") == pytest.approx(norm(clipped), rel=RTOL)
    assert last(cp, "clip/global/received_norm") < 0.5 * last(cp, "clip/global/norm")
    # AGC statistics describe the gradient before the user's clip_: some units are over lambda
    assert last(cp, "clip/agc/frac_clipped") > 0


# --- per-sample ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, batch, reduction",
    [(mlp, mlp_batch, "mean"), (mlp, mlp_batch, "sum"), (small_cnn, conv_batch, "mean")],
)
def test_per_sample_statistics_match_float64_loop(device, make, batch, reduction):
    torch.manual_seed(0)
    model = make().to(device)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    batches = [batch(8, seed=s, device=device) for s in range(3)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    refs = []
    ref_model = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05)
    for x, y in batches:
        refs.append(flat(per_sample_grads_loop(ref_model, loss_fn, x, y)))
        ref_opt.zero_grad()
        loss_fn(ref_model(x), y).backward()
        ref_opt.step()
    norms0 = np.linalg.norm(refs[0], axis=1)
    c = float(np.median(norms0))
    with Cockpit(
        model, opt, loss_fn, instruments=[Clipping(per_sample_clip=c, kinds=("per_sample",), cosine_every=1)]
    ) as cp:
        for x, y in batches:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    levels = []
    for t, g in enumerate(refs):
        n = np.linalg.norm(g, axis=1)
        f = np.minimum(1.0, c / (n + 1e-6))
        clipped_mean, mean = (f[:, None] * g).mean(0), g.mean(0)
        cos = clipped_mean @ mean / (np.linalg.norm(clipped_mean) * np.linalg.norm(mean))
        vals = at(cp, t)
        assert vals["clip/per_sample/frac_clipped"] == pytest.approx(np.mean(n > c))
        assert vals["clip/per_sample/factor/min"] == pytest.approx(f.min(), rel=RTOL)
        assert vals["clip/per_sample/factor/p50"] == pytest.approx(np.quantile(f, 0.5), rel=RTOL)
        assert vals["clip/per_sample/factor/mean"] == pytest.approx(f.mean(), rel=RTOL)
        assert vals["clip/per_sample/cosine"] == pytest.approx(cos, rel=RTOL, abs=1e-6)
        ratio = np.linalg.norm(clipped_mean) / np.linalg.norm(mean)
        assert vals["clip/per_sample/norm_ratio"] == pytest.approx(ratio, rel=RTOL)
        levels.append(np.quantile(n, [0.5, 0.9]))
        med = np.median(np.stack(levels), axis=0)
        assert vals["clip/suggest/per_sample/p50"] == pytest.approx(med[0], rel=RTOL)
        assert vals["clip/suggest/per_sample/p90"] == pytest.approx(med[1], rel=RTOL)
    first = at(cp, 0)
    assert 0 < first["clip/per_sample/frac_clipped"] < 1 and first["clip/per_sample/cosine"] < 1 - 1e-6


# --- robustness ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"max_norm": 0.0}, "max_norm"),
        ({"max_norm": -1.0}, "max_norm"),
        ({"max_norm": float("nan")}, "max_norm"),
        ({"max_norm": float("inf")}, "max_norm"),
        ({"max_norm": "1"}, "max_norm"),
        ({"agc_clip": 0}, "agc_clip"),
        ({"agc_clip": float("nan")}, "agc_clip"),
        ({"agc_eps": -1e-3}, "agc_eps"),
        ({"per_sample_clip": -5.0}, "per_sample_clip"),
        ({"per_sample_clip": float("nan")}, "per_sample_clip"),
        ({"window": 0}, "window"),
        ({"suggest": (0.5, 1.0)}, "suggest"),
        ({"kinds": ("global", "spectral")}, "kinds"),
        ({"kinds": ("global",), "agc_clip": 0.01}, "agc_clip"),
        ({"agc_exclude": "last"}, "agc_exclude"),
    ],
)
def test_nonsense_settings_raise_with_the_fix(kwargs, word):
    with pytest.raises(ValueError, match=word):
        Clipping(**kwargs)


@pytest.mark.parametrize("kwargs", [{"clip": 0.0}, {"clip": float("nan")}, {"clip": -0.01}, {"eps": 0.0}])
def test_agc_clip_rejects_nonsense(kwargs):
    model = _agc_setup()
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        agc.clip_(model.parameters(), **kwargs)
    with pytest.raises(ValueError, match="final"):
        agc.clip_(model.parameters(), exclude="final")  # needs names


def test_unknown_agc_exclude_names_raise_at_attach():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not parameters of the model"):
        Cockpit(model, opt, nn.CrossEntropyLoss(), instruments=[Clipping(agc_exclude=["head.weight"])])


class PartlyFrozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(5, 6)
        self.frozen.requires_grad_(False)
        self.used = nn.Linear(6, 3)
        self.unused = nn.Linear(6, 3)  # trainable, never called: no gradient

    def forward(self, x):
        return self.used(torch.relu(self.frozen(x)))


def test_parameters_without_gradients_are_skipped(device):
    torch.manual_seed(0)
    model = PartlyFrozen().to(device)
    loss_fn = nn.CrossEntropyLoss()
    x, y = mlp_batch(8, device=device)
    grads = raw_grads(model, loss_fn, x, y)
    assert set(grads) == {"used.weight", "used.bias"}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clip = Clipping(max_norm=1.0, agc_clip=0.01, per_sample_clip=1.0, agc_exclude=())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning, no crash
        with Cockpit(model, opt, loss_fn, instruments=[clip]) as cp:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            agc.clip_(model.parameters(), clip=0.01)
            opt.step()
    norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))
    assert last(cp, "clip/global/norm") == pytest.approx(norm, rel=RTOL)
    assert last(cp, "clip/agc/units") == 3 + 1  # the rows of used.weight and used.bias
    assert last(cp, "clip/agc/used.weight/floored") == 0
    assert not any("unused" in t or "frozen" in t for t in cp.history)
    ref = flat(per_sample_grads_loop(model, loss_fn, x, y, names={"used.weight", "used.bias"}))
    n = np.linalg.norm(ref, axis=1)
    assert last(cp, "clip/per_sample/frac_clipped") == pytest.approx(np.mean(n > 1.0))


def test_training_trajectory_unchanged(device):
    torch.manual_seed(0)
    model = ConvNet().to(device)
    twin = copy.deepcopy(model)
    loss_fn = nn.CrossEntropyLoss()
    batches = [conv_batch(6, seed=s, device=device) for s in range(4)]

    def train(m, instruments):
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        cp = Cockpit(m, opt, loss_fn, instruments=instruments) if instruments else None
        for x, y in batches:
            opt.zero_grad()
            loss_fn(m(x), y).backward()
            agc.clip_(m, clip=0.02, exclude="final")
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
        if cp is not None:
            cp.close()
            return cp

    train(twin, None)
    cp = train(model, [Clipping(max_norm=0.5, agc_clip=0.01, per_sample_clip=1.0)])
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert len(cp.history["clip/global/norm"]) == 4


def test_every_and_instance_name(device):
    torch.manual_seed(0)
    model = mlp().to(device)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clips = [
        Clipping(max_norm=1.0, per_sample_clip=1.0, every=2, cosine_every=4),
        Clipping(max_norm=0.1, name="tight", kinds=("global",)),
    ]
    with Cockpit(model, opt, loss_fn, instruments=clips) as cp:
        for s in range(9):
            x, y = mlp_batch(8, seed=s, device=device)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    assert list(cp.history.steps("clip/global/coef")) == [0, 2, 4, 6, 8]
    assert list(cp.history.steps("clip/per_sample/frac_clipped")) == [0, 2, 4, 6, 8]
    assert list(cp.history.steps("clip/per_sample/cosine")) == [0, 4, 8]  # the Gram only there
    assert list(cp.history.steps("tight/clip/global/coef")) == list(range(9))
    assert "tight/clip/agc/units" not in cp.history and "clip/agc/units" in cp.history


def test_sorted_quantiles_match_numpy():
    from cockpit_lite.instruments._util import sorted_quantiles

    rng = np.random.default_rng(0)
    levels = [0.0, 0.05, 0.5, 0.9, 1.0]
    for n in (1, 2, 7, 100):
        x = rng.standard_normal(n)
        np.testing.assert_allclose(sorted_quantiles(np.sort(x), levels), np.quantile(x, levels), rtol=1e-12)
        m = rng.standard_normal((n, 3))
        np.testing.assert_allclose(sorted_quantiles(np.sort(m, 0), [0.5]), np.quantile(m, [0.5], axis=0), rtol=1e-12)
    assert np.isnan(sorted_quantiles(np.sort(np.array([1.0, np.nan, 2.0])), [0.1])).all()


def test_quantile_records_match_numpy():
    from cockpit_lite.instruments._util import QUANTILES, quantile_records

    rng = np.random.default_rng(1)
    for n in (1, 2, 7, 128, 1000):
        x = rng.standard_normal(n).astype(np.float32)  # (float32 per-sample values, read as float64)
        got = quantile_records("q", x)
        ref = np.quantile(x.astype(np.float64), list(QUANTILES.values()))
        np.testing.assert_allclose([got[f"q/{k}"] for k in QUANTILES], ref, rtol=1e-12, atol=1e-15)
        assert got["q/max"] == float(np.max(x)) and got["q/mean"] == float(np.mean(x.astype(np.float64)))
        assert all(type(v) is float for v in got.values())
    with_nan = quantile_records("q", np.array([1.0, np.nan, 2.0]))
    assert len(with_nan) == len(QUANTILES) + 2 and all(np.isnan(v) for v in with_nan.values())
    assert quantile_records("q", np.array([])) == {}


@pytest.mark.parametrize("batch_steps", [1, 3])
def test_agc_records_per_step_whatever_the_batching(device, batch_steps):
    torch.manual_seed(0)
    model = mlp().to(device)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    clip = Clipping(agc_clip=0.05, window=4, batch_steps=batch_steps, kinds=("agc",))
    seen = []  # the user's own snapshot between backward and step: the independent reference
    with Cockpit(model, opt, loss_fn, instruments=[clip]) as cp:
        for s in range(7):
            x, y = mlp_batch(8, seed=s, device=device)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            names = ["0.weight", "0.bias", "2.weight", "2.bias"]  # the final layer "4." is excluded
            params = dict(model.named_parameters())
            seen.append(
                unit_ratios(
                    {n: params[n].detach().clone() for n in names}, {n: params[n].grad.clone() for n in names}, 1e-3
                )
            )
            opt.step()
    levels = []
    for t, units in enumerate(seen):
        wn = np.concatenate([u[0] for u in units.values()])
        gn = np.concatenate([u[1] for u in units.values()])
        r, clipped, scale, _ = _expected_unit_stats(wn, gn, 0.05, 1e-3)
        vals = at(cp, t)
        assert vals["clip/agc/frac_clipped"] == pytest.approx(clipped.mean())
        assert vals["clip/agc/ratio/p50"] == pytest.approx(np.quantile(r, 0.5), rel=RTOL)
        assert vals["clip/agc/2.weight/min_scale"] == pytest.approx(
            _expected_unit_stats(*units["2.weight"], 0.05, 1e-3)[2].min(), rel=RTOL
        )
        levels.append(np.quantile(r, [0.5, 0.9]))
        med = np.median(np.stack(levels[-4:]), axis=0)  # window of 4 steps
        assert vals["clip/suggest/agc/p50"] == pytest.approx(med[0], rel=RTOL)
        assert vals["clip/suggest/agc/p90"] == pytest.approx(med[1], rel=RTOL)
    assert list(cp.history.steps("clip/agc/frac_clipped")) == list(range(7))


def test_statistics_under_amp_loss_scaling_are_those_of_the_loss(device):
    """With scaler.scale(loss).backward(), p.grad after backward is the loss scale times the gradient:
    the clipping statistics must not see the scale."""
    from cockpit_lite.instruments import Clipping

    from cockpit_lite import Cockpit

    out = []
    for scale in (None, 1024.0):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss_fn = nn.CrossEntropyLoss()
        x, y = torch.randn(9, 6).to(device), torch.randint(0, 3, (9,)).to(device)
        clip = Clipping(max_norm=0.5, agc_clip=0.01, per_sample_clip=1.0, batch_steps=1, cosine_every=1)
        with Cockpit(model, opt, loss_fn, instruments=[clip]) as cockpit:
            opt.zero_grad()
            if scale is None:
                loss_fn(model(x), y).backward()
                opt.step()
            else:
                scaler = torch.amp.GradScaler(torch.device(device).type, init_scale=scale)
                scaler.scale(loss_fn(model(x), y)).backward()
                scaler.step(opt)
                scaler.update()
        out.append(cockpit.history)
    for tag in ("clip/global/norm", "clip/agc/ratio/p50", "clip/agc/ratio/max", "clip/per_sample/cosine"):
        np.testing.assert_allclose(out[1][tag][0][1], out[0][tag][0][1], rtol=1e-5, err_msg=tag)
