"""Independent references: per-sample gradients by a float64 loop with one autograd call per sample."""

from __future__ import annotations

import copy

import numpy as np
import torch

from cockpit_lite import Instrument, Need, Needs


def per_sample_grads_loop(model, loss_fn, x, y, names=None) -> dict[str, np.ndarray]:
    """{name: (B, *shape)} float64 gradients of l_i = loss_fn(model(x_i), y_i) (a batch of one), computed
    on the model's device (x, y on it too) and returned on the CPU."""
    m = copy.deepcopy(model).double()
    lf = copy.deepcopy(loss_fn).double()
    params = {n: p for n, p in m.named_parameters() if p.requires_grad and (names is None or n in names)}
    out = {n: [] for n in params}
    for i in range(len(y)):
        xi = x[i : i + 1].double() if torch.is_floating_point(x) else x[i : i + 1]
        yi = y[i : i + 1].double() if torch.is_floating_point(y) else y[i : i + 1]
        li = lf(m(xi), yi)
        gs = torch.autograd.grad(li, list(params.values()), allow_unused=True)
        for n, g, p in zip(params, gs, params.values(), strict=True):
            out[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(v).cpu().numpy() for n, v in out.items()}


def flat(grads: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([g.reshape(g.shape[0], -1) for g in grads.values()], axis=1)


class Probe(Instrument):
    """Test instrument: asks for every per-sample need and keeps the step records."""

    def __init__(self, directions=None, flags=None, early=(), **kw):
        super().__init__(**kw)
        self.flags = flags or {
            Need.LOSS,
            Need.PER_SAMPLE_LOSS,
            Need.GRAD_NORMS,
            Need.UPDATE,
            Need.PER_SAMPLE_SQ_NORMS,
            Need.PER_SAMPLE_SQ_NORMS_BY_PARAM,
            Need.PER_SAMPLE_DOT_MEAN,
            Need.PER_SAMPLE_GRAM_BY_PARAM,
        }
        self.directions = directions or {}
        self.early = set(early)  # keys of directions known before the step (Needs.early)
        self.records = []
        self.grads_before_step = []

    def requires(self, step):
        if not self.scheduled(step):
            return Needs()
        return Needs(set(self.flags), dict(self.directions), self.early & set(self.directions))

    def on_before_step(self, record):
        self.grads_before_step.append(
            {n: p.grad.detach().clone() for n, p in record.params.items() if p.grad is not None}
        )

    def compute(self, record):
        self.records.append(record)
        return {}


def assert_accumulated_views_match_loop(model, x, y, sizes, rtol: float = 1e-5) -> list:
    """One optimizer step over micro-batches of ``sizes`` (in order; the mean loss of the whole batch) with
    the views asked for (``Need.PER_SAMPLE_CROSS``): every parameter's Gram and squared norms from the
    step's views equal the float64 loop's over all the examples. Returns the views (``record.views``)."""
    from cockpit_lite import Cockpit

    class Views(Probe):
        def on_before_step(self, record):
            super().on_before_step(record)
            self.views = record.views
            self.gram = {n: g.double().cpu().numpy() for v in record.views for n, g in v.gram().items()}
            self.sq = {n: s.double().cpu().numpy() for v in record.views for n, s in v.sq_norms().items()}

    n = len(y)
    probe = Views(flags={Need.PER_SAMPLE_CROSS})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    theta = copy.deepcopy(model)
    cuts = np.cumsum([0, *sizes])
    with Cockpit(model, opt, instruments=[probe]):
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            (torch.nn.functional.cross_entropy(model(x[a:b]), y[a:b]) * (b - a) / n).backward()
        opt.step()
    ref = per_sample_grads_loop(theta, torch.nn.CrossEntropyLoss(), x, y)
    assert set(probe.gram) == set(ref)
    for name, g in ref.items():
        g = g.reshape(n, -1)
        np.testing.assert_allclose(probe.gram[name], g @ g.T, rtol=rtol, atol=1e-9)
        np.testing.assert_allclose(probe.sq[name], (g**2).sum(1), rtol=rtol, atol=1e-9)
    return probe.views
