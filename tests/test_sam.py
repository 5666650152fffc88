"""Sharpness-aware minimization (SAM, Foret et al. 2021, as the widely used davda54/sam implements it): each
step is a forward/backward at theta, an ascent to theta + e (``first_step``, gradients zeroed), a second
forward/backward there, then the base optimizer's step from theta with the second gradients
(``second_step``). The cockpit's step is the gradient the optimizer steps with: loss, per-sample losses and
gradients at theta + e, the update from theta. Checked against a float64 loop over examples (one autograd
call each) on a copy of the model at the perturbed point.

Before: given the SAM wrapper, the cockpit recorded nothing at all (its step() is not called by
first_step/second_step, the base optimizer's is) and said nothing; given the base optimizer, every step
reported an abandoned iteration (``skipped``: the first pass, whose gradients were zeroed without a step)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cockpit_lite.instruments import GradNorm, Loss, PerSampleGradNorms, UpdateSize
from torch import nn

from cockpit_lite import Cockpit, CockpitWarning
from cockpit_lite.cockpit import MOVED

B, STEPS = 5, 3


class SAM(torch.optim.Optimizer):
    """SAM as davda54/sam writes it: the wrapper shares its base optimizer's parameter groups."""

    def __init__(self, params, base_optimizer, rho=0.05, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grads = [p.grad.norm(p=2) for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.norm(torch.stack(grads), p=2)
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                p.add_(p.grad * scale.to(p))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        closure()
        self.second_step()


def _reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """At the model's current (perturbed) parameters: l_i and g_i per example, float64, one autograd call each."""
    model = copy.deepcopy(model)  # (no cockpit hook fires on the copy)
    losses, grads = [], []
    for i in range(len(x)):
        li = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads.append(torch.cat([t.reshape(-1) for t in torch.autograd.grad(li, list(model.parameters()))]).numpy())
        losses.append(float(li))
    grads = np.stack(grads)
    norms = np.linalg.norm(grads, axis=1)
    return {"losses": np.array(losses), "norms": norms, "grad_norm": np.linalg.norm(grads.mean(0))}


@pytest.mark.parametrize("form, given", [("steps", "sam"), ("closure", "sam"), ("steps", "base")])
def test_a_sam_step_is_its_second_pass_from_the_first_point(form, given):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    lf = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    refs, updates = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        instruments = [Loss(), GradNorm(), PerSampleGradNorms(), UpdateSize()]
        cockpit = Cockpit(model, sam if given == "sam" else sam.base_optimizer, lf, instruments=instruments, sinks=[])
        for _ in range(STEPS):
            x = torch.randn(B, 4, generator=g, dtype=torch.float64)
            y = torch.randint(0, 3, (B,), generator=g)
            before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            lf(model(x), y).backward()
            if form == "steps":
                sam.first_step(zero_grad=True)
                refs.append(_reference(model, x, y))
                lf(model(x), y).backward()
                sam.second_step(zero_grad=True)
            else:

                def closure(x=x, y=y):
                    refs.append(_reference(model, x, y))
                    loss = lf(model(x), y)
                    loss.backward()
                    return loss

                sam.step(closure)
                sam.zero_grad()
            after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            updates.append(float((after - before).norm()))
        cockpit.close()
    h = cockpit.history
    for step, ref in enumerate(refs):
        assert h.value_at("loss", step) == pytest.approx(ref["losses"].mean(), rel=1e-12)
        np.testing.assert_allclose(h.value_at("loss/per_sample", step), ref["losses"], rtol=1e-10)
        np.testing.assert_allclose(h.value_at("persample/grad_norm", step), ref["norms"], rtol=1e-10)
        assert h.value_at("grad_norm", step) == pytest.approx(ref["grad_norm"], rel=1e-10)
        assert h.value_at("update_size", step) == pytest.approx(updates[step], rel=1e-10)
    assert "skipped" not in h  # (the first pass is SAM's ascent, no abandoned iteration)
    assert sum(MOVED in str(w.message) for w in caught) == 1


def test_parameters_moved_without_a_step_the_cockpit_sees_are_said():
    """A hand-written update (no optimizer.step()): nothing is recorded, and a warning names why."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lf = nn.CrossEntropyLoss()
    with pytest.warns(CockpitWarning, match="the parameters moved between a backward and the next forward"):
        with Cockpit(model, opt, lf, instruments=[Loss()], sinks=[]) as cockpit:
            for _ in range(3):
                x, y = torch.randn(B, 4, dtype=torch.float64), torch.randint(0, 3, (B,))
                lf(model(x), y).backward()
                with torch.no_grad():
                    for p in model.parameters():
                        p -= 0.1 * p.grad
                        p.grad = None
    assert "loss" not in cockpit.history and "skipped" not in cockpit.history


def test_alpha_is_not_fitted_off_the_update_line():
    """Alpha fits the loss along the update theta_t -> theta_{t+1} from the loss and gradients at both ends; a
    SAM step's are at theta_t + e, off that line: every alpha is NaN with status "perturbed" (before: finite
    numbers with no meaning), the learning-rate verdict says it has too few alphas."""
    from cockpit_lite.instruments import Alpha

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.5, rho=0.5)
    lf = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Cockpit(model, sam, lf, instruments=[Alpha()], sinks=[]) as cockpit:
            for _ in range(4):
                x = torch.randn(32, 4, generator=g, dtype=torch.float64)
                y = torch.randint(0, 3, (32,), generator=g)
                lf(model(x), y).backward()
                sam.first_step(zero_grad=True)
                lf(model(x), y).backward()
                sam.second_step(zero_grad=True)
    h = cockpit.history
    assert [s for s, _ in h["alpha"]] == [0, 1, 2, 3] and all(np.isnan(v) for _, v in h["alpha"])
    assert h["alpha/status"] == [(s, "perturbed") for s in range(4)]
    assert "too few" in h.last("verdict/lr") or "only 0" in h.last("verdict/lr")
