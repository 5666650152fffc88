"""Train-mode BatchNorm through the Cockpit: the per-sample provider switches to the coupled path.
Reference: the float64 per-example gradients d l_i / d theta on the whole batch (train-mode BatchNorm,
one autograd call per example, retain_graph)."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from cockpit_lite.instruments import GradientTests, Loss
from torch import nn

from cockpit_lite import Cockpit, Need
from cockpit_lite.providers.persample import NORMS_EVERY
from tests.reference import Probe


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )


def _reference(model, x, y):
    m = copy.deepcopy(model).double().train()
    params = [p for p in m.parameters() if p.requires_grad]
    losses = nn.functional.cross_entropy(m(x.double()), y, reduction="none")
    rows = []
    for i in range(len(y)):
        gs = torch.autograd.grad(losses[i], params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows).cpu().numpy()


def test_train_mode_batchnorm_through_the_cockpit(device):
    model = _model().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    flags = {Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_DOT_MEAN, Need.UPDATE}
    probe = Probe(flags=flags, directions={"update": lambda rec: rec.update})
    batches = [(torch.randn(6, 2, 6, 6), torch.randint(0, 3, (6,))) for _ in range(NORMS_EVERY + 1)]
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    refs = []
    with Cockpit(model, opt, instruments=[probe, GradientTests(), Loss()]) as ck:
        for x, y in batches:
            refs.append(_reference(model, x, y))
            before = [p.detach().clone() for p in model.parameters()]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            refs[-1] = (
                refs[-1],
                np.concatenate(
                    [
                        (p.detach() - b).reshape(-1).cpu().numpy()
                        for p, b in zip(model.parameters(), before, strict=True)
                    ]
                ),
            )
    for step, (rec, (G, d)) in enumerate(zip(probe.records, refs, strict=True)):
        np.testing.assert_allclose(rec.per_sample_dot_mean, G @ G.mean(0), rtol=1e-4, atol=1e-8)
        np.testing.assert_allclose(rec.projections["update"], G @ d, rtol=1e-4, atol=1e-8)
        if step % NORMS_EVERY == 0:
            np.testing.assert_allclose(rec.per_sample_sq_norms, (G**2).sum(1), rtol=1e-4)
        else:
            assert rec.per_sample_sq_norms is None
    assert "every 10th tracked step" in dict(ck.history["note/gradient_tests"])[1]
    assert math.isfinite(dict(ck.history["tests/norm"])[0])
    # training is unchanged: parameters and BatchNorm's running statistics bit-identical to a plain run
    plain = _model().to(device)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    for x, y in batches:
        plain_opt.zero_grad()
        nn.functional.cross_entropy(plain(x), y).backward()
        plain_opt.step()
    for a, b in zip(model.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_under_a_budget_squared_norms_come_on_every_step_they_are_asked():
    """The coupled path thins its squared norms (B backward passes) to every 10th step by itself; under an
    overhead budget the budget alone chooses the steps, from what it measured them to cost, so the path
    computes them whenever asked (else the budget's warm-up would time a step without them and run them
    every step as cheap). Checked against the float64 loop on consecutive steps."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = Probe(flags={Need.PER_SAMPLE_SQ_NORMS})
    batches = [(torch.randn(6, 2, 6, 6), torch.randint(0, 3, (6,))) for _ in range(4)]
    refs = []
    with Cockpit(model, opt, instruments=[probe], sinks=[], budget=0.5) as ck:
        for x, y in batches:
            refs.append(_reference(model, x, y))
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    # the warm-up: step 0 runs every instrument, step 1 only follow-ups, step 2 the probe's first round
    assert [rec.step for rec in probe.records] == [0, 2]
    for rec in probe.records:  # (without the budget: norms on step 0 only, a note on step 2)
        G = refs[rec.step]
        np.testing.assert_allclose(rec.per_sample_sq_norms, (G**2).sum(1), rtol=1e-4)
    assert not any("every 10th" in str(v) for _, v in ck.history.get("note/probe", []))
