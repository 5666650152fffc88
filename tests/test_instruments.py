"""The first instruments against direct evaluations of their formulas (float64, independent code)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from cockpit_lite.instruments import Distance, GradientTests, GradNorm, Loss, PerSampleGradNorms, UpdateSize
from torch import nn

from cockpit_lite import Cockpit
from tests import models
from tests.reference import flat, per_sample_grads_loop


def _cockpit_tests_direct(G: np.ndarray) -> dict[str, float]:
    """Cockpit 1.0.2's definitions, evaluated literally from stacked per-sample gradients G (B x D)."""
    b = G.shape[0]
    gbar = G.mean(0)
    g2 = gbar @ gbar
    norm = np.sqrt(sum(np.sum((g - gbar) ** 2) for g in G) / (b * (b - 1) * g2))
    inner = np.sqrt(sum((g @ gbar - g2) ** 2 for g in G) / (b * (b - 1) * g2**2))
    ortho = np.sqrt(sum(np.sum((g - (g @ gbar) / g2 * gbar) ** 2) for g in G) / (b * (b - 1) * g2))
    return {"norm": norm, "inner": inner, "ortho": ortho}


def _run(model, loss_fn, batches, instruments, optim=None):
    opt = optim or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    states, refs = [], []
    with Cockpit(model, opt, loss_fn, instruments=instruments) as cockpit:
        for x, y in batches:
            states.append({n: p.detach().clone().double() for n, p in model.named_parameters()})
            refs.append(per_sample_grads_loop(model, loss_fn, x, y))
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    states.append({n: p.detach().clone().double() for n, p in model.named_parameters()})
    return cockpit.history, states, refs


def _batches(kind, n=3):
    torch.manual_seed(3)
    if kind == "cnn":
        return [models.cnn_batch(6) for _ in range(n)]
    return [(torch.randn(7, 6), torch.randint(0, 3, (7,))) for _ in range(n)]


def test_gradient_tests_match_cockpit_definitions_mlp_and_cnn():
    for kind, factory in (("mlp", models.mlp), ("cnn", models.GroupedCNN)):
        torch.manual_seed(0)
        model = factory()
        hist, _, refs = _run(model, nn.CrossEntropyLoss(), _batches(kind), [GradientTests()])
        for step, ref in enumerate(refs):
            direct = _cockpit_tests_direct(flat(ref))
            for k, v in direct.items():
                assert hist[f"tests/{k}"][step][0] == step
                np.testing.assert_allclose(hist[f"tests/{k}"][step][1], v, rtol=1e-4, err_msg=f"{kind} {k}")


def test_per_sample_norms_and_losses_match_loop():
    torch.manual_seed(0)
    model = models.GroupedCNN()
    loss_fn = nn.CrossEntropyLoss()
    batches = _batches("cnn")
    hist, states, refs = _run(model, loss_fn, batches, [PerSampleGradNorms(per_param=True), Loss()])
    for step, ((x, y), ref) in enumerate(zip(batches, refs, strict=True)):
        np.testing.assert_allclose(hist["persample/grad_norm"][step][1], np.linalg.norm(flat(ref), axis=1), rtol=1e-4)
        np.testing.assert_allclose(
            hist["persample/grad_norm/conv1.weight"][step][1],
            np.linalg.norm(ref["conv1.weight"].reshape(len(y), -1), axis=1),
            rtol=1e-4,
        )
        m = copy.deepcopy(model).double()
        m.load_state_dict(states[step])
        losses = np.array([loss_fn(m(x[i : i + 1].double()), y[i : i + 1]).item() for i in range(len(y))])
        np.testing.assert_allclose(hist["loss/per_sample"][step][1], losses, rtol=1e-5)
        np.testing.assert_allclose(hist["loss"][step][1], losses.mean(), rtol=1e-5)
        np.testing.assert_allclose(hist["loss/per_sample/p50"][step][1], np.median(losses), rtol=1e-5)


