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

import math
from collections.abc import Mapping, Sequence

import torch


class View:
    """Interface: the per-sample gradients of some parameters (full names) of one module."""

    names: tuple[str, ...] = ()
    #: (parts, s): the weight gradients autograd computed for the module's calls and the factor s of
    #: the output gradients, sum_i g_i = s sum(parts), when the engine took them from the layer's own
    #: backward (else None); summed only by the views that use it (:attr:`batch_grad`)
    batch_grad_parts: tuple[list[torch.Tensor], float] | None = None
    #: the engine keeps this view across the optimizer step (:meth:`release`, then projections): set
    #: before its statistics are asked, so a view that will keep its g_i forms them once
    kept: bool = False
    #: the engine projects this view onto directions known before the step as it reduces it
    #: (``PerSampleEngine.project_early``): set before its statistics are asked, so that g_i formed
    #: for them serve those projections too
    early_directions: bool = False
    #: projected during backward onto the directions known before the step (``PerSampleEngine.project_early``)
    projected_early: bool = False

    @property
    def batch_grad(self) -> torch.Tensor | None:
        """sum_i g_i of the weight from the layer's own backward, or None."""
        if self.batch_grad_parts is None:
            return None
        parts, s = self.batch_grad_parts
        return (parts[0] if len(parts) == 1 else sum(parts)) * s

    def sq_norms(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def sq_total(self) -> torch.Tensor | None:
        """sum over this view's parameters of ||g_i||^2 (shape B; None for a view of no parameter)."""
        rows = list(self.sq_norms().values())
        if not rows:
            return None
        total = rows[0]
        for row in rows[1:]:
            total = total + row
        return total

    def gram(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def dot_mean(self) -> torch.Tensor:
        """sum over this view's parameters of g_i . gbar, gbar = mean_j g_j (shape B)."""
        return sum(g.mean(1) for g in self.gram().values())

    def formed_now(self) -> bool:
        """Whether g_i are formed now and dropped by :meth:`release`: projections are cheaper before it."""
        return False

    def release(self) -> None:
        """Called before the view is kept across the optimizer step: keep only what projections need."""

    def project_many(self, directions: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """{key: g_i . v_key} for several directions at once (one pass over the kept factors)."""
        raise NotImplementedError

    def grads(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def _stack(directions: Mapping[str, Mapping[str, torch.Tensor]], name: str, shape, dtype):
    """The keys whose direction touches ``name``, and those directions stacked as (K, *shape)."""
    keys = [k for k, d in directions.items() if d.get(name) is not None]
    if not keys:
        return keys, None
    return keys, torch.stack([directions[k][name].reshape(shape).to(dtype) for k in keys])


def _add(out: dict[str, torch.Tensor], keys: list[str], values: torch.Tensor) -> None:
    """out[key] += values[:, j] for the j-th key."""
    for j, k in enumerate(keys):
        out[k] = values[:, j] if k not in out else out[k] + values[:, j]


class MaterialisedView(View):
    """Per-sample gradients that are cheap to hold for one layer: {name: (B, *shape)}."""

    def __init__(self, grads: dict[str, torch.Tensor]):
        self._g = grads
        self.names = tuple(grads)

    def _flat(self, name: str) -> torch.Tensor:
        g = self.grads()[name]
        return g.reshape(g.shape[0], -1)

    def sq_norms(self) -> dict[str, torch.Tensor]:
        # a norm reduction, not square().sum(): no temporary as large as g_i
        return {n: torch.linalg.vector_norm(self._flat(n), dim=1).square() for n in self.names}

    def gram(self) -> dict[str, torch.Tensor]:
        return {n: self._flat(n) @ self._flat(n).T for n in self.names}

    def dot_mean(self) -> torch.Tensor:
        return sum(self._flat(n) @ self._flat(n).mean(0) for n in self.names)

    def project_many(self, directions):
        out: dict[str, torch.Tensor] = {}
        for n in self.names:
            g = self._flat(n)
            keys, v = _stack(directions, n, (-1,), g.dtype)
            if keys:
                _add(out, keys, g @ v.T)
        return out

    def grads(self) -> dict[str, torch.Tensor]:
        return self._g


class ViewGroup(View):
    """Views of disjoint parameter sets of one module as one view (a handler whose parameters have
    different factor forms, e.g. the two matrices of a low-rank adapter): squared norms, Gram entries
    and g_i are per parameter, so they are merged; g_i . gbar and projections are sums over
    parameters, so they add up."""

    def __init__(self, views: list[View]):
        self.views = list(views)
        self.names = tuple(n for v in self.views for n in v.names)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"the views of a ViewGroup must hold disjoint parameters, got {self.names}")

    def sq_norms(self) -> dict[str, torch.Tensor]:
        return {n: t for v in self.views for n, t in v.sq_norms().items()}

    def gram(self) -> dict[str, torch.Tensor]:
        return {n: t for v in self.views for n, t in v.gram().items()}

    def dot_mean(self) -> torch.Tensor:
        return sum(v.dot_mean() for v in self.views)

    def release(self) -> None:
        for v in self.views:
            v.release()

    def formed_now(self) -> bool:
        return all(v.formed_now() for v in self.views)

    def project_many(self, directions):
        out: dict[str, torch.Tensor] = {}
        for v in self.views:
            for k, p in v.project_many(directions).items():
                out[k] = p if k not in out else out[k] + p
        return out

    def grads(self) -> dict[str, torch.Tensor]:
        return {n: t for v in self.views for n, t in v.grads().items()}


def combined(views: list[View]) -> MaterialisedView:
    """One view of modules that share parameters (tied weights): a sample's gradient of a shared
    parameter is the sum over its uses, so each use's g_i is formed and the uses are added. Names in
    sorted order, so that the same modules give the same view whatever order they were reduced in."""
    total: dict[str, torch.Tensor] = {}
    for view in views:
        for name, g in view.grads().items():
            total[name] = g if name not in total else total[name] + g
    return MaterialisedView(dict(sorted(total.items())))


def _hadamard_gram_rowsums(
    a: torch.Tensor, e: torch.Tensor, shift: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sum_j (a_i . a_j + shift)(e_i . e_j) for every row i of a (B, i) and e (B, o), and the diagonals
    a_i . a_i and e_i . e_i (a layer's per-sample squared norms come with them: ||g_i||^2 of
    W is (a_i . a_i)(e_i . e_i), of the bias e_i . e_i; ``shift = 1`` adds the bias's share).

    Below B = 256 one full product each is fastest; above, both Grams being symmetric, only the four
    row panels on and right of the diagonal are formed, each off-diagonal panel counting once for its
    rows and once (summed over rows) for its columns (B = 512: 0.6-0.75x the time of full products).
    """
    bsz = a.shape[0]
    panels = 1 if bsz < 256 else 4
    if panels == 1:
        ga, ge = a @ a.T, e @ e.T
        da = ga.diagonal().clone()
        return (ga.add_(shift) if shift else ga).mul_(ge).sum(1), da, ge.diagonal()
    out = torch.zeros(bsz, dtype=a.dtype, device=a.device)
    da, de = torch.empty_like(out), torch.empty_like(out)
    cuts = [bsz * j // panels for j in range(panels + 1)]
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        ga, ge = a[lo:hi] @ a[lo:].T, e[lo:hi] @ e[lo:].T  # rows lo:hi, columns lo:B
        da[lo:hi], de[lo:hi] = ga[:, : hi - lo].diagonal(), ge[:, : hi - lo].diagonal()
        h = (ga.add_(shift) if shift else ga).mul_(ge)
        out[lo:hi] += h.sum(1)
        if hi < bsz:
            out[hi:] += h[:, hi - lo :].sum(0)
    return out, da, de


#: (B, dtype, device) -> a (B, B) matrix of ones and a (B,) vector of zeros: the addends of the fused Gram
#: products (:func:`_fused_gram_stats`), kept for the few batch sizes a run has
_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _fused_gram_stats(a: torch.Tensor, e: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer with a bias, B < 256: (sum_j (a_i . a_j + 1)(e_i . e_j) s / B, (a_i . a_i + 1)(e_i . e_i) s)
    for s = ``scale``, i.e. B g_i . gbar's rows over B and ||g_i||^2 of weight and bias, from four products:
    the "+ 1" and s / B ride on the Gram products (``addmm``'s beta and alpha), the squared norms on one
    ``addcmul`` of their diagonals (read before the row sums change the Gram of a), the rows on a ``vecdot``
    of the two Grams. The same sums as :func:`_hadamard_gram_rowsums` and its scalings, in 4 ops, not 9."""
    bsz = a.shape[0]
    key = (bsz, a.dtype, a.device)
    constants = _CONSTANTS.get(key)
    if constants is None:
        if len(_CONSTANTS) > 8:
            _CONSTANTS.clear()
        constants = _CONSTANTS[key] = (
            torch.ones(bsz, bsz, dtype=a.dtype, device=a.device),
            torch.zeros(bsz, dtype=a.dtype, device=a.device),
        )
    ones, zeros = constants
    ga1 = torch.addmm(ones, a, a.T)  # a_i . a_j + 1
    ge = torch.addmm(ones, e, e.T, beta=0.0, alpha=scale / bsz)  # (e_i . e_j) s / B (beta 0: ones unread)
    sq = torch.addcmul(zeros, ga1.diagonal(), ge.diagonal(), value=float(bsz))
    return torch.linalg.vecdot(ga1, ge), sq


def factor_grams_cheaper(bsz: int, i: int, o: int) -> bool:
    """For a (B, i) -> (B, o) layer call (T = 1): whether g_i . gbar is cheaper from the factors' Grams,
    B^2 (i + o) multiply-adds, than from one product with the batch weight gradient, B i o."""
    return bsz * (i + o) < i * o


#: FactorView at T > 1 positions: below this many, g_i . gbar is a projection onto autograd's weight gradient
#: (B T i o multiply-adds in one plain product, the squared norms by the ghost form) rather than a pass over
#: the formed g_i (the same count in a batched product whose B (o, i) outputs are written and read twice:
#: write-bound at small T). Measured in the loop on this CPU: the LM's (T = 64) economy minus Alpha 1.75x by
#: the formed g_i, 1.65x by the projection; the small GPT's (T = 128) 1.53x formed, 1.65x projected.
FORM_AT_T = 128


def _present(weight_name: str | None, bias_name: str | None) -> tuple[str, ...]:
    """The names of a layer's parameters that are served (a frozen weight or no bias: None, left out)."""
    names = (weight_name, bias_name)
    return names if None not in names else tuple(n for n in names if n is not None)


class FactorView(View):
    """Factor pair form for layers z = W a + b applied at T positions in g groups.

    Args:
        a: (B, g, T, i) inputs. e: (B, g, T, o) output gradients of the per-sample losses.
        weight_name / bias_name: full parameter names (bias_name may be None).
        weight_shape: shape of W, whose view (g*o, i) matches the group layout.
        e_scale: a factor the output gradients still need (B for a mean loss: the captured gradient
            is a share of the mean's): ``e`` is scaled when first read, while the T = 1 Gram route
            scales its (B,) results by ``e_scale**2`` instead of copying e.
    """

    #: the weight is stored (i, o) (:class:`TransposedFactorView`)
    transposed = False

    def __init__(self, a, e, weight_name, bias_name, weight_shape, e_scale: float = 1.0, flat=None):
        # (a and e may be None with ``flat``: their 4-d views are formed on first use)
        self._a, self._e, self.e_scale = a, e, e_scale
        #: T = 1, g = 1: the (B, i) input and (B, o) unscaled output gradient the 4-d factors view
        self._flat: tuple[torch.Tensor, torch.Tensor] | None = flat
        self.w, self.b = weight_name, bias_name
        self.weight_shape = weight_shape
        self.names = _present(weight_name, bias_name)
        self._cache: torch.Tensor | None = None  # g_i of the weight, (B, g*o, i)
        self._bias_cache: torch.Tensor | None = None  # g_i of the bias, (B, g*o)
        self._grams: tuple[torch.Tensor, torch.Tensor] | None = None  # T = 1: (g, B, B) for a and e
        #: T = 1: a_i . a_i and e_i . e_i, (g, B) ((B,) for g = 1), from the Grams of g_i . gbar
        self._diags: tuple[torch.Tensor, torch.Tensor] | None = None
        #: T = 1, one group, with a bias: (||a_i||^2 + 1) ||e_i||^2, formed with g_i . gbar by the fused Grams
        self._sq_total: torch.Tensor | None = None

    @property
    def a(self) -> torch.Tensor:
        """(B, g, T, i) inputs."""
        if self._a is None:
            x = self._flat[0]
            self._a = x.reshape(x.shape[0], 1, 1, -1)
        return self._a

    def _e_unscaled(self) -> torch.Tensor:
        if self._e is None:
            g = self._flat[1]
            self._e = g.reshape(g.shape[0], 1, 1, -1)
        return self._e

    @property
    def e(self) -> torch.Tensor:
        """(B, g, T, o) output gradients of the per-sample losses."""
        if self.e_scale != 1.0:  # (the unscaled flat pair goes with it)
            self.a  # noqa: B018 (formed from the flat pair first)
            self._e, self.e_scale, self._flat = self._e_unscaled() * self.e_scale, 1.0, None
        return self._e_unscaled()

    def _pair(self, gi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """T = 1: group ``gi``'s (B, i) inputs and (B, o) unscaled output gradients."""
        if self._flat is not None:
            return self._flat
        return self.a[:, gi, 0], self._e_unscaled()[:, gi, 0]

    @property
    def _dims(self):
        if self._flat is not None:
            (bsz, i), o = self._flat[0].shape, self._flat[1].shape[1]
            return bsz, 1, 1, i, o
        bsz, g, t, i = self.a.shape
        return bsz, g, t, i, self._e_unscaled().shape[-1]

    def _bias_grads(self) -> torch.Tensor:
        """(B, g*o) g_i of the bias, formed once (from the unscaled output gradients: e is not copied)."""
        if self._bias_cache is None:
            e = self._e_unscaled()
            gb = e.sum(2).reshape(e.shape[0], -1)
            self._bias_cache = gb if self.e_scale == 1.0 else gb.mul_(self.e_scale)
        return self._bias_cache

    def _weight_grads(self) -> torch.Tensor:
        if self._cache is None:
            bsz, g, t, i, o = self._dims
            # (B*g, o, T) @ (B*g, T, i) -> (B*g, o, i), from the unscaled output gradients: their factor
            # rides on the product (alpha), so e is not copied to be scaled
            e, a = self._e_unscaled().reshape(bsz * g, t, o).transpose(1, 2), self.a.reshape(bsz * g, t, i)
            if self.e_scale == 1.0:
                gw = torch.bmm(e, a)
            else:
                gw = torch.baddbmm(a.new_zeros(()), e, a, beta=0.0, alpha=self.e_scale)
            self._cache = gw.reshape(bsz, g * o, i)
        return self._cache

    def _factor_grams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """T = 1: (a_i . a_j) and (e_i . e_j) per group, computed once for norms, Gram and dot_mean."""
        if self._grams is None:
            bsz, g, _, i, o = self._dims
            a = self.a.reshape(bsz, g, i).transpose(0, 1)  # (g, B, i)
            e = self.e.reshape(bsz, g, o).transpose(0, 1)
            if g == 1:
                self._grams = ((a[0] @ a[0].T)[None], (e[0] @ e[0].T)[None])
            else:
                self._grams = (torch.bmm(a, a.transpose(1, 2)), torch.bmm(e, e.transpose(1, 2)))
        return self._grams

    def release(self) -> None:
        self._cache = None
        self._bias_cache = None
        self._grams = None
        self._diags = None
        self._sq_total = None

    def _projects_onto_gbar(self) -> bool:
        """T > 1: g_i . gbar without forming g_i (see ``FORM_AT_T``), unless they are formed already, will be
        formed for the squared norms (the ghost form costs more), or serve projections during backward."""
        t = self._dims[2]
        return self._cache is None and not self.early_directions and t < FORM_AT_T and self._ghost_is_cheaper()

    def _ghost_is_cheaper(self) -> bool:
        _, _, t, i, o = self._dims
        return t == 1 or t * (i + o) < i * o

    def sq_norms(self) -> dict[str, torch.Tensor]:
        bsz, g, t, i, o = self._dims
        out = {}
        if t == 1 and self._diags is not None:  # from the Grams g_i . gbar formed
            an, en = self._diags
            if self.w is not None:
                out[self.w] = an * en if g == 1 else (an * en).sum(0)
            if self.b is not None:
                out[self.b] = en if g == 1 else en.sum(0)
            return out
        if t == 1 and g == 1:  # ||g_i(W)||^2 = ||a_i||^2 ||e_i||^2, of the bias ||e_i||^2; e unscaled: c^2 after
            a, e = self._pair(0)
            en = torch.linalg.vector_norm(e, dim=1).square_()
            if self.e_scale != 1.0:
                en.mul_(self.e_scale**2)
            if self.w is not None:
                out[self.w] = torch.linalg.vector_norm(a, dim=1).square_().mul_(en)
            if self.b is not None:
                out[self.b] = en
            return out
        if t == 1:
            en = torch.linalg.vector_norm(self.e.reshape(bsz, g, o), dim=-1).square_()
            if self.w is not None:
                an = torch.linalg.vector_norm(self.a.reshape(bsz, g, i), dim=-1).square_()
                out[self.w] = an.mul_(en).sum(1)
        elif self.w is None:  # a frozen weight: the bias alone
            pass
        elif self._cache is None and self._ghost_is_cheaper():
            e = self._e_unscaled()  # (its factor c: c^2 on the rows, e not copied)
            aa = torch.matmul(self.a, self.a.transpose(-1, -2))  # (B, g, T, T)
            sq = aa.mul_(torch.matmul(e, e.transpose(-1, -2))).sum((1, 2, 3))
            out[self.w] = sq if self.e_scale == 1.0 else sq.mul_(self.e_scale**2)
        else:
            out[self.w] = torch.linalg.vector_norm(self._weight_grads().flatten(1), dim=1).square()
        if self.b is not None:
            out[self.b] = en.sum(1) if t == 1 else self._bias_grads().square().sum(1)
        return out

    def sq_total(self) -> torch.Tensor:
        """T = 1, one group, weight and bias: (||a_i||^2 + 1) ||e_i||^2, from the Grams' diagonals where g_i . gbar
        formed them, else by two row dots (float32 and float64; the squared norms' sum otherwise)."""
        _, g, t, _, _ = self._dims
        if t == 1 and g == 1 and self.w is not None and self.b is not None:
            if self._sq_total is not None:  # (formed with g_i . gbar)
                return self._sq_total
            if self._diags is None:
                a, e = self._pair(0)
                if a.dtype == e.dtype and a.dtype in (torch.float32, torch.float64):  # (e unscaled: c^2 after)
                    total = torch.linalg.vecdot(a, a).add_(1.0).mul_(torch.linalg.vecdot(e, e))
                    return total if self.e_scale == 1.0 else total.mul_(self.e_scale**2)
                sq = self.sq_norms()
                return sq[self.w].add_(sq[self.b])  # (the weight's row is formed anew for this call)
            an, en = self._diags
            return torch.addcmul(en, an, en)
        return super().sq_total()

    def gram(self) -> dict[str, torch.Tensor]:
        bsz, g, t, i, o = self._dims
        out = {}
        if t == 1:
            aa, ee = self._factor_grams()
            if self.w is not None:
                out[self.w] = (aa * ee).sum(0)
            if self.b is not None:
                out[self.b] = ee.sum(0)
            return out
        if self.w is not None:
            gw = self._weight_grads().reshape(bsz, -1)
            out[self.w] = gw @ gw.T
        if self.b is not None:
            gb = self._bias_grads()
            out[self.b] = gb @ gb.T
        return out

    def dot_mean(self) -> torch.Tensor:
        bsz, g, t, i, o = self._dims
        if self.w is None:  # a frozen weight: the bias alone
            gb = self._bias_grads()
            return gb @ gb.mean(0)
        if t == 1 and (self._grams is not None or factor_grams_cheaper(bsz, i, o)):
            if self._grams is not None:
                aa, ee = self._grams
                out = (aa * ee).sum(0).mean(1)
                if self.b is not None:
                    eb = self.e.reshape(bsz, g * o)
                    out = out + eb @ eb.mean(0)
                return out
            # the bias's share with the weight's: sum_j (a_i . a_j + 1)(e_i . e_j) / B
            shift, s2 = float(self.b is not None), self.e_scale**2  # the Grams of e unscaled: s^2 on the results
            if g == 1 and shift and bsz < 256:  # the usual layer: its squared norms come along (sq_total)
                a, e = self._pair(0)
                if a.dtype == e.dtype and a.dtype in (torch.float32, torch.float64):
                    rows, self._sq_total = _fused_gram_stats(a, e, s2)
                    return rows
            parts = [_hadamard_gram_rowsums(*self._pair(gi), shift) for gi in range(g)]
            rows, da, de = zip(*parts, strict=True)
            da, de = (da[0], de[0]) if g == 1 else (torch.stack(da), torch.stack(de))
            self._diags = (da, de if s2 == 1.0 else de.mul_(s2))
            return (rows[0] if g == 1 else torch.stack(rows).sum(0)).mul_(s2 / bsz)
        if t == 1 and self._cache is None:
            # g_i . gbar = e_i^T gbar_W a_i with gbar_W = E^T A / B (or the batch gradient autograd
            # computed, when the handler kept it): one or two plain products, no g_i formed
            parts = self.batch_grad_parts
            if g == 1 and parts is not None and len(parts[0]) == 1 and parts[0][0].shape == (o, i) and parts[1]:
                # e = c e (c = e_scale: s while e is unscaled, 1 once scaled), sum_i g_i = s W' (W' autograd's
                # weight gradient): g_i . gbar = (c s / B) e_i^T W' a_i + (c^2 / B) e_i . sum_j e_j
                (a, e), c, s = self._pair(0), self.e_scale, parts[1]
                w = parts[0][0]
                w = w if w.dtype == a.dtype else w.to(a.dtype)
                # the product with the smaller output, except a very narrow one (slow in BLAS: measured)
                out = torch.linalg.vecdot(e @ w, a) if o < 32 or i < o else torch.linalg.vecdot(a @ w.T, e)
                if self.b is not None:
                    out.add_(e @ e.sum(0), alpha=c / s)
                return out.mul_(c * s / bsz)
            total = self.batch_grad
            if total is not None and total.shape != (g * o, i):
                total = None
            out = None
            for gi in range(g):
                a, e = self.a[:, gi, 0], self.e[:, gi, 0]  # (B, i), (B, o)
                if total is None:
                    part = ((e @ (e.T @ a / bsz)) * a).sum(1)
                else:
                    part = ((a @ total[gi * o : (gi + 1) * o].to(a.dtype).T) * e).sum(1) / bsz
                out = part if out is None else out + part
            if self.b is not None:
                gb = self._bias_grads()
                out = out + gb @ gb.mean(0)
            return out
        parts = self.batch_grad_parts
        w = None  # gbar = s sum(parts) / B, autograd's weight gradient: no pass over the B g_i to average them
        if parts is not None and not self.transposed and all(p.shape == (g * o, i) for p in parts[0]):
            w = parts[0][0] if len(parts[0]) == 1 else sum(parts[0])
        if w is not None and self._projects_onto_gbar():
            gbar = {self.w: w * (parts[1] / bsz)}
            if self.b is not None:
                gbar[self.b] = self._bias_grads().mean(0)
            return self.project_many({"_": gbar})["_"]
        gw = self._weight_grads().reshape(bsz, -1)
        if w is not None:
            out = (gw @ w.reshape(-1).to(gw.dtype)).mul_(parts[1] / bsz)
        else:
            out = gw @ gw.mean(0)
        if self.b is not None:
            gb = self._bias_grads()
            out = out + gb @ gb.mean(0)
        return out

    def formed_now(self) -> bool:
        return self._cache is not None

    def project_many(self, directions):
        """sum_t e_t^T V_k a_t for all k in one matrix product per group: (B T, i) @ (i, K o); where another
        statistic formed g_i this step (T > 1: g_i . gbar, norms by the formed route, Gram entries), one
        (B, o i) @ (o i, K) product instead: B o i K multiply-adds, not B T o i K."""
        bsz, g, t, i, o = self._dims
        out: dict[str, torch.Tensor] = {}
        if self._cache is not None:
            keys, v = _stack(directions, self.w, (g * o * i,), self._cache.dtype)
            if keys:
                _add(out, keys, self._cache.reshape(bsz, -1) @ v.T)
        elif self.w is not None:
            # per direction one product (B T, i) @ (i, o) and one row dot per sample over its T o entries: no
            # stacked copy of the directions, no (B, T, K, o) product (measured 5-17% faster than those)
            keys = [k for k, d in directions.items() if d.get(self.w) is not None]
            e_all = self._e_unscaled()  # (its factor on the (B,) rows: e is not copied)
            for gi in range(g):
                a, e = self.a[:, gi].reshape(bsz * t, i), e_all[:, gi].reshape(bsz, t * o)
                for key in keys:
                    v = directions[key][self.w].reshape(g, o, i)[gi].to(a.dtype)
                    rows = torch.linalg.vecdot((a @ v.T).reshape(bsz, t * o), e)
                    rows = rows if self.e_scale == 1.0 else rows.mul_(self.e_scale)
                    out[key] = rows if key not in out else out[key] + rows
        if self.b is not None:
            keys, vb = _stack(directions, self.b, (-1,), self._e_unscaled().dtype)
            if keys:
                _add(out, keys, self._bias_grads() @ vb.T)
        return out

    def grads(self) -> dict[str, torch.Tensor]:
        bsz = self.a.shape[0]
        out = {self.w: self._weight_grads().reshape(bsz, *self.weight_shape)} if self.w is not None else {}
        if self.b is not None:
            out[self.b] = self._bias_grads()
        return out


class TransposedFactorView(FactorView):
    """The factor form of a layer z = a W + b whose weight is stored (i, o) (transformers' ``Conv1D``):
    g_i(W) = sum_t a_it e_it^T, the transpose of :class:`FactorView`'s. Norms, Gram entries and dot
    products with the mean do not depend on the layout; gradients and projections are transposed.

    Args:
        a: (B, 1, T, i) inputs. e: (B, 1, T, o) output gradients. weight_shape: (i, o).
    """

    transposed = True

    def __init__(self, a, e, weight_name, bias_name, weight_shape):
        super().__init__(a, e, weight_name, bias_name, (weight_shape[1], weight_shape[0]))
        self.stored_shape = tuple(weight_shape)

    def project_many(self, directions):
        flipped = {
            k: ({**d, self.w: d[self.w].reshape(self.stored_shape).T} if d.get(self.w) is not None else d)
            for k, d in directions.items()
        }
        return super().project_many(flipped)

    def grads(self) -> dict[str, torch.Tensor]:
        out = super().grads()
        if self.w is not None:
            out[self.w] = out[self.w].transpose(1, 2)
        return out


#: per device type, the most bytes of one convolution's per-sample gradients formed at once: more are formed
#: in chunks of examples and reduced chunk by chunk (squared norms, g_i . gbar), never B x D at once. On a CPU
#: a chunk that stays in cache keeps the cost linear in B (the 3C3D CNN's second layer at B = 512: 250 ms
#: formed at once, 130 ms in chunks, 16 x 7.3 ms at B = 32); elsewhere only memory bounds it
CONV_CHUNK_BYTES = {"cpu": 8 << 20}
_CONV_CHUNK_DEFAULT = 1 << 30


def chunk_rows(bsz: int, numel: int, like: torch.Tensor) -> int | None:
    """Examples per chunk when the per-sample gradients of ``bsz`` examples of a ``numel``-element weight
    (``like``'s dtype and device) exceed ``CONV_CHUNK_BYTES``; None when they fit at once. Chunks are of
    equal size but the last."""
    limit = CONV_CHUNK_BYTES.get(like.device.type, _CONV_CHUNK_DEFAULT)
    per_row = numel * like.element_size()
    if bsz * per_row <= limit:
        return None
    chunks = math.ceil(bsz * per_row / limit)
    return max(1, math.ceil(bsz / chunks))


def conv_bias_grads(out_grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, C_out): a convolution bias's g_i, each call's output gradients (B, C_out, ...) summed over their
    positions, summed over the calls."""
    return sum(e.flatten(2).sum(2) for e in out_grads)


class ConvView(MaterialisedView):
    """Conv1d/Conv2d. Per-sample weight gradients are formed only when asked (norms, Gram, dot with
    the mean) by one weight-gradient-sized product with the fastest exact kernel for the shape.
    Across the optimizer step the view keeps whichever is smaller, the formed g_i (projections are then
    a matrix-vector product) or the layer's input and output gradient (projections then go through the
    layer's own forward convolution: g_i . V = <conv(x_i; V), e_i>, no unfolded patches).

    Args:
        make_grads: (rows=None) -> {name: (B, *shape)} per-sample gradients of weight (and bias) of the
            examples ``rows`` (a slice; default all).
        inputs / out_grads: per call, the layer input and the output gradient of the per-sample losses.
        conv: ``conv(x, V)`` the layer's convolution with weight V and no bias.
        ghost: () -> the weight's ||g_i||^2 by the ghost form, or None (g_i are formed).
        total: () -> sum_i g_i of the weight by the weight-gradient kernel.
    """

    def __init__(
        self, make_grads, inputs, out_grads, conv, weight_name, bias_name, weight_numel, ghost=None, total=None
    ):
        super().__init__({})
        self.names = _present(weight_name, bias_name)
        self._make = make_grads
        self._inputs, self._out_grads, self._conv = inputs, out_grads, conv
        self.w, self.b = weight_name, bias_name
        self._weight_numel = weight_numel
        #: optional () -> ||g_i||^2 of the weight by the ghost form, for layers whose g_i is large and positions
        #: few (g_i . gbar is then <conv(x_i; gbar), e_i>): g_i is not formed
        self._ghost = ghost
        #: () -> sum_i g_i of the weight (the convolution's weight-gradient kernel), where the layer's own
        #: backward did not give it (``batch_grad``): gbar of the ghost and chunked paths
        self._total = total
        #: the chunked path's squared norms and g_i . gbar, once computed
        self._chunked: tuple[dict[str, torch.Tensor], torch.Tensor | None] | None = None
        #: the bias's g_i (B, C_out), once formed (its squared norms and g_i . gbar both read it)
        self._bias_g: torch.Tensor | None = None

    def _bias(self) -> torch.Tensor:
        if self._bias_g is None:
            self._bias_g = conv_bias_grads(self._out_grads)
        return self._bias_g

    def _gbar(self) -> torch.Tensor:
        """gbar of the weight: sum_i g_i from the layer's own backward, or the weight-gradient kernel, / B."""
        total = self.batch_grad
        if total is None:
            total = self._total()
        return total / self._inputs[0].shape[0]

    def _with_bias_sq(self, sq: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weight's ||g_i||^2 ``sq`` and the bias's."""
        return {self.w: sq} if self.b is None else {self.w: sq, self.b: self._bias().square().sum(1)}

    def _with_bias_dot(self, dm: torch.Tensor) -> torch.Tensor:
        """The weight's g_i . gbar ``dm`` plus the bias's."""
        if self.b is None:
            return dm
        gb = self._bias()
        return dm + gb @ gb.mean(0)

    def _rows(self) -> int | None:
        """Examples per chunk, when the squared norms and g_i . gbar are reduced chunk by chunk (the g_i of
        the whole batch exceed ``CONV_CHUNK_BYTES``, no ghost form, none formed yet, the kernels at hand)."""
        if self._g or self._ghost is not None or self._make is None or not self._inputs or self.w is None:
            return None
        if self.kept and self._keeps_grads():  # (release() forms them all anyway: once is enough)
            return None
        x = self._inputs[0]
        return chunk_rows(x.shape[0], self._weight_numel, x)

    def _keeps_grads(self) -> bool:
        """Whether :meth:`release` keeps the formed g_i: smaller than the factors (within 2x)."""
        bsz = self._inputs[0].shape[0]
        factors = sum(x.numel() + e.numel() for x, e in zip(self._inputs, self._out_grads, strict=True))
        return bsz * self._weight_numel <= 2 * factors

    def _chunk_stats(self, dot: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """||g_i||^2 per parameter and (with ``dot``) g_i . gbar, forming g_i for ``_rows()`` examples at a
        time: gbar from the layer's own backward (``batch_grad``) or the weight-gradient kernel."""
        if self._chunked is not None and (self._chunked[1] is not None or not dot):
            return self._chunked
        rows = self._rows()
        assert rows is not None
        bsz = self._inputs[0].shape[0]
        gbar = self._gbar().reshape(-1) if dot else None
        sq, dots, biases = [], [], []
        for start in range(0, bsz, rows):
            formed = self._make(slice(start, start + rows))
            if self.b is not None:
                biases.append(formed[self.b])
            g = formed[self.w]
            g = g.reshape(g.shape[0], -1)
            sq.append(torch.linalg.vector_norm(g, dim=1).square())
            if gbar is not None:
                dots.append(g @ gbar.to(g.dtype))
        if biases and self._bias_g is None:  # (formed with the chunks' weights: not summed again)
            self._bias_g = torch.cat(biases)
        self._chunked = (self._with_bias_sq(torch.cat(sq)), self._with_bias_dot(torch.cat(dots)) if dots else None)
        return self._chunked

    def sq_norms(self) -> dict[str, torch.Tensor]:
        if self._rows() is not None:
            return dict(self._chunk_stats(dot=False)[0])
        if self._g or self._ghost is None:
            return super().sq_norms()
        return self._with_bias_sq(self._ghost())

    def dot_mean(self) -> torch.Tensor:
        if self._rows() is not None:
            dm = self._chunk_stats(dot=True)[1]
            assert dm is not None
            return dm
        if self._g or self._ghost is None:
            return super().dot_mean()
        return self._with_bias_dot(self.project_many({"_": {self.w: self._gbar()}})["_"])

    def grads(self) -> dict[str, torch.Tensor]:
        if not self._g:
            self._g = self._make()
        return self._g

    def release(self) -> None:
        if not self._inputs:  # already released to g_i
            return
        if self._keeps_grads():
            self.grads()  # keep g_i: smaller than the factors (within 2x) and projections become cheap
            # the kernels' closures hold the inputs too: drop them, or the factors stay alive
            self._inputs, self._out_grads, self._make, self._ghost, self._total = [], [], None, None, None
        else:
            self._g = {}

    def project_many(self, directions):
        if self._g:
            return super().project_many(directions)
        out: dict[str, torch.Tensor] = {}
        keys = [k for k, d in directions.items() if d.get(self.w) is not None]
        for x, e in zip(self._inputs, self._out_grads, strict=True):
            for k in keys:
                p = (self._conv(x, directions[k][self.w].to(x.dtype)) * e).flatten(1).sum(1)
                out[k] = p if k not in out else out[k] + p
            if self.b is not None:
                bkeys, vb = _stack(directions, self.b, (-1,), e.dtype)
                if bkeys:
                    _add(out, bkeys, e.flatten(2).sum(2) @ vb.T)
        return out


#: the most elements of one (B, k, T, T') block of position pairs the embedding cross products form
_PAIR_BLOCK = 1 << 24


def lookup_cross(idx_l, u_l, idx_r, u_r) -> torch.Tensor:
    """sum_{t, t'} [tok_it == tok'_kt'] (u_it . u'_kt') for embedding lookups (B, T), (B, T, d) and
    (K, T'), (K, T', d): the B x K cross-Gram of the tables' gradients, without forming B x V x d.
    Probes are taken in blocks so that the (B, k, T, T') pairs stay below ``_PAIR_BLOCK`` elements."""
    bsz, t = idx_l.shape
    k, t2 = idx_r.shape
    u_r = u_r.to(u_l.dtype)
    step = max(1, _PAIR_BLOCK // max(1, bsz * t * t2))
    parts = []
    for lo in range(0, k, step):
        ir, ur = idx_r[lo : lo + step], u_r[lo : lo + step]
        same = idx_l[:, None, :, None] == ir[None, :, None, :]  # (B, k, T, T')
        uu = torch.einsum("isd,jtd->ijst", u_l, ur)
        parts.append((uu * same).sum((2, 3)))
    return torch.cat(parts, 1) if parts else u_l.new_zeros(bsz, 0)


def lookup_output_cross(idx, u, h, e) -> torch.Tensor:
    """<G_emb,i, G_out,k> = sum_{t in i, s in k} e_ks[tok_it] (u_it . h_ks): lookups (B, T), (B, T, d)
    against an output layer's inputs (K, S, d) and output gradients (K, S, V)."""
    bsz, t = idx.shape
    k = h.shape[0]
    m = torch.einsum("itd,ksd->ikts", u.to(h.dtype), h)
    n = e[:, :, idx.reshape(-1)].reshape(k, e.shape[1], bsz, t).permute(2, 0, 3, 1)  # (i, k, T, S)
    return (m * n.to(m.dtype)).sum((2, 3))


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
        return {self.w: lookup_cross(self.idx, self.e, self.idx, self.e)}

    def dot_mean(self) -> torch.Tensor:
        """g_i . gbar with gbar = (1/B) sum_j g_j formed as a table (rows added at the tokens looked up):
        sum_t gbar[idx_it] . e_it, O(B T d) instead of the B x B x T x T pairs of the Gram."""
        bsz, t, d = self.e.shape
        table = self.e.new_zeros(self.n, d).index_add_(0, self.idx.reshape(-1), self.e.reshape(-1, d))
        return (table[self.idx] * self.e).sum((1, 2)) / bsz

    def project_many(self, directions):
        out: dict[str, torch.Tensor] = {}
        for k, d in directions.items():
            v = d.get(self.w)
            if v is not None:
                out[k] = (v.to(self.e.dtype)[self.idx] * self.e).sum((1, 2))
        return out

    def grads(self) -> dict[str, torch.Tensor]:
        bsz, t, d = self.e.shape
        g = torch.zeros(bsz, self.n, d, dtype=self.e.dtype, device=self.e.device)
        g.scatter_add_(1, self.idx.unsqueeze(-1).expand(bsz, t, d), self.e)
        return {self.w: g}


class BagView(View):
    """Bags of lookups (``nn.EmbeddingBag``, sum or mean): element j of the step's bags looks up row v_j
    for bag (example) b_j and carries rows_j = c_j e_{b_j}, with c_j its weight in the bag (1 for a sum,
    its per-sample weight, 1/n_i for a mean over the n_i counted elements, 0 for padding_idx) and e_i
    the bag's output gradient, so that g_i = sum_{j: b_j = i} onehot(v_j) rows_j^T. Flat (N elements, no
    padding to the longest bag): squared norms add rows that look up the same row for the same bag
    first (a sort by (b, v)), g_i . gbar and projections gather the table's rows; the Gram and the
    per-sample gradients go through the padded (B, n_max) lookups of :class:`EmbeddingView`."""

    def __init__(self, v: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, bags: int, weight_name: str, n: int):
        self.v, self.b, self.rows = v, b, rows  # (N,), (N,), (N, d)
        self.bags, self.w, self.n = bags, weight_name, n
        self.names = (weight_name,)

    def _per_bag(self, per_element: torch.Tensor) -> torch.Tensor:
        return per_element.new_zeros(self.bags).index_add_(0, self.b, per_element)

    def sq_norms(self) -> dict[str, torch.Tensor]:
        if self.v.numel() == 0:
            return {self.w: self.rows.new_zeros(self.bags)}
        key = self.b * self.n + self.v
        key, order = torch.sort(key)
        new = torch.ones_like(key, dtype=torch.bool)
        new[1:] = key[1:] != key[:-1]
        run = torch.cumsum(new, 0) - 1  # (elements of one bag looking up one row share a run)
        summed = torch.zeros_like(self.rows).index_add_(0, run, self.rows[order])
        bag_of_run = torch.zeros_like(self.b).scatter_(0, run, self.b[order])  # (unused runs: 0, adding 0)
        sq = torch.linalg.vector_norm(summed, dim=1).square()
        return {self.w: sq.new_zeros(self.bags).index_add_(0, bag_of_run, sq)}

    def dot_mean(self) -> torch.Tensor:
        d = self.rows.shape[1]
        table = self.rows.new_zeros(self.n, d).index_add_(0, self.v, self.rows) / self.bags
        return self._per_bag((table[self.v] * self.rows).sum(1))

    def project_many(self, directions):
        out: dict[str, torch.Tensor] = {}
        for k, d in directions.items():
            vec = d.get(self.w)
            if vec is not None:
                out[k] = self._per_bag((vec.to(self.rows.dtype)[self.v] * self.rows).sum(1))
        return out

    def padded(self) -> EmbeddingView:
        """The same lookups as (B, n_max) indices and (B, n_max, d) rows (zero rows at index 0 pad the
        shorter bags); n_max is read on the host."""
        order = torch.sort(self.b, stable=True)[1]
        b, v, rows = self.b[order], self.v[order], self.rows[order]
        counts = torch.bincount(b, minlength=self.bags)
        width = int(counts.max()) if b.numel() else 0
        slot = torch.arange(b.numel(), device=b.device) - (torch.cumsum(counts, 0) - counts)[b]
        idx = torch.zeros(self.bags, width, dtype=v.dtype, device=v.device)
        idx[b, slot] = v
        e = rows.new_zeros(self.bags, width, rows.shape[1])
        e[b, slot] = rows
        return EmbeddingView(idx, e, self.w, self.n)

    def gram(self) -> dict[str, torch.Tensor]:
        return self.padded().gram()

    def grads(self) -> dict[str, torch.Tensor]:
        return self.padded().grads()


#: the most bytes of a tied table's B x V x d per-sample gradients formed at once: below it norms and g_i . gbar
#: take one product the size of the output layer's weight gradient and two passes over the formed g_i, where the
#: factor route takes that product (the projection onto gbar) and the ghost norms and cross terms besides
TIED_FORMED_BYTES = 64 << 20


class TiedEmbeddingView(View):
    """An embedding table W (V, d) that is also the weight of an output layer z_s = W h_s (+ b), as in
    language models with tied input and output embeddings.

    With tokens tok_t and embedding output gradients u_t (the lookups), and inputs h_s and output
    gradients e_s (V-dim) of the output layer, one sample's gradient of W is
        g = sum_t onehot(tok_t) u_t^T + sum_s e_s h_s^T,
    so ||g||^2 = ||G_emb||^2 + ||G_out||^2 + 2 sum_{t,s} e_s[tok_t] (u_t . h_s), and for two samples
    i, j the cross term is sum_{t in i, s in j} e_js[tok_it] (u_it . h_js). Projections add up.
    Where the B x V x d gradients fit in ``TIED_FORMED_BYTES`` they are formed (the output layer's, the
    lookups' rows added) for norms, g_i . gbar and Gram entries; larger tables are never formed.
    """

    def __init__(self, emb: EmbeddingView, out: FactorView):
        self.emb, self.out = emb, out
        self.w, self.b = emb.w, out.b
        self.names = tuple(n for n in (self.w, self.b) if n is not None)
        self._g: torch.Tensor | None = None  # the formed (B, V, d) g_i of W

    def _out_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, S, d) and e (B, S, V) of the output layer (one group)."""
        a, e = self.out.a, self.out.e
        return a.reshape(a.shape[0], -1, a.shape[-1]), e.reshape(e.shape[0], -1, e.shape[-1]).to(a.dtype)

    def _forms(self) -> bool:
        bsz, _, _, d, v = self.out._dims
        return v == self.emb.n and bsz * v * d * self.out.a.element_size() <= TIED_FORMED_BYTES

    def _formed(self) -> torch.Tensor:
        """(B, V, d): the output layer's g_i with the lookups' rows added (B V d; one product B S V d)."""
        if self._g is None:
            g = self.out._weight_grads()
            self.out._cache = None  # (taken over: the rows are added in place)
            bsz, v, d = g.shape
            rows = (self.emb.idx + torch.arange(0, bsz * v, v, device=g.device)[:, None]).reshape(-1)
            self._g = g.view(bsz * v, d).index_add_(0, rows, self.emb.e.reshape(-1, d).to(g.dtype)).view(bsz, v, d)
        return self._g

    def _bias_rows(self) -> dict[str, torch.Tensor]:
        return {self.b: self.out._bias_grads()} if self.b is not None else {}

    def _cross(self, pairs: str) -> torch.Tensor:
        """<G_emb,i, G_out,j> for i = j (``pairs="diag"``, shape B) or all i, j (shape B x B)."""
        h, e = self._out_factors()
        tok, u = self.emb.idx, self.emb.e.to(h.dtype)
        if pairs == "diag":
            m = torch.bmm(u, h.transpose(1, 2))  # (B, T, S): u_t . h_s
            n = torch.gather(e, 2, tok.unsqueeze(1).expand(-1, e.shape[1], -1))  # (B, S, T): e_s[tok_t]
            return (m * n.transpose(1, 2)).sum((1, 2))
        return lookup_output_cross(tok, u, h, e)

    def sq_norms(self) -> dict[str, torch.Tensor]:
        if self._g is not None or self._forms():
            out = {self.w: torch.linalg.vector_norm(self._formed().flatten(1), dim=1).square_()}
            return out | {n: gb.square().sum(1) for n, gb in self._bias_rows().items()}
        out = self.out.sq_norms()
        out[self.w] = self.emb.sq_norms()[self.w] + out[self.w] + 2 * self._cross("diag")
        return out

    def gram(self) -> dict[str, torch.Tensor]:
        if self._g is not None or self._forms():
            g = self._formed().flatten(1)
            return {self.w: g @ g.T} | {n: gb @ gb.T for n, gb in self._bias_rows().items()}
        out = self.out.gram()
        c = self._cross("all")
        out[self.w] = self.emb.gram()[self.w] + out[self.w] + c + c.T
        return out

    def _batch_grad(self) -> torch.Tensor:
        """sum_i g_i of W (V, d): autograd's gradient of the output layer (else one product) with the lookups'
        rows added, or the formed g_i summed."""
        total = self.out.batch_grad
        if total is None or total.shape != self.out.weight_shape:
            if self._g is not None:
                return self._g.sum(0)
            h, e = self._out_factors()
            total = e.reshape(-1, e.shape[-1]).T @ h.reshape(-1, h.shape[-1])
        u = self.emb.e.reshape(-1, self.emb.e.shape[-1]).to(total.dtype)
        return total.index_add_(0, self.emb.idx.reshape(-1), u)

    def dot_mean(self) -> torch.Tensor:
        bsz = self.emb.idx.shape[0]
        if self._g is not None or self._forms():
            g = self._formed().flatten(1)
            out = g @ self._batch_grad().reshape(-1).to(g.dtype).div_(bsz)
            for gb in self._bias_rows().values():
                out.add_(gb @ gb.mean(0))
            return out
        gbar = {self.w: self._batch_grad() / bsz}
        if self.b is not None:
            _, e = self._out_factors()
            gbar[self.b] = e.sum(1).mean(0)
        return self.project_many({"_": gbar})["_"]

    def formed_now(self) -> bool:
        return self._g is not None

    def project_many(self, directions):
        if self._g is not None:  # formed this step (by g_i . gbar, norms or Gram entries): B V d K multiply-adds
            out: dict[str, torch.Tensor] = {}
            keys, v = _stack(directions, self.w, (-1,), self._g.dtype)
            if keys:
                _add(out, keys, self._g.reshape(self._g.shape[0], -1) @ v.T)
            for name, gb in self._bias_rows().items():
                keys, vb = _stack(directions, name, (-1,), gb.dtype)
                if keys:
                    _add(out, keys, gb @ vb.T)
            return out
        out = self.out.project_many(directions)
        for k, p in self.emb.project_many(directions).items():
            out[k] = p if k not in out else out[k] + p
        return out

    def release(self) -> None:
        self._g = None
        self.out.release()

    def grads(self) -> dict[str, torch.Tensor]:
        if self._g is not None or self._forms():
            return {self.w: self._formed()} | self._bias_rows()
        out = self.out.grads()
        out[self.w] = out[self.w] + self.emb.grads()[self.w]
        return out


def tied_view(views: list[View]) -> View | None:
    """The factor form for a group of tied modules where it exists (an embedding whose table is the
    weight of one output layer applied without groups); None where the uses must be formed and added."""
    if len(views) != 2:
        return None
    emb = next((v for v in views if isinstance(v, EmbeddingView)), None)
    out = next((v for v in views if isinstance(v, FactorView)), None)
    if emb is None or out is None or out.w != emb.w or out.a.shape[1] != 1 or getattr(out, "transposed", False):
        return None
    return TiedEmbeddingView(emb, out)


# --- gradient accumulation: one layer's views over the micro-batches of a step ---------------------------
def _offsets(batches) -> list[int]:
    out = [0]
    for b in batches:
        out.append(out[-1] + int(b))
    return out


def joined_gram(
    parts,
    grams,
    factors,
    batches,
) -> dict[str, torch.Tensor]:
    """{name: (N, N)} Gram entries g_i . g_j over the N = sum_k B_k examples of an accumulated step.

    Micro-batch k's views (``parts[k]``, None where the layer got no gradient from it) hold the
    per-sample gradients g^(k) of its own backward; the step's are g_i = r_k g^(k)_i (``factors[k]``
    = r_k). Block (k, l) is r_k r_l g^(k)_i . g^(l)_j: the diagonal blocks are ``grams[k]`` (the
    micro-batch's own Gram, {name: (B_k, B_k)}, computed when it was reduced), the others the cross
    products of the two micro-batches' views (:func:`cockpit_lite.persample.cross.cross`, from the
    factors where the layer has a factor form). Rows of a micro-batch that did not reach the layer: 0.
    """
    from cockpit_lite.persample.cross import cross

    starts = _offsets(batches)
    n = starts[-1]
    like = next((g for gs in grams if gs for g in gs.values()), None)
    if like is None:
        return {}
    names = list(dict.fromkeys(name for gs in grams if gs for name in gs))
    out = {name: like.new_zeros(n, n) for name in names}
    rows = [slice(starts[k], starts[k + 1]) for k in range(len(batches))]
    for k, gs in enumerate(grams):
        for name, g in (gs or {}).items():
            out[name][rows[k], rows[k]] = g * (factors[k] * factors[k])
    for k in range(len(parts)):
        for m in range(k + 1, len(parts)):
            if parts[k] is None or parts[m] is None:
                continue
            for name, block in cross(parts[k], parts[m]).items():
                if name not in out:
                    continue
                block = block.to(like.dtype) * (factors[k] * factors[m])
                out[name][rows[k], rows[m]] = block
                out[name][rows[m], rows[k]] = block.T
    return out


class JoinedView(View):
    """One layer's per-sample gradients over the N = sum_k B_k examples of an accumulated step.

    Part k is the layer's view of micro-batch k (None: the layer got no gradient from it, zero rows);
    its per-sample gradients are those of micro-batch k's own backward, and the step's are
    g_i = r_k x them for i in micro-batch k (``factors[k]`` = r_k = N / B_k for a mean loss, 1 for a
    sum), so that p.grad = mean_i g_i (sum_i g_i) over the step. Rows are the micro-batches' examples
    in order. Squared norms scale by r_k^2, projections and g_i by r_k, Gram entries by r_k r_l (the
    blocks across micro-batches are cross products of their views, :func:`joined_gram`), and
    :meth:`cross` gives the (N, K) cross products with the views of other examples (TracIn's probes).
    """

    def __init__(self, parts, factors, batches):
        if len(parts) != len(factors) or len(parts) != len(batches):
            raise ValueError("JoinedView needs one part, factor and batch size per micro-batch")
        if all(p is None for p in parts):
            raise ValueError("JoinedView needs the view of at least one micro-batch")
        self.parts = list(parts)
        self.factors = [float(r) for r in factors]
        self.batches = [int(b) for b in batches]
        self.names = tuple(dict.fromkeys(n for p in self.parts if p is not None for n in p.names))

    @property
    def batch(self) -> int:
        return sum(self.batches)

    def _join(self, per_part, shape=()) -> dict[str, torch.Tensor]:
        """{key: (N, *shape)} from {key: (B_k, *shape)} per part (already scaled), zeros where absent."""
        keys = list(dict.fromkeys(k for d in per_part if d for k in d))
        out = {}
        for key in keys:
            like = next(d[key] for d in per_part if d and key in d)
            out[key] = torch.cat(
                [
                    d[key] if d and key in d else like.new_zeros((b, *like.shape[1:]))
                    for d, b in zip(per_part, self.batches, strict=True)
                ]
            )
        return out

    def sq_norms(self) -> dict[str, torch.Tensor]:
        return self._join(
            [
                None if p is None else {n: q * (r * r) for n, q in p.sq_norms().items()}
                for p, r in zip(self.parts, self.factors, strict=True)
            ]
        )

    def gram(self) -> dict[str, torch.Tensor]:
        grams = [None if p is None else p.gram() for p in self.parts]
        return joined_gram(self.parts, grams, self.factors, self.batches)

    def project_many(self, directions):
        return self._join(
            [
                None if p is None else {k: v * r for k, v in p.project_many(directions).items()}
                for p, r in zip(self.parts, self.factors, strict=True)
            ]
        )

    def grads(self) -> dict[str, torch.Tensor]:
        return self._join(
            [
                None if p is None else {n: g * r for n, g in p.grads().items()}
                for p, r in zip(self.parts, self.factors, strict=True)
            ]
        )

    def dot_mean(self) -> torch.Tensor:
        """g_i . gbar with gbar = (1/N) sum_i g_i over the step (forms the layer's g_i)."""
        grads = self.grads()
        gbar = {n: g.mean(0) for n, g in grads.items()}
        return self.project_many({"_": gbar})["_"]

    def release(self) -> None:
        for p in self.parts:
            if p is not None:
                p.release()

    def cross(self, other: View, projector=None) -> dict[str, torch.Tensor]:
        """{name: C} with C[i, j] = g_i . h_j for the step's N examples i and the examples j of
        ``other`` (a view of the same layer: probes, or another :class:`JoinedView`)."""
        from cockpit_lite.persample.cross import cross

        if isinstance(other, JoinedView):
            cols = [None if q is None else self.cross(q, projector) for q in other.parts]
            out = {}
            for name in dict.fromkeys(n for c in cols if c for n in c):
                like = next(c[name] for c in cols if c and name in c)
                out[name] = torch.cat(
                    [
                        c[name] * r if c and name in c else like.new_zeros(like.shape[0], b)
                        for c, r, b in zip(cols, other.factors, other.batches, strict=True)
                    ],
                    1,
                )
            return out
        return self._join(
            [
                None if p is None else {n: c * r for n, c in cross(p, other, projector).items()}
                for p, r in zip(self.parts, self.factors, strict=True)
            ]
        )


def view_bytes(view: View) -> int:
    """Bytes of the tensors a view keeps alive (its factors, formed g_i, caches), each storage once."""
    seen: set[tuple] = set()
    visited: set[int] = set()
    total = 0
    stack: list = [view]
    while stack:
        obj = stack.pop()
        if torch.is_tensor(obj):
            try:
                storage = obj.untyped_storage()
                key = (obj.device, storage.data_ptr())
                size = storage.nbytes()
            except (RuntimeError, NotImplementedError):  # a tensor without plain storage
                key, size = (obj.device, id(obj)), obj.numel() * obj.element_size()
            if key not in seen:
                seen.add(key)
                total += size
            continue
        if id(obj) in visited:
            continue
        visited.add(id(obj))
        if isinstance(obj, View):
            stack.extend(vars(obj).values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif callable(obj) and getattr(obj, "__closure__", None):  # a kernel closing over the factors
            stack.extend(c.cell_contents for c in obj.__closure__ if _filled(c))
    return total


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # an empty cell
        return False
    return True
