"""The user's module inside the wrappers training code puts around it."""

from __future__ import annotations

from torch import nn

from cockpit_lite.compat import compiled_inner


def unwrap(model: nn.Module) -> tuple[nn.Module, bool]:
    """The module inside DistributedDataParallel, DataParallel and torch.compile wrappers (whose
    parameter names would otherwise start with ``module.`` / ``_orig_mod.``), and whether one of the
    wrappers was torch.compile's."""
    compiled = False
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif compiled_inner(model) is not None:  # torch.compile's OptimizedModule
            model, compiled = compiled_inner(model), True
        else:
            return model, compiled


def unwrap_optimizer(optimizer: object) -> object:
    """The ``torch.optim.Optimizer`` inside the wrappers frameworks put around it: Lightning's
    ``LightningOptimizer`` (``_optimizer``), accelerate's ``AcceleratedOptimizer`` (``optimizer``).
    Their ``step()`` calls the inner optimizer's, whose hooks the cockpit registers; so does SAM's, whose
    ``base_optimizer`` shares its parameter groups (its ``second_step()`` steps it). ``AcceleratedOptimizer``
    subclasses ``torch.optim.Optimizer`` without running its ``__init__``: an optimizer without its own
    step-hook table is a wrapper too."""
    import torch

    def wrapper(o: object) -> bool:
        return not isinstance(o, torch.optim.Optimizer) or "_optimizer_step_pre_hooks" not in vars(o)

    seen = 0
    while wrapper(optimizer) and seen < 8:
        inner = getattr(optimizer, "_optimizer", None) or getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer, seen = inner, seen + 1
    base = getattr(optimizer, "base_optimizer", None)
    if (
        isinstance(base, torch.optim.Optimizer)
        and base is not optimizer
        and getattr(optimizer, "param_groups", None) is getattr(base, "param_groups", ())
    ):
        # SAM and its kin (ASAM, GSAM): the wrapper's own step() (or its first_step / second_step) moves the
        # parameters to the perturbed point and back, then calls the base optimizer's step(), which is the step
        return base
    return optimizer
