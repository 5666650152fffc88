"""The benchmark models and the torch.func reference configurations of benchmarks/overhead.py: the
reference's per-sample numbers against the float64 loop, and the models' shapes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests import models_lm as M
from tests.harness import shares_loop

ROOT = Path(__file__).resolve().parents[1]


def _common():
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("inside", [False, True], ids=["loss module", "loss inside forward"])
def test_func_reference_matches_the_loop(inside):
    common = _common()
    torch.manual_seed(0)
    net = M.NanoGPT(dropout=0.0)
    wrapped = M.LogitsForLoss(net)
    x, y = M.token_batch(4, 8)
    model, loss_fn = (net, None) if inside else (wrapped, nn.CrossEntropyLoss())
    names = [n for n, _ in wrapped.named_parameters()]
    ref = shares_loop(wrapped, x, y, nn.CrossEntropyLoss(), names)
    flat = np.concatenate([ref[n].reshape(4, -1) for n in names], 1)
    reference = common.FuncNorms(model, loss_fn, dot=True)
    common.train_steps(model, torch.optim.SGD(model.parameters(), lr=0.0), loss_fn, [(x, y)], reference)
    sq, dot = (t.double().numpy() for t in reference.last)
    assert np.allclose(sq, (flat**2).sum(1), rtol=1e-4)
    assert np.allclose(dot, flat @ flat.mean(0), rtol=1e-4, atol=1e-6 * np.abs(flat @ flat.mean(0)).max())


def test_benchmark_models():
    common = _common()
    for name in ("gpt", "gpt-inner", "resnet18"):
        factory, data, batch = common.MODELS[name]
        (x, y), *_ = common.make_batches(name, 1)
        assert x.shape[0] == y.shape[0] == batch
    gpt = common.gpt_inner()
    assert gpt.transformer.wte.weight is gpt.lm_head.weight
    assert sum(p.numel() for p in gpt.parameters()) == 4 * 12 * 256**2 + 4 * 13 * 256 + 2 * 256 + (512 + 128) * 256
    assert common.loss_module("gpt-inner") is None and isinstance(common.loss_module("gpt"), nn.CrossEntropyLoss)
    net = common.resnet18()
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(isinstance(m, M.BasicBlock) for m in net.modules()) == 8
