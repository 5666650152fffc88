"""benchmarks/floor.py's lean references compute the cockpit's numbers: for the MLP and the CNN
(and a small conv net whose layers take both conv routes) the per-sample squared norms ||g_i||^2,
g_i . gbar, the gradient tests, the gradient norm, the loss and its per-sample quantiles of one step
equal those of the float64 loop of tests/harness.py (one autograd call per example); the route each
conv layer takes is the cheaper by multiply-adds; and the timed comparison with the cockpit agrees."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from tests.bench_util import benchmark_module
from tests.harness import shares_loop


@pytest.fixture(scope="module")
def floor():
    yield from benchmark_module("floor")


def _small_conv() -> nn.Module:
    # conv 1 (stride 2, padding 1) on 8x8: T = 16 positions, formed; conv 2 on 2x2 with no padding: T = 1, ghost
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3),
    )  # fmt: skip


def _case(kind: str, floor):
    """(model, inputs, labels) in float64."""
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    if kind == "mlp":
        model, b, shape = floor.MODELS["mlp"][0](), 6, (784,)
    elif kind == "cnn":
        model, b, shape = floor.MODELS["cnn"][0](), 4, (3, 32, 32)
    else:
        model, b, shape = _small_conv(), 5, (3, 8, 8)
    x = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10 if kind != "small" else 3, (b,), generator=g)
    return model.double(), x, y


def _reference(model, x, y) -> dict:
    """Everything from the loop's per-sample gradients G (B x D) by the definitions."""
    names = [n for n, _ in model.named_parameters()]
    loss_fn = nn.CrossEntropyLoss()
    shares = shares_loop(model, x, y, loss_fn, names)
    b = len(y)
    g = np.concatenate([shares[n].reshape(b, -1) for n in names], 1)
    gbar = g.mean(0)
    g2 = gbar @ gbar
    dots = g @ gbar
    denom = b * (b - 1)
    resid = g - np.outer(dots / g2, gbar)  # g_i minus its projection onto gbar
    with torch.no_grad():
        losses = nn.functional.cross_entropy(model(x), y, reduction="none").numpy()
    return {
        "sq": (g**2).sum(1),
        "dot": dots,
        "tests/norm": np.sqrt(((g - gbar) ** 2).sum() / (denom * g2)),
        "tests/inner": np.sqrt(((dots - g2) ** 2).sum() / (denom * g2**2)),
        "tests/ortho": np.sqrt((resid**2).sum() / (denom * g2)),
        "grad_norm": np.sqrt(g2),
        "loss": losses.mean(),
        "quantiles": np.quantile(losses, [0.05, 0.25, 0.5, 0.75, 0.95]),
    }


def _lean_step(floor, model, x, y, route=None, kernel=None, linear=None):
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    lean = floor.LeanEconomy(model, opt, loss_fn, alpha=False, route=route, kernel=kernel, linear=linear)
    try:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    finally:
        lean.close()
    return lean


@pytest.mark.parametrize(
    "kind, route, kernel, linear",
    [
        ("mlp", None, None, None),
        ("mlp", None, None, "projection"),
        ("mlp", None, None, "gram"),
        ("cnn", None, None, None),
        ("cnn", None, "bmm", None),
        ("cnn", None, "conv", None),
        ("cnn", "ghost", None, "projection"),
        ("small", None, None, None),
        ("small", "formed", "bmm", None),
        ("small", "formed", "conv", None),
        ("small", "ghost", None, None),
    ],
)
def test_lean_economy_matches_the_float64_loop(floor, kind, route, kernel, linear):
    model, x, y = _case(kind, floor)
    ref = _reference(model, x, y)
    lean = _lean_step(floor, model, x, y, route, kernel, linear)
    np.testing.assert_allclose(lean.sq, ref["sq"], rtol=1e-10)
    np.testing.assert_allclose(lean.dot, ref["dot"], rtol=1e-9, atol=1e-12 * np.abs(ref["dot"]).max())
    for tag in ("tests/norm", "tests/inner", "tests/ortho", "grad_norm", "loss"):
        assert lean.last[tag] == pytest.approx(ref[tag], rel=1e-9), tag
    quantiles = [lean.last[f"loss/per_sample/q{q}"] for q in floor.QUANTILES]
    np.testing.assert_allclose(quantiles, ref["quantiles"], rtol=1e-12)
    # the routes: forced, or the cheaper by multiply-adds (the CNN's three layers: formed; T = 1: ghost)
    want = {"cnn": ["formed"] * 3, "small": ["formed", "ghost"], "mlp": []}[kind]
    got = [lean.routes[m] for m in model_convs(lean)]
    assert got == ([route] * len(want) if route else want)
    # each Linear layer: forced, or the cheaper by multiply-adds (at these batches of 4-6: the Grams' but for
    # the small net's 8 -> 6 and 6 -> 3 layers, whose products are the smaller)
    linears = [m for m in lean.lin if isinstance(m, nn.Linear)]
    cheaper = [
        "gram" if np.less(*floor.linear_costs(len(y), m.in_features, m.out_features)) else "projection" for m in linears
    ]
    assert [lean.routes[m] for m in linears] == ([linear] * len(linears) if linear else cheaper)
    if kind == "mlp" and linear is None:
        assert cheaper == ["gram", "gram", "gram"]
    if kernel is None:  # each formed layer timed its two kernels once and took one
        formed = [m for m in model_convs(lean) if lean.routes[m] == "formed"]
        assert set(lean.kernels) == set(formed)
        assert all(lean.kernels[m] in ("bmm", "conv") for m in formed)


