"""The parameters a run trains may change mid-run: a frozen backbone unfrozen after a few steps (transfer
learning, ULMFiT's gradual unfreezing, fastai's ``fine_tune``), a layer frozen, a parameter group added to the
optimizer. From the first step after the change every statistic covers the new set: the gradient norm, the
update, the distance from the initial parameters (a tensor that starts training measured from its value then:
where it was all along), and the per-sample gradient norms, against direct computation and a float64 loop over
examples (one autograd call each). The step of the change carries a note; a warning says it once.

Before: the cockpit kept the set it was built with: after unfreezing, the gradient norm and the per-sample norms
left the unfrozen layer out while the coverage said 1.0, with no word."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cockpit_lite.instruments import Distance, GradNorm, PerSampleGradNorms, UpdateSize
from torch import nn

from cockpit_lite import Cockpit

B, STEPS, CHANGE = 5, 4, 2


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


@pytest.mark.parametrize("change", ["unfreeze", "freeze", "add_group"])
def test_the_trained_set_is_followed_from_the_step_it_changes(change):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    body, head = list(model[0].parameters()), list(model[2].parameters())
    if change == "unfreeze":
        for p in body:
            p.requires_grad_(False)
    opt = torch.optim.SGD(head if change == "add_group" else model.parameters(), lr=0.1, momentum=0.9)
    if change == "add_group":
        for p in body:
            p.requires_grad_(False)  # (not trained before its group is added)
    lf = nn.CrossEntropyLoss()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    expected, trained_at = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cockpit = Cockpit(
            model, opt, lf, instruments=[GradNorm(), PerSampleGradNorms(), UpdateSize(), Distance()], sinks=[]
        )
        for step in range(STEPS):
            if step == CHANGE:
                if change == "unfreeze":
                    for p in body:
                        p.requires_grad_(True)
                elif change == "freeze":
                    for p in body:
                        p.requires_grad_(False)
                else:
                    for p in body:
                        p.requires_grad_(True)
                    opt.add_param_group({"params": body, "lr": 0.01})
            trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            trained_at.append([n for n, _ in trained])
            x = torch.randn(B, 4, generator=g, dtype=torch.float64)
            y = torch.randint(0, 3, (B,), generator=g)
            copied = copy.deepcopy(model)
            ps = [p for n, p in copied.named_parameters() if p.requires_grad]
            rows = np.stack(
                [
                    _flat(torch.autograd.grad(F.cross_entropy(copied(x[i : i + 1]), y[i : i + 1]), ps)).numpy()
                    for i in range(B)
                ]
            )
            start = {n: p.detach().clone() for n, p in trained}
            opt.zero_grad()
            lf(model(x), y).backward()
            opt.step()
            expected.append(
                {
                    "norms": np.linalg.norm(rows, axis=1),
                    "grad_norm": np.linalg.norm(rows.mean(0)),
                    "update": float(_flat(p - start[n] for n, p in trained).norm()),
                    # theta_t - theta_0 at the step's start (a tensor that starts training: from its value then,
                    # which is theta_0 for a tensor frozen until then)
                    "distance": float(_flat(start[n] - theta0[n] for n, _ in trained).norm()),
                }
            )
        cockpit.close()
    h = cockpit.history
    for step, want in enumerate(expected):
        np.testing.assert_allclose(h.value_at("persample/grad_norm", step), want["norms"], rtol=1e-10)
        assert h.value_at("grad_norm", step) == pytest.approx(want["grad_norm"], rel=1e-10)
        assert h.value_at("update_size", step) == pytest.approx(want["update"], rel=1e-10)
        assert h.value_at("distance", step) == pytest.approx(want["distance"], rel=1e-10, abs=1e-15)
        assert h.value_at("persample/coverage", step) == pytest.approx(1.0)
        per_tensor = sorted(
            t.removeprefix("grad_norm/") for t in h if t.startswith("grad_norm/") and h.value_at(t, step)
        )
        assert per_tensor == sorted(trained_at[step])
    said = [str(w.message) for w in caught if "the parameters the optimizer trains changed" in str(w.message)]
    assert len(said) == 1 and f"changed at step {CHANGE}" in said[0]
    assert (
        "start training (0.weight, 0.bias)" in said[0]
        if change != "freeze"
        else "stopped (0.weight, 0.bias)" in said[0]
    )
    notes = [s for s, v in h["note/grad_norm"]] if "note/grad_norm" in h else []
    assert notes == [CHANGE]
