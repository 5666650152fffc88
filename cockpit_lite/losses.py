"""Per-sample losses from any ``torch.nn`` loss module, derived by the cockpit, never passed in.

For unreduced element losses u (shape B x ...), ``reduction="sum"`` gives L = sum_i l_i with
l_i = sum(u_i). ``reduction="mean"`` gives L = sum(u) / N, where N is the number of elements (or, for
CrossEntropyLoss/NLLLoss with class weights or ignored targets, the summed weight of the counted
targets). We define l_i = B * sum(u_i) / N, so that L = (1/B) sum_i l_i exactly and the mini-batch
gradient is the mean of the per-sample gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SUPPORTED_REDUCTIONS = ("mean", "sum")


def check_loss_module(loss_fn: object) -> None:
    """Raise a clear error for a loss the cockpit cannot read per-sample losses from."""
    if not isinstance(loss_fn, nn.Module):
        raise TypeError(
            f"loss_fn must be a torch.nn loss module (e.g. nn.CrossEntropyLoss()), got {type(loss_fn).__name__}. "
            "Functional losses (F.cross_entropy) cannot be hooked: use the module form with the same arguments."
        )
    reduction = getattr(loss_fn, "reduction", None)
    if reduction is None:
        raise TypeError(
            f"{type(loss_fn).__name__} has no 'reduction' attribute: the cockpit needs a loss module with "
            "reduction='mean' or 'sum' to derive per-sample losses."
        )
    if reduction not in SUPPORTED_REDUCTIONS:
        raise ValueError(
            f"{type(loss_fn).__name__}(reduction={reduction!r}) is not supported: the training loop must "
            "reduce the loss itself, so the cockpit cannot know the scale of the gradient. Use "
            "reduction='mean' (or 'sum') in the loss module and let the module reduce."
        )


def unreduced(loss_fn: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The loss module's element losses u (reduction="none") for these inputs; the module's own
    reduction is restored afterwards. Differentiable: callers detach or not."""
    reduction = loss_fn.reduction
    loss_fn.reduction = "none"
    try:
        return loss_fn.forward(*args, **kwargs)
    finally:
        loss_fn.reduction = reduction


def target_weights(loss_fn: nn.Module, target: Any, dtype: torch.dtype) -> torch.Tensor | None:
    """CrossEntropyLoss/NLLLoss with class-index targets: the weight each target element counts with
    in reduction="mean" (its class weight, 0 for ``ignore_index``); None for every other loss."""
    if not isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) or not torch.is_tensor(target):
        return None
    if torch.is_floating_point(target):  # class probabilities: a plain mean
        return None
    w = (target != loss_fn.ignore_index).to(dtype)
    if loss_fn.weight is not None:
        w = w * loss_fn.weight[target.clamp(min=0)]
    return w


@torch.no_grad()
def per_sample_losses(loss_fn: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """l_i for the batch the loss module was just called on (shape B), with L = mean_i l_i for
    reduction="mean" (l_i = B sum(u_i) / N, N the element count or the summed target weights)."""
    detached = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
    u = unreduced(loss_fn, *detached, **kwargs)
    batch = u.shape[0] if u.dim() > 0 else 1
    per_sample = u.reshape(batch, -1).sum(dim=1)
    if loss_fn.reduction == "mean":
        w = target_weights(loss_fn, detached[1], u.dtype) if len(detached) >= 2 else None
        n = w.sum() if w is not None else torch.tensor(float(u.numel()), dtype=u.dtype, device=u.device)
        per_sample = per_sample * (batch / n)
    return per_sample


def example_losses(loss_fn: nn.Module, pred: torch.Tensor, target: Any) -> torch.Tensor:
    """l_k = the loss of example k as a batch of one (shape K), from one unreduced evaluation.

    ``reduction="sum"``: l_k = sum(u_k). ``"mean"``: the mean over the example's elements; for
    CrossEntropyLoss/NLLLoss with class-index targets the weighted mean over its counted targets.
    Unlike :func:`per_sample_losses` the examples are not normalised together (TracIn probes).
    """
    u = unreduced(loss_fn, pred, target)
    k = u.shape[0] if u.dim() > 0 else 1
    flat = u.reshape(k, -1)
    if loss_fn.reduction == "sum":
        return flat.sum(1)
    w = target_weights(loss_fn, target, u.dtype)
    if w is not None:
        return flat.sum(1) / w.reshape(k, -1).sum(1).clamp(min=torch.finfo(u.dtype).tiny)
    return flat.mean(1)


def gradient_scale(reduction: str, batch_size: int) -> float:
    """c in p.grad = c * sum_i g_i."""
    return 1.0 / batch_size if reduction == "mean" else 1.0
