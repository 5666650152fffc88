"""Running the user's model a second time without leaving a trace: the pieces the shape probe
(``persample/engine.py``), the loss replay (``providers/replay.py``) and the per-sample replays share."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


def cuda_devices(tensors: Iterable[torch.Tensor]) -> list[int]:
    """The CUDA device indices of ``tensors``, for ``torch.random.fork_rng(devices=...)``."""
    return sorted({t.device.index or 0 for t in tensors if t.is_cuda})


@contextlib.contextmanager
def scratch_state(model: nn.Module) -> Iterator[None]:
    """Inside, ``model``'s buffers are detached copies (BatchNorm's running statistics, and their version
    counters, which autograd checks for tensors saved for backward, stay untouched) and no Embedding
    renormalises its weight in place (``max_norm`` off); both are restored on leaving."""
    renorms = [m for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm]
    max_norms = [m.max_norm for m in renorms]
    buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    try:
        for m in renorms:
            m.max_norm = None
        for m, name, b in buffers:
            m._buffers[name] = b.detach().clone()
        yield
    finally:
        for m, max_norm in zip(renorms, max_norms, strict=True):
            m.max_norm = max_norm
        for m, name, b in buffers:
            m._buffers[name] = b
