"""The user's module inside the wrappers training code puts around it."""

from __future__ import annotations

from torch import nn


def unwrap(model: nn.Module) -> tuple[nn.Module, bool]:
    """The module inside DistributedDataParallel, DataParallel and torch.compile wrappers (whose
    parameter names would otherwise start with ``module.`` / ``_orig_mod.``), and whether one of the
    wrappers was torch.compile's."""
    compiled = False
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model, compiled = model._orig_mod, True
        else:
            return model, compiled
