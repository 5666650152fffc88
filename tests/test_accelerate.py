"""A raw Hugging Face Accelerate loop (``accelerator.prepare``, ``accelerator.accumulate``, ``accelerator.backward``,
``accelerator.clip_grad_norm_``, the AcceleratedOptimizer whose ``step()`` steps only where gradients sync): each
optimizer step joins its micro-batches, checked against a float64 loop over their examples (one autograd call
each): the loss, the gradient norm and the per-sample gradient norms of every step; nothing counted as skipped."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from cockpit_lite.instruments import GradNorm, Loss, PerSampleGradNorms
from torch import nn

from cockpit_lite import Cockpit


@pytest.mark.parametrize("accumulate", [1, 2])
def test_an_accelerate_loop_is_exact(accumulate):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g))
    accelerator = Accelerator(gradient_accumulation_steps=accumulate, cpu=True)
    model, opt, loader = accelerator.prepare(model, opt, torch.utils.data.DataLoader(data, batch_size=5))
    lf = nn.CrossEntropyLoss()
    want, micro = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Cockpit(model, opt, lf, instruments=[Loss(), GradNorm(), PerSampleGradNorms()], sinks=[]) as cockpit:
            for x, y in loader:
                if not micro:
                    ref = copy.deepcopy(accelerator.unwrap_model(model)).double()
                micro.append((x.double(), y))
                with accelerator.accumulate(model):
                    accelerator.backward(lf(model(x), y))
                    accelerator.clip_grad_norm_(model.parameters(), 10.0)
                    opt.step()
                    opt.zero_grad()
                if accelerator.sync_gradients:
                    xs, ys = torch.cat([a for a, _ in micro]), torch.cat([b for _, b in micro])
                    rows = []
                    for i in range(len(xs)):
                        li = F.cross_entropy(ref(xs[i : i + 1]), ys[i : i + 1])
                        rows.append(torch.cat([t.reshape(-1) for t in torch.autograd.grad(li, list(ref.parameters()))]))
                    rows = torch.stack(rows).numpy()
                    loss = np.mean([float(F.cross_entropy(ref(a), b)) for a, b in micro])  # (each scaled by 1/k)
                    want.append((loss, np.linalg.norm(rows, axis=1), np.linalg.norm(rows.mean(0))))
                    micro = []
    h = cockpit.history
    assert [s for s, _ in h["loss"]] == list(range(len(want))) == list(range(4 // accumulate))
    for step, (loss, norms, grad_norm) in enumerate(want):
        assert h.value_at("loss", step) == pytest.approx(loss, rel=1e-6)
        np.testing.assert_allclose(h.value_at("persample/grad_norm", step), norms, rtol=1e-5)
        assert h.value_at("grad_norm", step) == pytest.approx(grad_norm, rel=1e-5)
    assert "skipped" not in h