def test_gradnorm_update_size_distance_match_parameters():
    torch.manual_seed(0)
    model = models.mlp()
    batches = _batches("mlp")
    hist, states, refs = _run(model, nn.CrossEntropyLoss(), batches, [GradNorm(), UpdateSize(), Distance()])
    for step, ref in enumerate(refs):
        gbar = {n: g.mean(0) for n, g in ref.items()}
        np.testing.assert_allclose(
            hist["grad_norm"][step][1], np.sqrt(sum((g**2).sum() for g in gbar.values())), rtol=1e-4
        )
        np.testing.assert_allclose(hist["grad_norm/0.weight"][step][1], np.linalg.norm(gbar["0.weight"]), rtol=1e-4)
        upd = {n: states[step + 1][n] - states[step][n] for n in states[step]}
        np.testing.assert_allclose(
            hist["update_size"][step][1], np.sqrt(sum(float((d**2).sum()) for d in upd.values())), rtol=1e-5
        )
        np.testing.assert_allclose(hist["update_size/2.bias"][step][1], float(upd["2.bias"].norm()), rtol=1e-5)
        dist = {n: states[step][n] - states[0][n] for n in states[0]}
        np.testing.assert_allclose(
            hist["distance"][step][1], np.sqrt(sum(float((d**2).sum()) for d in dist.values())), atol=1e-6
        )


def test_inner_test_from_dot_products_alone():
    """The inner-product test needs only g_i . gbar: it is written on steps without squared norms,
    equal to the full computation's."""
    from cockpit_lite.instruments.gradient_tests import gradient_tests

    rng = np.random.default_rng(0)
    g = rng.normal(size=(8, 5))
    dots = g @ g.mean(0)
    full = gradient_tests((g**2).sum(1), dots)
    alone = gradient_tests(np.zeros(8), dots)
    assert alone["inner"] == full["inner"]
    gbar = g.mean(0)
    expected = np.sqrt(((dots - gbar @ gbar) ** 2).sum() / (8 * 7 * (gbar @ gbar) ** 2))
    np.testing.assert_allclose(full["inner"], expected, rtol=1e-12)


def test_gradient_tests_match_their_definitions_and_edge_cases():
    """The three tests against Cockpit's definitions evaluated on formed g_i (float64); NaN, never an
    error or a warning, for B = 1, gbar = 0 and NaN inputs."""
    import warnings

    from cockpit_lite.instruments.gradient_tests import gradient_tests, norm_test

    rng = np.random.default_rng(1)
    g = rng.normal(size=(16, 7)) + 0.3
    gbar = g.mean(0)
    g2, dots = gbar @ gbar, g @ gbar
    expected = _cockpit_tests_direct(g)
    got = gradient_tests((g**2).sum(1), dots)
    for k, v in expected.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-10, err_msg=k)
    sym = np.concatenate([g, -g])  # gbar = 0
    nan_dots = dots.copy()
    nan_dots[3] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cases = [
            gradient_tests((g[:1] ** 2).sum(1), g[:1] @ g[0]),  # B = 1
            gradient_tests((sym**2).sum(1), sym @ sym.mean(0)),
            gradient_tests((g**2).sum(1), nan_dots),
        ]
        cases.append({"norm": norm_test((sym**2).sum(1), 0.0)})
    for case in cases:
        assert all(np.isnan(v) for v in case.values()), case
    np.testing.assert_allclose(norm_test((g**2).sum(1), g2), expected["norm"], rtol=1e-10)


def test_gradient_tests_of_zero_gradients_are_nan_with_a_note():
    """Every gradient zero (the output scaled by 0): the tests divide by ||gbar||^2 = 0; NaN and a note,
    the other instruments unaffected."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3))
    model.register_forward_hook(lambda m, a, out: out * 0.0)
    hist, _, _ = _run(model, nn.CrossEntropyLoss(), _batches("mlp", 2), [GradientTests(), GradNorm()])
    for k in ("norm", "inner", "ortho"):
        assert [np.isnan(v) for _, v in hist[f"tests/{k}"]] == [True, True]
    assert "||gbar||^2 = 0: the tests divide by it and are undefined" in hist["note/gradient_tests"][0][1]
    assert [v for _, v in hist["grad_norm"]] == [0.0, 0.0]
