"""Per-sample gradient views of one layer for one step.

A view answers, for the parameters of one module, the four questions instruments ask without
materialising the B x D per-sample gradients unless that is the cheapest way for that layer:
squared norms ||g_i||^2, Gram entries g_i . g_j, projections g_i . v, and (only on demand) g_i itself.

Factor form (Linear, Conv1d/2d with any ``groups``; REFERENCE.md section 2): the layer computes
z = W a (+ b) at T positions; with A (B, g, T, i) the inputs (unfolded patches for a conv, g groups)
and E (B, g, T, o) the output gradients of the per-sample losses,
    g_i = sum_t E_it A_it^T                                   (per group)
    T = 1:  ||g_i||^2 = ||a_i||^2 ||e_i||^2,  g_i . g_j = (a_i . a_j)(e_i . e_j)
    T > 1:  ||g_i||^2 = sum_{s,t} (A_is . A_it)(E_is . E_it)  (ghost) or via g_i, whichever is cheaper
    g_i . V = sum_t E_it^T V A_it
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class View:
    """Interface: the per-sample gradients of some parameters (full names) of one module."""

    names: tuple[str, ...] = ()

    def sq_norms(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def gram(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def dot_mean(self) -> torch.Tensor:
        """sum over this view's parameters of g_i . gbar, gbar = mean_j g_j (shape B)."""
        return sum(g.mean(1) for g in self.gram().values())

    def release(self) -> None:
        """Drop caches before the view is kept across the optimizer step."""

    def project(self, directions: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        raise NotImplementedError

    def grads(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class MaterialisedView(View):
    """Per-sample gradients that are cheap to hold for one layer: {name: (B, *shape)}."""

    def __init__(self, grads: dict[str, torch.Tensor]):
        self._g = grads
        self.names = tuple(grads)

    def _flat(self, name: str) -> torch.Tensor:
        g = self._g[name]
        return g.reshape(g.shape[0], -1)

    def sq_norms(self) -> dict[str, torch.Tensor]:
        return {n: self._flat(n).square().sum(1) for n in self.names}

    def gram(self) -> dict[str, torch.Tensor]:
        return {n: self._flat(n) @ self._flat(n).T for n in self.names}

    def dot_mean(self) -> torch.Tensor:
        return sum(self._flat(n) @ self._flat(n).mean(0) for n in self.names)

    def project(self, directions: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        out = None
        for n in self.names:
            v = directions.get(n)
            if v is None:
                continue
            p = self._flat(n) @ v.reshape(-1).to(self._g[n].dtype)
            out = p if out is None else out + p
        return out

    def grads(self) -> dict[str, torch.Tensor]:
        return dict(self._g)


class FactorView(View):
    """Factor pair form for layers z = W a + b applied at T positions in g groups.

    Args:
        a: (B, g, T, i) inputs. e: (B, g, T, o) output gradients of the per-sample losses.
        weight_name / bias_name: full parameter names (bias_name may be None).
        weight_shape: shape of W, whose view (g*o, i) matches the group layout.
    """

    def __init__(self, a, e, weight_name, bias_name, weight_shape):
        self.a, self.e = a, e
        self.w, self.b = weight_name, bias_name
        self.weight_shape = weight_shape
        self.names = tuple(n for n in (weight_name, bias_name) if n is not None)

    @property
    def _dims(self):
        bsz, g, t, i = self.a.shape
        return bsz, g, t, i, self.e.shape[-1]

    def _bias_grads(self) -> torch.Tensor:
        return self.e.sum(2).reshape(self.e.shape[0], -1)  # (B, g*o)

    _cache: torch.Tensor | None = None

    def _weight_grads(self) -> torch.Tensor:
        if self._cache is None:
            bsz, g, t, i, o = self._dims
            # (B*g, o, T) @ (B*g, T, i) -> (B*g, o, i)
            gw = torch.bmm(self.e.reshape(bsz * g, t, o).transpose(1, 2), self.a.reshape(bsz * g, t, i))
            self._cache = gw.reshape(bsz, g * o, i)
        return self._cache

    def release(self) -> None:
        self._cache = None

    def dot_mean(self) -> torch.Tensor:
        bsz, g, t, i, o = self._dims
        if t == 1 and bsz * (i + o) < i * o:  # Gram of the factors is cheaper than g_i
            a = self.a.reshape(bsz, g, i).transpose(0, 1)
            e = self.e.reshape(bsz, g, o).transpose(0, 1)
            out = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(e, e.transpose(1, 2))).sum(0).mean(1)
        else:
            gw = self._weight_grads().reshape(bsz, -1)
            out = gw @ gw.mean(0)
        if self.b is not None:
            gb = self._bias_grads()
            out = out + gb @ gb.mean(0)
        return out

    def _ghost_is_cheaper(self) -> bool:
        _, _, t, i, o = self._dims
        return t == 1 or t * (i + o) < i * o

    def sq_norms(self) -> dict[str, torch.Tensor]:
        bsz, g, t, i, o = self._dims
        out = {}
        if t == 1:
            out[self.w] = (self.a.square().sum(-1) * self.e.square().sum(-1)).reshape(bsz, g).sum(1)
        elif self._cache is None and self._ghost_is_cheaper():
            aa = torch.matmul(self.a, self.a.transpose(-1, -2))  # (B, g, T, T)
            ee = torch.matmul(self.e, self.e.transpose(-1, -2))
            out[self.w] = (aa * ee).sum((1, 2, 3))
        else:
            out[self.w] = self._weight_grads().square().sum((1, 2))
        if self.b is not None:
            out[self.b] = self._bias_grads().square().sum(1)
        return out

    def gram(self) -> dict[str, torch.Tensor]:
        bsz, g, t, i, o = self._dims
        out = {}
        if t == 1:
            a = self.a.reshape(bsz, g, i).transpose(0, 1)  # (g, B, i)
            e = self.e.reshape(bsz, g, o).transpose(0, 1)
            out[self.w] = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(e, e.transpose(1, 2))).sum(0)
        else:
            gw = self._weight_grads().reshape(bsz, -1)
            out[self.w] = gw @ gw.T
        if self.b is not None:
            gb = self._bias_grads()
            out[self.b] = gb @ gb.T
        return out

    def project(self, directions: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        bsz, g, t, i, o = self._dims
        out = None
        v = directions.get(self.w)
        if v is not None:
            v = v.reshape(g, o, i).to(self.a.dtype)
            # sum_t e_t^T V a_t: (B, g, T, o) x (g, o, i) -> (B, g, T, i), then dot with a
            ev = torch.einsum("bgto,goi->bgti", self.e, v)
            out = (ev * self.a).sum((1, 2, 3))
        if self.b is not None:
            vb = directions.get(self.b)
            if vb is not None:
                pb = self._bias_grads() @ vb.reshape(-1).to(self.e.dtype)
                out = pb if out is None else out + pb
        return out

    def grads(self) -> dict[str, torch.Tensor]:
        bsz = self.a.shape[0]
        out = {self.w: self._weight_grads().reshape(bsz, *self.weight_shape)}
        if self.b is not None:
            out[self.b] = self._bias_grads()
        return out


class ConvView(MaterialisedView):
    """Conv1d/Conv2d: per-sample weight gradients materialised for this layer only (one
    weight-gradient-sized product, by the fastest exact kernel for the shape), projections through the
    layer's own forward convolution: g_i . V = <conv(x_i; V), e_i> (no unfolded patches kept).

    Args:
        grads: {name: (B, *shape)} per-sample gradients of weight (and bias).
        inputs / out_grads: per call, the layer input and the output gradient of the per-sample losses.
        conv: ``conv(x, V)`` the layer's convolution with weight V and no bias.
    """

    def __init__(self, grads, inputs, out_grads, conv, weight_name, bias_name):
        super().__init__(grads)
        self._inputs, self._out_grads, self._conv = inputs, out_grads, conv
        self.w, self.b = weight_name, bias_name

    def release(self) -> None:
        self._g = {}  # keep only the factors across the optimizer step

    def project(self, directions: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        out = None
        v = directions.get(self.w)
        vb = directions.get(self.b) if self.b is not None else None
        for x, e in zip(self._inputs, self._out_grads, strict=True):
            if v is not None:
                p = (self._conv(x, v.to(x.dtype)) * e).flatten(1).sum(1)
                out = p if out is None else out + p
            if vb is not None:
                p = e.flatten(2).sum(2) @ vb.to(e.dtype)
                out = p if out is None else out + p
        return out


class EmbeddingView(View):
    """Embedding lookups: g_i = sum_t onehot(idx_it) e_it^T (rows of the table)."""

    def __init__(self, idx: torch.Tensor, e: torch.Tensor, weight_name: str, num_embeddings: int):
        self.idx, self.e = idx, e  # (B, T), (B, T, d)
        self.w = weight_name
        self.n = num_embeddings
        self.names = (weight_name,)

    def sq_norms(self) -> dict[str, torch.Tensor]:
        same = (self.idx[:, :, None] == self.idx[:, None, :]).to(self.e.dtype)
        ee = torch.bmm(self.e, self.e.transpose(1, 2))
        return {self.w: (same * ee).sum((1, 2))}

    def gram(self) -> dict[str, torch.Tensor]:
        same = (self.idx[:, None, :, None] == self.idx[None, :, None, :]).to(self.e.dtype)  # (B, B, T, T)
        ee = torch.einsum("isd,jtd->ijst", self.e, self.e)
        return {self.w: (same * ee).sum((2, 3))}

    def project(self, directions: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        v = directions.get(self.w)
        if v is None:
            return None
        return (v.to(self.e.dtype)[self.idx] * self.e).sum((1, 2))

    def grads(self) -> dict[str, torch.Tensor]:
        bsz, t, d = self.e.shape
        g = torch.zeros(bsz, self.n, d, dtype=self.e.dtype, device=self.e.device)
        g.scatter_add_(1, self.idx.unsqueeze(-1).expand(bsz, t, d), self.e)
        return {self.w: g}
