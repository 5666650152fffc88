"""Adaptive gradient clipping (AGC; Brock, De, Smith, Simonyan 2021, "High-Performance Large-Scale Image
Recognition Without Normalization", arXiv:2102.06171, section 4.1).

For each unit i of a parameter tensor W (a row of a Linear weight, an output filter of a convolution,
i.e. everything along dimension 0; a bias or gain vector, or any tensor with ndim <= 1, is one unit):

    W*_i = max(||W_i||, eps),    if ||G_i|| / W*_i > lambda:  G_i <- G_i * lambda W*_i / ||G_i||

:func:`clip_` computes exactly what timm's ``adaptive_clip_grad`` (timm 1.0.x) computes, operation for
operation, so the clipped gradients are bit-identical for the same inputs: with
``max_norm = clip * max(||W_i||, eps)`` a unit is kept iff ``||G_i|| < max_norm`` and is otherwise
multiplied by ``max_norm / max(||G_i||, 1e-6)``.

The paper does not clip the final linear (classifier) layer; :func:`final_layer` finds its parameters
(the last module, in registration order, that owns trainable parameters) and ``exclude="final"`` skips
them. timm's training script does the same by dropping the last two parameters.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable

import torch
from torch import nn

#: what :func:`clip_` accepts: a tensor, tensors, (name, tensor) pairs, or a module
Params = torch.Tensor | Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | nn.Module

#: minimum of the gradient norm in the scale factor (timm's constant)
GRAD_NORM_FLOOR = 1e-6


def unitwise_norm(x: torch.Tensor, norm_type: float = 2.0) -> torch.Tensor:
    """The norm of each unit of ``x``: over all dimensions but 0 (kept, for broadcasting) when
    ``x.ndim > 1``; the whole tensor (a 0-dim result) when ``x.ndim <= 1``. A sparse COO ``x`` (the
    gradient of ``nn.Embedding(sparse=True)``): from its coalesced values, ``||x_u||_p =
    (sum_{stored v in unit u} |v|^p)^(1/p)``, 0 for units with nothing stored."""
    if x.layout == torch.sparse_coo:
        return _sparse_unitwise_norm(x, norm_type)
    if x.layout != torch.strided:
        x = x.to_dense()
    if x.ndim <= 1:
        return x.norm(norm_type)
    return x.norm(norm_type, dim=tuple(range(1, x.ndim)), keepdim=True)


def _sparse_unitwise_norm(x: torch.Tensor, norm_type: float) -> torch.Tensor:
    x = x.coalesce()
    values = x.values()
    if x.ndim <= 1:
        return values.norm(norm_type)
    if x.sparse_dim() > 1 or not math.isfinite(norm_type) or norm_type <= 0:
        return unitwise_norm(x.to_dense(), norm_type)
    # one sparse dimension (the units): each stored slice is a whole unit's row
    out = values.reshape(values.shape[0], -1).norm(norm_type, dim=1)
    units = torch.zeros(x.shape[0], dtype=out.dtype, device=out.device)
    units.index_add_(0, x.indices()[0], out.pow(norm_type))
    return units.pow(1.0 / norm_type).reshape(x.shape[0], *([1] * (x.ndim - 1)))


def check_positive(name: str, value: float, fix: str = "") -> float:
    """``value`` as a float, or a ValueError naming ``name`` if it is not a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} must be a positive finite number{fix}")
    v = float(value)
    if not (v > 0 and v != float("inf")):  # also rejects NaN
        raise ValueError(f"{name}={value!r} must be a positive finite number{fix}")
    return v


def final_layer(model: nn.Module) -> list[str]:
    """Names of the trainable parameters of the last module (in registration order) that owns any.

    For ``nn.Sequential(..., nn.Linear(...))`` and the usual ``self.head = nn.Linear(...)`` defined last,
    this is the classifier the paper leaves unclipped. Pass explicit names when a model registers its
    head before other layers.
    """
    last: list[str] = []
    for mname, module in model.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if own:
            last = [f"{mname}.{n}" if mname else n for n in own]
    return last


def _named(parameters: Params, exclude: str | Collection[str]) -> list[torch.Tensor]:
    if isinstance(parameters, nn.Module):
        named = list(parameters.named_parameters())
        if isinstance(exclude, str):
            if exclude != "final":
                raise ValueError(f'exclude={exclude!r}: use "final" or a collection of parameter names')
            exclude = final_layer(parameters)
    elif isinstance(parameters, torch.Tensor):
        named = [("", parameters)]
    else:
        named = [(x if isinstance(x, tuple) else ("", x)) for x in parameters]
    if isinstance(exclude, str):
        raise ValueError(
            'exclude="final" needs the model to find its final layer: call clip_(model, ...) or pass the '
            "parameter names to exclude with (name, parameter) pairs, e.g. clip_(model.named_parameters(), ...)"
        )
    exclude = set(exclude)
    if exclude:
        known = {n for n, _ in named}
        unknown = sorted(exclude - known)
        if unknown:
            raise ValueError(
                f"exclude names {unknown} are not among the parameters given; pass (name, parameter) pairs "
                "(model.named_parameters()) or the model itself"
            )
    return [p for n, p in named if n not in exclude]


@torch.no_grad()
def clip_(
    parameters: Params,
    clip: float = 0.01,
    eps: float = 1e-3,
    norm_type: float = 2.0,
    exclude: str | Collection[str] = (),
) -> None:
    """Adaptive gradient clipping in place, unit-wise (Brock et al. 2021; bit-identical to timm's
    ``adaptive_clip_grad``).

    For every unit i of every parameter with a gradient:
    ``max_norm_i = lambda * max(||W_i||, eps)``; if ``||G_i|| >= max_norm_i`` then
    ``G_i <- G_i * max_norm_i / max(||G_i||, 1e-6)``. Parameters without gradients are skipped.

    Args:
        parameters: a tensor, an iterable of tensors or of ``(name, tensor)`` pairs, or a module.
        clip: lambda, the largest allowed ratio ||G_i|| / max(||W_i||, eps) (0.01 at batch 4096 in the
            paper; larger for small batches).
        eps: floor of the weight norm (so zero-initialised units can still move).
        norm_type: the norm (2 in the paper).
        exclude: parameter names left unclipped, or ``"final"`` (with a module) for the final layer as
            the paper does (see :func:`final_layer`).
    """
    clip = check_positive("clip", clip, " (lambda of AGC, e.g. clip=0.01)")
    eps = check_positive("eps", eps, " (the weight-norm floor, e.g. eps=1e-3)")
    for p in _named(parameters, exclude):
        if p.grad is None:
            continue
        w = p.detach()
        g = p.grad.detach()
        if g.layout != torch.strided:
            raise ValueError(
                f"AGC clip_: a parameter of shape {tuple(p.shape)} has a sparse gradient ({g.layout}; e.g. "
                "nn.Embedding(sparse=True)), which cannot be clipped in place unit-wise: leave it out with "
                "exclude=[its name], or use a dense embedding"
            )
        max_norm = unitwise_norm(w, norm_type).clamp_(min=eps).mul_(clip)
        grad_norm = unitwise_norm(g, norm_type)
        clipped = g * (max_norm / grad_norm.clamp(min=GRAD_NORM_FLOOR))
        g.copy_(torch.where(grad_norm < max_norm, g, clipped))
