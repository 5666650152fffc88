"""Per-sample losses from any ``torch.nn`` loss module, derived by the cockpit, never passed in.

For unreduced element losses u (shape B x ...), ``reduction="sum"`` gives L = sum_i l_i with
l_i = sum(u_i). ``reduction="mean"`` gives L = sum(u) / N, where N is the number of elements (or, for
CrossEntropyLoss/NLLLoss with class weights or ignored targets, the summed weight of the counted
targets). We define l_i = B * sum(u_i) / N, so that L = (1/B) sum_i l_i exactly and the mini-batch
gradient is the mean of the per-sample gradients.
"""

from __future__ import annotations

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


def _normaliser(loss_fn: nn.Module, args: tuple, unreduced: torch.Tensor) -> torch.Tensor:
    """The N in L = sum(u) / N for reduction='mean'."""
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) and len(args) >= 2:
        target = args[1]
        if not torch.is_floating_point(target):  # class indices, maybe weighted or ignored
            valid = target != loss_fn.ignore_index
            weight = loss_fn.weight
            if weight is not None:
                w = weight[target.clamp(min=0)] * valid
                return w.sum()
            return valid.sum().to(unreduced.dtype)
    return torch.tensor(float(unreduced.numel()), dtype=unreduced.dtype, device=unreduced.device)


@torch.no_grad()
def per_sample_losses(loss_fn: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """l_i for the batch the loss module was just called on (shape B)."""
    reduction = loss_fn.reduction
    detached = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
    loss_fn.reduction = "none"
    try:
        unreduced = loss_fn.forward(*detached, **kwargs)
    finally:
        loss_fn.reduction = reduction
    batch = unreduced.shape[0] if unreduced.dim() > 0 else 1
    per_sample = unreduced.reshape(batch, -1).sum(dim=1)
    if reduction == "mean":
        per_sample = per_sample * (batch / _normaliser(loss_fn, detached, unreduced))
    return per_sample


def gradient_scale(reduction: str, batch_size: int) -> float:
    """c in p.grad = c * sum_i g_i."""
    return 1.0 / batch_size if reduction == "mean" else 1.0
