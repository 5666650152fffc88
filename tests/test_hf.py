"""Hugging Face transformers layers: GPT-2's Conv1D served in the Linear factor form, registered only
where transformers is in use (cockpit-lite does not depend on it)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from cockpit_lite.persample import layers, register_handler
from cockpit_lite.persample.hf import Conv1DHandler
from tests import models_lm as M
from tests.harness import assert_matches_loop


class _Conv1DNet(nn.Module):
    def __init__(self, d_in: int = 5, d: int = 6, classes: int = 3):
        super().__init__()
        self.c_fc, self.c_proj, self.head = Conv1D(d, d_in), Conv1D(d, d), nn.Linear(d, classes)

    def forward(self, x):
        h = torch.tanh(self.c_proj(torch.tanh(self.c_fc(x))))
        return self.head(h.mean(1) if h.dim() == 3 else h)


@pytest.mark.parametrize("shape", [(6, 5), (6, 4, 5)], ids=["T=1", "T=4"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_conv1d_split_matches_the_loop(shape, reduction):
    torch.manual_seed(0)
    model = _Conv1DNet()
    assert type(layers.build_handlers(model)[model.c_fc]) is Conv1DHandler
    x, y = torch.randn(*shape), torch.randint(0, 3, (shape[0],))
    checked = assert_matches_loop(model, x, y, nn.CrossEntropyLoss(reduction=reduction))
    assert not checked.warnings


def test_conv1d_materialised_gradients_have_the_weights_layout():
    """g_i(W) in W's (in, out) layout: against autograd per example."""
    from cockpit_lite import Cockpit, Need
    from tests.test_persample import Probe

    torch.manual_seed(0)
    model, loss_fn = _Conv1DNet(), nn.CrossEntropyLoss(reduction="sum")
    x, y = torch.randn(4, 3, 5), torch.randint(0, 3, (4,))
    opt, probe = torch.optim.SGD(model.parameters(), lr=0.0), Probe(flags={Need.PER_SAMPLE_GRADS})
    with Cockpit(model, opt, loss_fn, instruments=[probe]):
        loss_fn(model(x), y).backward()
        opt.step()
    got = probe.records[0].per_sample_grads["c_fc.weight"]
    for i in range(4):
        (want,) = torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), model.c_fc.weight)
        assert got[i].shape == (5, 6) and torch.allclose(got[i], want, rtol=1e-5, atol=1e-6)


def test_a_handler_registered_for_conv1d_is_kept():
    class Mine(layers.LinearHandler):
        pass

    previous = register_handler(Conv1D, Mine)
    try:
        model = _Conv1DNet()
        assert type(layers.build_handlers(model)[model.c_fc]) is Mine
    finally:
        if previous is None:
            layers.HANDLERS.pop(Conv1D)
        else:
            register_handler(Conv1D, previous)
    model = _Conv1DNet()
    assert type(layers.build_handlers(model)[model.c_fc]) is Conv1DHandler


def test_the_core_does_not_import_transformers():
    code = (
        "import sys, torch\n"
        "from cockpit_lite import Cockpit\n"
        "from cockpit_lite.persample.layers import build_handlers\n"
        "m = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 2))\n"
        "build_handlers(m)\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
        "assert 'cockpit_lite.persample.hf' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gpt2_uses_the_factor_forms():
    """GPT-2's projections are Conv1D, its output layer is tied to wte: no torch.func handler at all."""
    model = M.hf_gpt2()
    kinds = {type(h).__name__ for h in layers.build_handlers(model).values()}
    assert kinds == {"Conv1DHandler", "EmbeddingHandler", "LinearHandler", "NormHandler"}
