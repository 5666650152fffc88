"""Cross-Gram entries g_i . h_k between two sets of per-sample gradients, from per-layer factors.

TracIn needs the inner products between the per-sample gradients g_i of a training batch and the
per-sample gradients h_k of probe (test) examples, at the same parameters. Neither side is ever
materialised as a B x D matrix for layers with a factor form (REFERENCE.md section 2): for a
Linear layer (T = 1, g groups) with inputs a, a' and output gradients e, e',

    g_i . h_k = sum_groups (a_i . a'_k)(e_i . e'_k)           (weight)
              + e_i . e'_k                                     (bias, e summed over positions)

For T > 1 (convolutions, sequences) and layers without a factor form the per-sample gradients of
that one layer are materialised (the engine's ``grads()``) and multiplied, layer by layer.

:class:`ViewCollector` runs its own forward/backward of a batch under :func:`cockpit_lite.paused`
with temporary hooks (no cockpit sees it, ``p.grad`` is untouched, the global RNG is forked) and
returns one view per layer, as the engine produces during training. :func:`cross` multiplies two
views of the same layer. A :class:`Projector` optionally sketches the factors with Gaussian random
projections first (Kronecker-structured: P_e e and P_a a, entries N(0, 1/k)): each factor's inner
product is estimated without bias with variance (|u|^2 |v|^2 + (u . v)^2) / k (Johnson-Lindenstrauss),
so a squared norm ||g||^2 = ||a||^2 ||e||^2 has relative standard deviation sqrt((1 + 2/k)^2 - 1)
~ 2 / sqrt(k) (one factor projected: sqrt(2/k)); see docs/tracin.md.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from cockpit_lite.persample.layers import Handler
from cockpit_lite.persample.views import (
    BagView,
    EmbeddingView,
    FactorView,
    TiedEmbeddingView,
    View,
    ViewGroup,
    lookup_cross,
    lookup_output_cross,
)


class ViewCollector:
    """Per-layer per-sample gradient views of any batch, outside the training step: the per-sample
    engine's :meth:`~cockpit_lite.persample.engine.PerSampleEngine.probe` session (the same capture,
    view and tied-weights code as training, memory guard included) over an engine that keeps no hooks
    between calls.

    Args:
        model: the network (its current mode is kept: train mode for TracIn probes during training,
            so probes see the model as training uses it; TracInCP sets eval mode itself).
        handlers: reuse an existing assignment of handlers (default: rebuilt from ``model``).
        params: ids of the parameters to cover (default: every trainable one).
    """

    def __init__(
        self,
        model: nn.Module,
        handlers: Mapping[nn.Module, Handler] | None = None,
        params: Collection[int] | None = None,
    ):
        from cockpit_lite.persample.engine import PerSampleEngine

        self.model = model
        self.engine = PerSampleEngine(model, params=params, attach=False, handlers=handlers)
        self.handlers = self.engine.handlers

    def names(self) -> set[str]:
        return set(self.engine.param_names)

    def __call__(
        self, inputs: torch.Tensor | Sequence[torch.Tensor], targets: Any, loss_fn: nn.Module
    ) -> tuple[dict[tuple[str, ...], View], torch.Tensor]:
        """Return ({parameter names of a layer: view}, per-example losses l_k (K,)) at the current
        parameters; the views hold gradients of l_k (:func:`example_losses`)."""
        return self.engine.probe(inputs, targets, loss_fn)


class Projector:
    """Fixed Gaussian random projections (entries N(0, 1/k), seeded, private generator) per factor.

    A factor of dimension d <= k is kept exact. Matrices are drawn once per (name, dimension) and
    reused for every step, so the sketched inner products are those of one fixed linear map.
    """

    def __init__(self, k: int, seed: int = 0):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"projection_dim must be a positive integer, got {k!r}")
        self.k, self.seed = k, seed
        self._mats: dict[tuple, torch.Tensor] = {}  # (key, d): float64 on the CPU; (key, d, device, dtype)

    def matrix(self, key: str, d: int, like: torch.Tensor) -> torch.Tensor | None:
        if d <= self.k:
            return None
        m = self._mats.get((key, d, like.device, like.dtype))
        if m is None:
            m = self._mats.get((key, d))
            if m is None:
                gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{key}/{d}".encode()))
                m = torch.randn(d, self.k, generator=gen, dtype=torch.float64) / self.k**0.5
                self._mats[(key, d)] = m
            m = self._mats[(key, d, like.device, like.dtype)] = m.to(device=like.device, dtype=like.dtype)
        return m

    def apply(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """Project the last axis of x."""
        m = self.matrix(key, x.shape[-1], x)
        if m is None:
            return x
        return (x.reshape(-1, x.shape[-1]) @ m).reshape(*x.shape[:-1], m.shape[1])  # 2-D matmul: fast path


def _flat_grads(view: View) -> dict[str, torch.Tensor]:
    return {n: g.reshape(g.shape[0], -1) for n, g in view.grads().items()}


def _factor(view: View) -> bool:
    return isinstance(view, FactorView) and hasattr(view, "a") and hasattr(view, "e")


def cross(left: View, right: View, projector: Projector | None = None) -> dict[str, torch.Tensor]:
    """{parameter name: C} with C[i, k] = g_i . h_k for two views of the same layer.

    Exact unless a ``projector`` is given (then an unbiased sketch, see the module docstring).
    """
    if isinstance(left, ViewGroup) and isinstance(right, ViewGroup):
        pairs = {rv.names: rv for rv in right.views}
        if all(lv.names in pairs for lv in left.views):  # the same handler on both sides: part by part
            return {n: c for lv in left.views for n, c in cross(lv, pairs[lv.names], projector).items()}
    if isinstance(left, BagView):  # (bags: their lookups padded to the longest bag)
        left = left.padded()
    if isinstance(right, BagView):
        right = right.padded()
    if _factor(left) and _factor(right):
        return _cross_factor(left, right, projector)
    if projector is None and isinstance(left, EmbeddingView) and isinstance(right, EmbeddingView):
        return {left.w: lookup_cross(left.idx, left.e, right.idx, right.e)}
    if projector is None and isinstance(left, TiedEmbeddingView) and isinstance(right, TiedEmbeddingView):
        return _cross_tied(left, right)
    lg, rg = _flat_grads(left), _flat_grads(right)
    out = {}
    for n in lg:
        if n not in rg:
            continue
        a, b = lg[n], rg[n].to(lg[n].dtype)
        if projector is not None:
            a, b = projector.apply(n, a), projector.apply(n, b)
        out[n] = a @ b.T
    return out


def _cross_tied(left: TiedEmbeddingView, right: TiedEmbeddingView) -> dict[str, torch.Tensor]:
    """<E_i + F_i, E'_k + F'_k> for tied embedding/output views (and the output layer's bias)."""
    out = _cross_factor(left.out, right.out, None)  # F . F' (and the bias)
    hl, el = left._out_factors()
    hr, er = right._out_factors()
    ee = lookup_cross(left.emb.idx, left.emb.e, right.emb.idx, right.emb.e)
    ef = lookup_output_cross(left.emb.idx, left.emb.e, hr, er)  # E_i . F'_k
    fe = lookup_output_cross(right.emb.idx, right.emb.e, hl, el).T  # F_i . E'_k
    out[left.w] = out[left.w] + ee + ef + fe
    return out


def _cross_factor(left: FactorView, right: FactorView, projector: Projector | None) -> dict[str, torch.Tensor]:
    bl, g, tl, i = left.a.shape
    br, _, tr, _ = right.a.shape
    o = left.e.shape[-1]
    out: dict[str, torch.Tensor] = {}
    if left.w is None:  # a frozen weight: the bias alone
        return {left.b: _bias_cross(left, right, projector)}
    if tl == 1 and tr == 1:
        al, el = left.a.reshape(bl, g, i), left.e.reshape(bl, g, o)
        ar, er = right.a.reshape(br, g, i).to(al.dtype), right.e.reshape(br, g, o).to(el.dtype)
        if projector is not None:
            al, ar = projector.apply(left.w + "/a", al), projector.apply(left.w + "/a", ar)
            el2, er2 = projector.apply(left.w + "/e", el), projector.apply(left.w + "/e", er)
        else:
            el2, er2 = el, er
        if g == 1:  # plain 2-D matmuls (batched matmuls on permuted views are much slower on CPU)
            ee = el2[:, 0] @ er2[:, 0].T
            out[left.w] = (al[:, 0] @ ar[:, 0].T).mul_(ee)
        else:  # (g, Bl, i) x (g, i, Br) -> (g, Bl, Br)
            aa = torch.bmm(al.transpose(0, 1), ar.permute(1, 2, 0))
            ee = torch.bmm(el2.transpose(0, 1), er2.permute(1, 2, 0))
            out[left.w] = aa.mul_(ee).sum(0)
            ee = ee.sum(0)
        if left.b is not None:
            # the bias gradient is e itself: its cross-Gram is the e-Gram already computed (exact case)
            out[left.b] = ee if projector is None else _bias_cross(left, right, projector)
        return out

    # T > 1: materialise this layer's per-sample weight gradients (B, g, o, i), or their sketch P_e G P_a^T
    def grads(v: FactorView) -> torch.Tensor:
        b = v.a.shape[0]
        a, e = v.a, v.e.to(v.a.dtype)
        if projector is not None:
            a, e = projector.apply(left.w + "/a", a), projector.apply(left.w + "/e", e)
        return torch.einsum("bgto,bgti->bgoi", e, a).reshape(b, -1)

    gl, gr = grads(left), grads(right)
    out[left.w] = gl @ gr.to(gl.dtype).T
    if left.b is not None:
        out[left.b] = _bias_cross(left, right, projector)
    return out


def _bias_cross(left: FactorView, right: FactorView, projector: Projector | None) -> torch.Tensor:
    """B x K cross-Gram of the bias gradients sum_t e_t (or of their sketches)."""
    sl, sr = left._bias_grads(), right._bias_grads()
    sr = sr.to(sl.dtype)
    if projector is not None:
        sl, sr = projector.apply(left.b, sl), projector.apply(left.b, sr)
    return sl @ sr.T
