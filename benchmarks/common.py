"""Benchmark models and timing helpers shared by the benchmark scripts.

Timings are interleaved (every configuration runs one block of steps per repetition, in turn) and
reported as medians and ratios to plain training measured in the same run: the machine is shared.
"""

from __future__ import annotations

import ctypes
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests/models_lm.py
from tests import models_lm  # noqa: E402


def mlp() -> nn.Module:
    """The MNIST MLP of REFERENCE.md: 784-512-256-10."""
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))


def cnn() -> nn.Module:
    """A 3C3D-like CIFAR-10 network on 32x32 inputs (3 conv layers, 3 dense layers)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 96, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(96, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128 * 4 * 4, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10),
    )  # fmt: skip


#: the small GPT: 4 layers, d = 256, 4 heads, context T = 128, vocabulary 512, tied embeddings
GPT = dict(vocab_size=512, block_size=128, n_layer=4, n_head=4, d=256, dropout=0.0, flash=True)


def gpt_inner() -> nn.Module:
    """The small GPT with its loss inside forward: ``model(idx, targets)`` returns (logits, loss)."""
    return models_lm.NanoGPT(**GPT)


def gpt() -> nn.Module:
    """The same GPT returning (B, V, T) logits for a loss module (``nn.CrossEntropyLoss``)."""
    return models_lm.LogitsForLoss(models_lm.NanoGPT(**GPT))


def resnet18() -> nn.Module:
    """ResNet-18 for 32x32 inputs (BatchNorm in train mode, as trained)."""
    return models_lm.resnet18(width=64, classes=10)


def _tokens(b: int) -> torch.Tensor:
    return torch.randint(0, GPT["vocab_size"], (b, GPT["block_size"]))


#: name -> (factory, inputs(b), batch size)
MODELS = {
    "mlp": (mlp, lambda b: torch.randn(b, 784), 128),
    "cnn": (cnn, lambda b: torch.randn(b, 3, 32, 32), 64),
    "gpt": (gpt, _tokens, 16),
    "gpt-inner": (gpt_inner, _tokens, 16),
    "resnet18": (resnet18, lambda b: torch.randn(b, 3, 32, 32), 32),
}

#: name -> targets(b), where they are not 10-class labels (next tokens for the GPTs)
TARGETS: dict[str, Callable[[int], torch.Tensor]] = {"gpt": _tokens, "gpt-inner": _tokens}

#: models whose loss is computed inside forward: a step is ``model(x, y)[1].backward()``, no loss module
LOSS_INSIDE = frozenset({"gpt-inner"})


def loss_module(model: str) -> nn.Module | None:
    """The loss module a model is trained with (None: the loss is computed inside its forward)."""
    return None if model in LOSS_INSIDE else nn.CrossEntropyLoss()


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
}


def make_batches(model: str, n: int, seed: int = 0, device: str | torch.device = "cpu"):
    """n (inputs, targets) batches of the model's batch size, drawn on the CPU (the same numbers on
    every device) and moved to ``device``."""
    _, data, batch = MODELS[model]
    targets = TARGETS.get(model, lambda b: torch.randint(0, 10, (b,)))
    torch.manual_seed(seed)
    return [(data(batch).to(device), targets(batch).to(device)) for _ in range(n)]


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: a timer read without this measures
    the kernel launches, not the work); nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(model, optimizer, loss_fn, batches, after_backward=None) -> None:
    """Plain training steps; ``loss_fn`` None: the model returns (output, loss) from ``model(x, y)``.
    ``after_backward(x, y)`` runs between backward and the optimizer step (a reference computation)."""
    for x, y in batches:
        optimizer.zero_grad()
        loss = model(x, y)[1] if loss_fn is None else loss_fn(model(x), y)
        loss.backward()
        if after_backward is not None:
            after_backward(x, y)
        optimizer.step()


class FuncNorms:
    """The torch.func reference for per-sample statistics: per-sample gradients of every trainable
    parameter by ``vmap(grad(per-example loss))`` over a ``functional_call`` of the model at the current
    parameters (the forward recomputed per example), materialised (B x D), then reduced at once:
    ||g_i||^2 = sum_p ||g_ip||^2 and, with ``dot``, g_i . gbar with gbar = p.grad (the mean loss's
    gradient, after backward). The per-example loss is the loss of the example as a batch of one (for
    the GPTs the mean over its tokens, as the cockpit's).

    BatchNorm in train mode normalises with the batch's statistics, which a per-example recomputation
    does not have: the reference uses torch.func's ``replace_all_batch_norm_modules_`` on a copy of
    the model (each example normalised with its own statistics, no running-statistics update), a
    different definition of the per-sample gradient with the same cost structure.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module | None, dot: bool):
        import copy

        from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.dot = dot
        twin = copy.deepcopy(model)
        replace_all_batch_norm_modules_(twin)
        buffers = dict(twin.named_buffers())

        def loss_one(params, x, y):
            xb, yb = x.unsqueeze(0), y.unsqueeze(0)
            if loss_fn is None:
                return functional_call(twin, (params, buffers), (xb, yb))[1]
            return loss_fn(functional_call(twin, (params, buffers), (xb,)), yb)

        self.per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="different")
        self.last: list[torch.Tensor] = []
        #: called while the per-sample gradients are alive (the memory benchmark samples its peak there)
        self.probe: Callable[[], None] | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        g = self.per_sample({n: p.detach() for n, p in self.params.items()}, x, y)
        flat = {n: v.flatten(1) for n, v in g.items()}
        if self.probe is not None:
            self.probe()
        out = [sum(torch.linalg.vector_norm(v, dim=1).square() for v in flat.values())]
        if self.dot:
            out.append(sum(v @ self.params[n].grad.flatten() for n, v in flat.items()))
        self.last = out