def model_convs(lean) -> list[nn.Module]:
    return [m for m in lean.lin if isinstance(m, nn.Conv2d)]


def test_the_route_is_the_cheaper_count(floor):
    # formed T i o + 2 i o against ghost T^2 (i + o + 1) + T i o + T o, i = C_in k^2, o = C_out
    conv = nn.Conv2d(96, 128, 3, padding=1)  # the CNN's third layer on 8 x 8: i = 864, o = 128, T = 64
    assert floor.conv_costs(conv, 64) == (64 * 864 * 128 + 2 * 864 * 128, 64 * 64 * 993 + 64 * 864 * 128 + 64 * 128)
    small = nn.Conv2d(4, 8, 2)  # i = 16, o = 8
    formed, ghost = floor.conv_costs(small, 1)
    assert (formed, ghost) == (16 * 8 * 3, 25 + 16 * 8 + 8) and ghost < formed
    formed, ghost = floor.conv_costs(small, 4)
    assert (formed, ghost) == (4 * 128 + 2 * 128, 16 * 25 + 4 * 128 + 4 * 8) and ghost > formed


def test_the_linear_route_is_the_cheaper_count(floor):
    # the benchmark MLP at B = 128: Grams for 784 -> 512 and 512 -> 256, the product for 256 -> 10
    assert floor.linear_costs(128, 784, 512) == (128 * 128 * 1296, 128 * 784 * 512)
    routes = [np.less(*floor.linear_costs(128, i, o)) for i, o in ((784, 512), (512, 256), (256, 10))]
    assert routes == [True, True, False]


def test_alpha_and_unsupported_convs_are_refused(floor):
    opt_of = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    cnn = _small_conv()
    with pytest.raises(ValueError, match="Linear layers only"):
        floor.LeanEconomy(cnn, opt_of(cnn), nn.CrossEntropyLoss(), alpha=True)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten())
    with pytest.raises(ValueError, match="groups 1"):
        floor.LeanEconomy(grouped, opt_of(grouped), nn.CrossEntropyLoss(), alpha=False)


@pytest.mark.parametrize("model, batch", [("mlp", 16), ("cnn", 8)])
def test_timed_economy_agrees_with_the_cockpit(floor, model, batch):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        r = floor.economy("sgd", False, steps=2, reps=1, model=model, batch=batch)
    finally:
        torch.set_num_threads(threads)
    assert r["diff"] < 1e-4
    assert min(r["plain"], r["cockpit"], r["lean"]) > 0
    lo, hi = r["over_lean_iqr"]
    assert 0 < lo <= r["over_lean"] <= hi


def test_paired_ratio_is_taken_round_by_round(floor):
    # a slow round in both arms (the machine busy) leaves the paired ratio alone
    med, lo, hi = floor.paired_ratio([2.0, 20.0, 2.2, 2.1], [1.0, 10.0, 1.0, 1.0])
    assert med == pytest.approx(2.05) and lo == pytest.approx(2.0) and hi == pytest.approx(2.125)


def test_cli_runs_the_cnn_row(floor, monkeypatch, capsys):
    calls = []

    def fake(optim, with_alpha, steps, reps, model="mlp", batch=None):
        calls.append((optim, with_alpha, model))
        return {"plain": 1.0, "cockpit": 2.0, "lean": 1.5, "diff": 1e-8}

    monkeypatch.setattr(floor, "economy", fake)
    threads = torch.get_num_threads()
    try:
        rows = floor.main(["--parts", "economy-alpha,economy", "--optims", "sgd", "--models", "mlp,cnn"])
    finally:
        torch.set_num_threads(threads)
    # the CNN has a lean reference for economy minus Alpha only
    assert calls == [("sgd", False, "mlp"), ("sgd", False, "cnn"), ("sgd", True, "mlp")]
    assert [r["part"] for r in rows] == ["mlp sgd economy-alpha", "cnn sgd economy-alpha", "mlp sgd economy"]
    assert "cnn sgd economy-alpha" in capsys.readouterr().out
