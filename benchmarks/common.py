"""Benchmark models and timing helpers shared by the benchmark scripts.

Timings are interleaved (every configuration runs one block of steps per repetition, in turn) and
reported as medians and ratios to plain training measured in the same run: the machine is shared.
"""

from __future__ import annotations

import ctypes
import statistics
import time

import torch
from torch import nn


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


MODELS = {
    "mlp": (mlp, lambda b: torch.randn(b, 784), 128),
    "cnn": (cnn, lambda b: torch.randn(b, 3, 32, 32), 64),
}

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
}


def make_batches(model: str, n: int, seed: int = 0):
    _, data, batch = MODELS[model]
    torch.manual_seed(seed)
    return [(data(batch), torch.randint(0, 10, (batch,))) for _ in range(n)]


def train_steps(model, optimizer, loss_fn, batches) -> None:
    for x, y in batches:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()


def interleaved(runners: dict, reps: int) -> dict[str, float]:
    """{name: median seconds per call of runners[name]()} with the calls interleaved."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(reps):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


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
