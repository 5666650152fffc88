"""The "param_norms" provider (the worked example of docs/design.md): ||theta_t|| per tensor, before
the step, against a direct computation; and no work on steps where nobody asks for it."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from cockpit_lite import Cockpit, Instrument
from cockpit_lite.providers.param_norms import PARAM_NORMS, ParamNormsProvider
from tests import models


class UpdateRatio(Instrument):
    """||theta_{t+1} - theta_t|| / ||theta_t|| per tensor: reads the new need and the update."""

    NEEDS = frozenset({PARAM_NORMS, "update"})

    def compute(self, record):
        before = record.get(PARAM_NORMS)
        return {f"ratio/{n}": record.update_norms[n] / before[n] for n in before}


def test_param_norms_before_the_step_and_only_when_asked(monkeypatch):
    torch.manual_seed(0)
    model, loss_fn = models.mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    calls = []
    original = ParamNormsProvider.on_before_step
    monkeypatch.setattr(
        ParamNormsProvider, "on_before_step", lambda self, rec: (calls.append(rec.step), original(self, rec))
    )
    thetas = []
    with Cockpit(model, opt, loss_fn, instruments=[UpdateRatio(every=2)]) as ck:
        for _ in range(4):
            x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            thetas.append(copy.deepcopy(dict(model.named_parameters())))
            opt.step()
    assert calls == [0, 2]  # a need nobody asked for at steps 1 and 3 cost nothing
    after = dict(model.named_parameters())
    for name in after:
        for step in (0, 2):
            theta = thetas[step][name].detach().double()
            nxt = (thetas[step + 1][name] if step + 1 < 4 else after[name]).detach().double()
            expected = float((nxt - theta).norm() / theta.norm())
            got = dict(ck.history[f"ratio/{name}"])[step]
            np.testing.assert_allclose(got, expected, rtol=1e-5)