def interleaved_times(runners: dict, reps: int, device: str | torch.device = "cpu") -> dict[str, list[float]]:
    """{name: seconds of each of ``reps`` calls of runners[name]()} with the calls interleaved (rep k of
    every runner ran in the same round, the runners in an order shuffled each round, seeded: a fixed order
    favours or burdens a position with what the one before leaves in the caches); on a CUDA device each
    timed call starts and ends with :func:`synchronize`."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    for rep in range(reps):
        order = list(runners.items())
        random.Random(rep).shuffle(order)
        for name, run in order:
            synchronize(device)
            t0 = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return times


def interleaved(runners: dict, reps: int, device: str | torch.device = "cpu") -> dict[str, float]:
    """{name: median seconds per call of runners[name]()} with the calls interleaved (:func:`interleaved_times`)."""
    return {k: statistics.median(v) for k, v in interleaved_times(runners, reps, device).items()}


def paired_ratio(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of num[k] / den[k] over the rounds of :func:`interleaved_times`: a ratio of
    two arms measured side by side, round by round (less exposed to a slow minute than a ratio of medians)."""
    q = np.quantile([a / b for a, b in zip(num, den, strict=True)], [0.5, 0.25, 0.75])
    return float(q[0]), float(q[1]), float(q[2])


class _MallInfo2(ctypes.Structure):
    _FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in _FIELDS.split()]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def malloc_in_use_mb() -> float:
    """Bytes currently allocated through malloc (heap + mmapped chunks); CPU tensors live there."""
    m = _libc.mallinfo2()
    return (m.uordblks + m.hblkhd) / 2**20


class PeakSampler:
    """Peak of :func:`malloc_in_use_mb` sampled at every module's forward and backward boundary and
    around the optimizer step: the high-water mark of live tensors during training."""

    def __init__(self, model, optimizer):
        self.peak = malloc_in_use_mb()
        self._handles = []
        for m in model.modules():
            self._handles.append(m.register_forward_pre_hook(lambda *a: self.sample()))
            self._handles.append(m.register_forward_hook(lambda *a: self.sample()))
            self._handles.append(m.register_full_backward_pre_hook(lambda *a: self.sample()))
        self._handles.append(optimizer.register_step_pre_hook(lambda *a: self.sample()))
        self._handles.append(optimizer.register_step_post_hook(lambda *a: self.sample()))

    def sample(self) -> None:
        self.peak = max(self.peak, malloc_in_use_mb())

    def close(self) -> None:
        for h in self._handles:
            h.remove()


# --- issue 15 (benchmarks/peers.py): the small transformer LM and batches of any size ---------------------
#: the small transformer LM of issue 15's table: a nanoGPT of 2 layers, d = 256, 4 heads, context T = 64,
#: vocabulary 512, tied embeddings (B = 16), returning (B, V, T) logits for ``nn.CrossEntropyLoss``
LM = dict(vocab_size=512, block_size=64, n_layer=2, n_head=4, d=256, dropout=0.0, flash=True)


def lm() -> nn.Module:
    """The 2-layer T = 64 LM returning (B, V, T) logits for a loss module."""
    return models_lm.LogitsForLoss(models_lm.NanoGPT(**LM))


def _lm_tokens(b: int) -> torch.Tensor:
    return torch.randint(0, LM["vocab_size"], (b, LM["block_size"]))


MODELS["lm"] = (lm, _lm_tokens, 16)
TARGETS["lm"] = _lm_tokens


def make_batches_of(model: str, n: int, batch: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Like :func:`make_batches` with a batch size other than the model's own (the B-sweep)."""
    _, data, _ = MODELS[model]
    targets = TARGETS.get(model, lambda b: torch.randint(0, 10, (b,)))
    torch.manual_seed(seed)
    return [(data(batch), targets(batch)) for _ in range(n)]


def lm_eager() -> nn.Module:
    """The same LM with explicit attention (softmax(q k^T) v, ``flash=False``): torch.func's vmap has no
    batching rule for CPU flash attention and loops over the examples there, not here."""
    return models_lm.LogitsForLoss(models_lm.NanoGPT(**{**LM, "flash": False}))


MODELS["lm-eager"] = (lm_eager, _lm_tokens, 16)
TARGETS["lm-eager"] = _lm_tokens
