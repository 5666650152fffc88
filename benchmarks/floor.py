"""How far the cockpit is from the leanest code that computes the same numbers: a lower reference.

    python benchmarks/floor.py                   # MLP: economy-alpha, economy, TracIn (self, 100 probes)
    python benchmarks/floor.py --parts economy-alpha --optims sgd
    python benchmarks/floor.py --parts economy-alpha --optims sgd --models cnn   # the 3C3D CNN, B = 64

For the benchmark MLP (784-512-256-10, B = 128, an ``nn.Sequential`` of Linear and ReLU) this script
hand-writes the statistics of each configuration with nothing but the hooks and tensor operations they
need: no instrument objects, no step record, no records, no generality (Linear layers only, one call
each, one parameter group, biases present). It runs plain training, the cockpit and this lean
reference interleaved and prints each one's time per step as a ratio to plain training, and checks
that the lean reference reproduces the cockpit's numbers (largest relative difference), so both do
the same work.

The lean ratio is what exact per-step statistics cost on this machine with eager PyTorch; the gap
between it and the cockpit is the price of the cockpit's generality and bookkeeping. A target below the
lean ratio cannot be met by tuning the cockpit.

For the benchmark CNN (3C3D: 3 Conv2d + ReLU + MaxPool2d, Flatten, 3 Linear; B = 64) the same lean
reference covers economy minus Alpha (``--models cnn``, with ``--parts economy-alpha``): per conv
layer the cheaper exact route by multiply-adds (:func:`conv_costs`): formed per-sample gradients, by
the faster of two kernels with equal multiply-adds (one bmm of output gradients and unfolded patches,
or the convolution's weight-gradient kernel with the batch folded into the groups: timed once per
layer on the untimed warm-up step, as the difference is memory traffic), or the ghost form. ``--cnn-macs`` prints the
multiply-add count that its per-sample conv norms need at least, against the plain step's count,
and the route each conv layer takes (docs/performance.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cockpit_lite.instruments import Alpha, Distance, GradientTests, GradNorm, Loss, TracIn, UpdateSize  # noqa: E402
from common import (  # noqa: E402
    MODELS,
    OPTIMIZERS,
    interleaved,
    interleaved_times,
    make_batches,
    make_batches_of,
    paired_ratio,
    train_steps,
)

from cockpit_lite import Cockpit  # noqa: E402

QUANTILES = np.array([0.05, 0.25, 0.5, 0.75, 0.95])


def conv_costs(mod: nn.Conv2d, t: int) -> tuple[int, int]:
    """Multiply-adds per sample of ||g_i||^2 and g_i . gbar of a Conv2d weight with T output positions,
    i = C_in k_h k_w, o = C_out, U_i (i, T) its unfolded input, E_i (o, T) its output gradients:

    - formed: g_i = E_i U_i^T (T i o), its squared norm (i o) and its dot with gbar (i o);
    - ghost: ||g_i||^2 = sum_{t,s} (U_i^T U_i)_{ts} (E_i^T E_i)_{ts} (T^2 (i + o + 1)) and
      g_i . gbar = sum_t e_{i,t} . (gbar_W u_{i,t}) (T i o + T o).

    The bias (sum_t e_{i,t}) costs the same either way and is left out. Returns (formed, ghost).
    The projection onto gbar alone costs what forming g_i does, so with it the ghost form wins only
    where T^2 (i + o + 1) + T o < 2 i o: few output positions, T below about sqrt(2 i o / (i + o))."""
    i = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
    o = mod.out_channels
    return t * i * o + 2 * i * o, t * t * (i + o + 1) + t * i * o + t * o


def linear_costs(bsz: int, i: int, o: int) -> tuple[int, int]:
    """Multiply-adds of g_i . gbar for a (B, i) -> (B, o) Linear call: (from the factors' B x B Grams,
    B^2 (i + o); by one product with the batch weight gradient, B i o). The squared norms cost B (i + o)
    either way. The benchmark MLP's first two layers take the Grams, its last (256 -> 10) the product."""
    return bsz * bsz * (i + o), bsz * i * o


class LeanEconomy:
    """Loss (+ per-sample quantiles), GradNorm, UpdateSize, Distance and GradientTests for a
    Sequential of Linear, Conv2d (groups 1, dilation 1, zero padding) and parameter-free layers,
    biases included; with ``alpha=True`` (Linear layers only) the two per-sample projections Alpha
    needs (batch t onto d_t and onto d_{t-1}) and the means and variances its fit uses.

    Per layer, with a_i / U_i the input and e_i / E_i the output gradient of example i's own loss
    (B x the mean loss's output gradient):

    - Linear: ||g_i||^2 = (||a_i||^2 + 1) ||e_i||^2 in the backward hook, and g_i . gbar by the cheaper
      route by multiply-adds (:func:`linear_costs`, the cockpit's rule): from the B x B Grams,
      mean_j (a_i . a_j + 1)(e_i . e_j), in the backward hook, or by one product with the batch gradient,
      e_i . (gbar_W a_i) + e_i . gbar_b, in the optimizer's step pre-hook (the MLP's last layer);
    - Conv2d: the cheaper route of :func:`conv_costs`; formed: g_i = E_i U_i^T (by one bmm of the
      output gradients with the unfolded patches U_i, or by the convolution's weight-gradient kernel
      with the batch folded into the groups: the same multiply-adds, whichever is faster here, timed
      once per layer), its squared norm in the backward hook and g_i . gbar = g_i . p.grad in the
      optimizer's step pre-hook; ghost: the Grams' inner product in the backward hook and
      sum_t e_{i,t} . (gbar_W u_{i,t}) (one product of p.grad with the patches) in the pre-hook.
      The bias: b_i = sum_t e_{i,t}.

    ``route`` forces "formed" or "ghost" on every conv layer and ``kernel`` "bmm" or "conv" for the
    formed route, ``linear`` "gram" or "projection" on every Linear layer (tests); None picks by the
    counts and by timing. After each step ``last`` holds the
    tags' values, ``sq`` and ``dot`` the per-sample arrays, ``routes`` the route each conv and Linear
    layer took and ``kernels`` the formed kernel it uses.
    """

    def __init__(
        self,
        model: nn.Sequential,
        opt: torch.optim.Optimizer,
        loss_fn: nn.Module,
        alpha: bool,
        route: str | None = None,
        kernel: str | None = None,
        linear: str | None = None,
    ):
        self.lin = [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]
        self.conv = [m for m in self.lin if isinstance(m, nn.Conv2d)]
        if alpha and self.conv:
            raise ValueError("the lean Alpha projections are written for Linear layers only")
        for m in self.conv:
            if m.groups != 1 or m.dilation != (1, 1) or m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise ValueError(f"{m}: the lean reference takes groups 1, dilation 1 and numeric zero padding")
        self.params = [p for m in self.lin for p in (m.weight, m.bias)]
        self.theta0 = [p.detach().clone() for p in self.params]
        self.snap = [torch.empty_like(p) for p in self.params]
        self.diff = [torch.empty_like(p) for p in self.params]
        self.prev = [torch.zeros_like(p) for p in self.params] if alpha else None
        self.alpha, self.has_prev = alpha, False
        self.force, self.force_kernel, self.force_linear = route, kernel, linear
        self.kernels: dict[nn.Conv2d, str] = {}  # formed route: "bmm" or "conv", the faster here
        self.layer: dict[nn.Module, tuple] = {}
        #: layers whose g_i . gbar needs p.grad: (route, what it needs), taken in the step pre-hook
        self.pending: dict[nn.Module, tuple] = {}
        self.routes: dict[nn.Module, str] = {}
        self.last: dict[str, float] = {}
        self.hooks = [m.register_forward_hook(self._fwd) for m in self.lin]
        self.hooks += [
            loss_fn.register_forward_hook(self._loss),
            opt.register_step_pre_hook(self._pre),
            opt.register_step_post_hook(self._post),
        ]

    def close(self):
        for h in self.hooks:
            h.remove()

    def _fwd(self, mod, inp, out):
        a = inp[0].detach()
        bwd = self._conv_bwd if isinstance(mod, nn.Conv2d) else self._bwd
        out.register_hook(lambda g, mod=mod, a=a, bwd=bwd: bwd(mod, a, g))

    @torch.no_grad()
    def _bwd(self, mod, a, g):
        e = g * a.shape[0]  # output gradients of the per-sample losses (mean loss)
        gram, projection = linear_costs(*a.shape, e.shape[1])
        route = self.force_linear or ("gram" if gram < projection else "projection")
        self.routes[mod] = route
        if route == "gram":
            ga, ge = a @ a.T, e @ e.T
            sq = (ga.diagonal() + 1.0) * ge.diagonal()  # ||g_i||^2 of weight and bias
            dot = (ga + 1.0).mul_(ge).mean(1)  # g_i . gbar
        else:
            sq = (torch.linalg.vecdot(a, a) + 1.0).mul_(torch.linalg.vecdot(e, e))
            dot = None  # (in the step pre-hook)
            self.pending[mod] = ("projection", a, e)
        self.layer[mod] = (sq, dot, a, e) if self.alpha else (sq, dot)

    @staticmethod
    def _unfold(mod: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.unfold(x, mod.kernel_size, padding=mod.padding, stride=mod.stride)  # (B, C_in k k, T)

    @staticmethod
    def _formed_bmm(mod, x, e, u=None):
        """(B, C_out C_in k k): E_i U_i^T by one bmm of the output gradients with the unfolded patches."""
        u = LeanEconomy._unfold(mod, x) if u is None else u
        return torch.bmm(e.flatten(2), u.transpose(1, 2)).flatten(1)

    @staticmethod
    def _formed_conv(mod, x, e):
        """(B, C_out C_in k k): the same by the convolution's weight-gradient kernel with the batch folded
        into the groups (no unfolded patches: the same multiply-adds, less memory traffic)."""
        b = x.shape[0]
        shape = (b * mod.out_channels, mod.in_channels, *mod.kernel_size)
        gw = torch.nn.grad.conv2d_weight(
            x.reshape(1, -1, *x.shape[2:]), shape, e.reshape(1, -1, *e.shape[2:]), mod.stride, mod.padding, groups=b
        )
        return gw.reshape(b, -1)

    def _kernel(self, mod, x, e) -> str:
        """The faster of the two formed kernels for this layer, timed once (best of 3) on its first call:
        their multiply-adds are equal and the difference, the patches' memory traffic, is the machine's."""
        if self.force_kernel is not None:
            return self.force_kernel
        if mod not in self.kernels:
            best = {}
            for name, fn in (("bmm", self._formed_bmm), ("conv", self._formed_conv)):
                fn(mod, x, e)
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    fn(mod, x, e)
                    times.append(time.perf_counter() - t0)
                best[name] = min(times)
            self.kernels[mod] = min(best, key=best.get)
        return self.kernels[mod]

    @torch.no_grad()
    def _conv_bwd(self, mod, x, g):
        # g is the mean loss's output gradient, 1/B of example i's own: the norms are scaled by B^2 and
        # the dots by B at the end (B-vectors, not (B, C_out, H, W) tensors)
        gb = g.sum((2, 3))  # the bias's g_i / B
        route = self.force
        if route is None:
            formed, ghost = conv_costs(mod, g.shape[2] * g.shape[3])
            route = "ghost" if ghost < formed else "formed"
        self.routes[mod] = route
        if route == "formed":
            kernel = self._kernel(mod, x, g)
            gw = self._formed_bmm(mod, x, g) if kernel == "bmm" else self._formed_conv(mod, x, g)  # g_i / B
            sq = torch.linalg.vecdot(gw, gw)
            self.pending[mod] = ("formed", gw, gb)
        else:
            u, e = self._unfold(mod, x), g.flatten(2)
            sq = (u.transpose(1, 2) @ u).mul_(e.transpose(1, 2) @ e).sum((1, 2))
            self.pending[mod] = ("ghost", u, e, gb)
        b = x.shape[0]
        self.layer[mod] = (sq.add_(torch.linalg.vecdot(gb, gb)).mul_(b * b),)

    @torch.no_grad()
    def _loss(self, mod, args, out):
        self.per_sample = nn.functional.cross_entropy(args[0].detach(), args[1], reduction="none")
        self.loss = out.detach()

    @torch.no_grad()
    def _pre(self, opt, args, kw):
        for mod, (route, *held) in self.pending.items():
            gbar_w, gbar_b = mod.weight.grad, mod.bias.grad
            if route == "projection":  # a Linear layer: e_i . (gbar_W a_i) + e_i . gbar_b (e already scaled)
                a, e = held
                dot = (a @ gbar_w.T).mul_(e).sum(1).add_(e @ gbar_b)
                self.layer[mod] = (self.layer[mod][0], dot, *self.layer[mod][2:])
                continue
            if route == "formed":
                gw, gb = held
                dot = gw @ gbar_w.reshape(-1)
            else:
                u, e, gb = held
                dot = (gbar_w.reshape(gbar_w.shape[0], -1) @ u).mul_(e).sum((1, 2))
            self.layer[mod] = (self.layer[mod][0], dot.add_(gb @ gbar_b).mul_(gb.shape[0]))
        self.pending.clear()
        ps = [p.detach() for p in self.params]
        self.grad_norms = torch._foreach_norm([p.grad for p in self.params])
        torch._foreach_copy_(self.snap, ps)
        for p, t0, d in zip(ps, self.theta0, self.diff, strict=True):
            torch.sub(p, t0, out=d)
        self.dist = torch._foreach_norm(self.diff)

    @torch.no_grad()
    def _post(self, opt, args, kw):
        for p, s in zip(self.params, self.snap, strict=True):
            torch.sub(p.detach(), s, out=s)  # the update d_t
        upd = torch._foreach_norm(self.snap)
        sq = sum(v[0] for v in self.layer.values())
        dot = sum(v[1] for v in self.layer.values())
        parts = [torch.stack(self.grad_norms), torch.stack(self.dist), torch.stack(upd), sq, dot, self.per_sample]
        if self.alpha:
            proj = []
            for d in [self.snap] + ([self.prev] if self.has_prev else []):
                total = 0
                for li, mod in enumerate(self.lin):
                    a, e = self.layer[mod][2], self.layer[mod][3]
                    total = total + ((a @ d[2 * li].T) * e).sum(1) + e @ d[2 * li + 1]
                proj.append(total)
            parts += proj
            torch._foreach_copy_(self.prev, self.snap)
            self.has_prev = True
        v = torch.cat([t.reshape(-1) for t in parts]).double().numpy()
        n = len(self.params)
        b = len(self.per_sample)
        gn, dist, un = v[:n], v[n : 2 * n], v[2 * n : 3 * n]
        sq, dot, pl = v[3 * n : 3 * n + b], v[3 * n + b : 3 * n + 2 * b], v[3 * n + 2 * b : 3 * n + 3 * b]
        self.sq, self.dot = sq, dot
        g2 = dot.mean()
        denom = b * (b - 1) * g2
        out = {
            "loss": float(self.loss),
            "grad_norm": float(np.sqrt((gn**2).sum())),
            "distance": float(np.sqrt((dist**2).sum())),
            "update_size": float(np.sqrt((un**2).sum())),
            "tests/norm": float(np.sqrt(max(sq.sum() - b * g2, 0.0) / denom)),
            "tests/inner": float(np.sqrt(((dot - g2) ** 2).sum() / (denom * g2))),
            "tests/ortho": float(np.sqrt(max((sq - dot**2 / g2).sum(), 0.0) / denom)),
        }
        out.update({f"loss/per_sample/q{q}": x for q, x in zip(QUANTILES, np.quantile(pl, QUANTILES), strict=True)})
        if self.alpha:
            rest = v[3 * n + 3 * b :].reshape(-1, b)
            out["alpha/stats"] = [float(x) for r in rest for x in (r.mean(), r.var(ddof=1))]
        self.last = out


class LeanTracIn:
    """Online TracIn for a Sequential of Linear/ReLU under SGD with a mean loss: self-influence and,
    with probes, the B x K cross-Grams (a_i . a'_k)(e_i . e'_k) + e_i . e'_k per layer."""

    def __init__(self, model, opt, loss_fn, n: int, probes=None):
        self.model, self.opt = model, opt
        self.lin = [m for m in model if isinstance(m, nn.Linear)]
        self.probes = probes
        self.self_inf = np.zeros(n)
        self.infl = np.zeros((n, len(probes[1]))) if probes is not None else None
        self.idx: np.ndarray | None = None
        self.layer: dict[nn.Linear, tuple] = {}
        self.in_probe = False
        self.hooks = [m.register_forward_hook(self._fwd) for m in self.lin]
        self.hooks.append(opt.register_step_pre_hook(self._pre))

    def close(self):
        for h in self.hooks:
            h.remove()

    def _fwd(self, mod, inp, out):
        if self.in_probe:
            return
        a = inp[0].detach()
        out.register_hook(lambda g, mod=mod, a=a: self.layer.__setitem__(mod, (a, g.detach() * a.shape[0])))

    def _pre(self, opt, args, kw):
        w = opt.param_groups[0]["lr"] / len(self.idx)
        with torch.no_grad():
            sq = sum(((a * a).sum(1) + 1.0) * (e * e).sum(1) for a, e in self.layer.values())
            self.self_inf[self.idx] += (sq * w).double().numpy()
        if self.probes is None:
            return
        ins, outs = [], []

        def grab(mod, inp, out):
            ins.append(inp[0].detach())
            outs.append(out)

        self.in_probe = True
        hooks = [m.register_forward_hook(grab) for m in self.lin]
        try:
            pred = self.model(self.probes[0])
        finally:
            for h in hooks:
                h.remove()
            self.in_probe = False
        losses = nn.functional.cross_entropy(pred, self.probes[1], reduction="none")
        grads = torch.autograd.grad(losses.sum(), outs)
        with torch.no_grad():
            total = None
            for mod, ap, ep in zip(self.lin, ins, grads, strict=True):
                a, e = self.layer[mod]
                ee = e @ ep.T
                c = (a @ ap.T).mul_(ee).add_(ee)
                total = c if total is None else total.add_(c)
            self.infl[self.idx] += (total * w).double().numpy()


def _rel(ours: float, lean: float) -> float:
    return abs(ours - lean) / max(abs(ours), 1e-30)


def economy(optim: str, with_alpha: bool, steps: int, reps: int, model: str = "mlp", batch: int | None = None) -> dict:
    """Plain training, the cockpit and :class:`LeanEconomy` on ``model`` (a key of ``MODELS``; its own
    batch size unless ``batch``), timed interleaved: seconds per step of each and the largest relative
    difference between the cockpit's and the lean reference's values of the last step."""
    batches = make_batches(model, steps) if batch is None else make_batches_of(model, steps, batch)
    arms = {}
    for arm in ("plain", "cockpit", "lean"):
        torch.manual_seed(0)
        net = MODELS[model][0]()
        opt = OPTIMIZERS[optim](net.parameters())
        loss_fn = nn.CrossEntropyLoss()
        attached = None
        if arm == "cockpit":
            inst = [Loss(), GradNorm(), UpdateSize(), Distance(), GradientTests()] + ([Alpha()] if with_alpha else [])
            attached = Cockpit(net, opt, loss_fn, instruments=inst, sinks=[])
        elif arm == "lean":
            attached = LeanEconomy(net, opt, loss_fn, alpha=with_alpha)
        arms[arm] = (net, opt, loss_fn, attached)
    runners = {k: (lambda a=a: train_steps(a[0], a[1], a[2], batches)) for k, a in arms.items()}
    for r in runners.values():
        r()
    times = interleaved_times(runners, reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    cockpit, lean = arms["cockpit"][3], arms["lean"][3]
    # the cockpit's history is a step behind for Distance (theta before the step): compare the last step
    tags = ["loss", "grad_norm", "update_size", "distance", "tests/norm", "tests/inner", "tests/ortho"]
    diff = max(_rel(cockpit.history.last(t), lean.last[t]) for t in tags)
    for a in arms.values():
        if a[3] is not None:
            a[3].close()
    over = paired_ratio(times["cockpit"], times["lean"])
    return {
        "plain": med["plain"] / steps, "cockpit": med["cockpit"] / steps, "lean": med["lean"] / steps, "diff": diff,
        "over_lean": over[0], "over_lean_iqr": over[1:],
    }  # fmt: skip


class _Indexed(TensorDataset):
    """The same tensors, each batch with its dataset indices as a third item (what track() records)."""

    def __getitem__(self, idx):
        return (*super().__getitem__(idx), np.asarray(idx))


def tracin(with_probes: bool, steps: int, reps: int) -> dict:
    factory, data, batch = MODELS["mlp"]
    torch.manual_seed(0)
    n = steps * batch
    x_all, y_all = data(n), torch.randint(0, 10, (n,))
    torch.manual_seed(1)
    probes = (data(100), torch.randint(0, 10, (100,))) if with_probes else None
    gen = torch.Generator()
    arms = {}
    for arm in ("plain", "cockpit", "lean"):
        ds = (_Indexed if arm == "lean" else TensorDataset)(x_all, y_all)
        sampler = BatchSampler(RandomSampler(ds, generator=gen), batch, drop_last=True)
        loader = DataLoader(ds, batch_size=None, sampler=sampler)  # batches by list indexing: cheap
        torch.manual_seed(0)
        model = factory()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        loss_fn = nn.CrossEntropyLoss()
        attached = None
        if arm == "cockpit":
            tr = TracIn(probes=probes, write_scores=False)
            attached = Cockpit(model, opt, loss_fn, instruments=[tr], sinks=[])
        elif arm == "lean":
            attached = LeanTracIn(model, opt, loss_fn, n, probes)
        arms[arm] = (model, opt, loss_fn, attached, loader)

    def run(arm):
        model, opt, loss_fn, attached, loader = arms[arm]
        for item in attached.track(loader) if arm == "cockpit" else loader:
            x, y = item[0], item[1]
            if arm == "lean":
                attached.idx = np.asarray(item[2])  # the loader turned it into a tensor
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

    runners = {k: (lambda k=k: run(k)) for k in arms}
    for k in arms:  # one epoch each on the same shuffle: the scores must agree
        gen.manual_seed(0)
        runners[k]()
    lean = arms["lean"][3]
    diff = float(np.abs(tr.self_influence() - lean.self_inf).max() / np.abs(lean.self_inf).max())
    if with_probes:
        diff = max(diff, float(np.abs(tr.influence() - lean.infl).max() / np.abs(lean.infl).max()))
    med = interleaved(runners, reps)
    for a in arms.values():
        if a[3] is not None:
            a[3].close()
    return {"plain": med["plain"] / steps, "cockpit": med["cockpit"] / steps, "lean": med["lean"] / steps, "diff": diff}


def cnn_macs(n_probes: int = 100) -> None:
    """Multiply-adds per step of the benchmark CNN (B = 64) against the least that exact per-sample
    statistics need: the per-sample conv norms, per layer min(materialised B C_out C_in k^2 P, ghost
    B P^2 (C_out + C_in k^2)); and for TracIn with probes the probes' forward and backward to the layer
    outputs plus their own per-sample conv gradients."""
    model, data, b = MODELS["cnn"]
    m = model()
    x = data(b)
    fwd, norms, first = 0, 0, None
    for layer in m:
        y = layer(x)
        if isinstance(layer, nn.Conv2d):
            p = y.shape[2] * y.shape[3]
            k = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
            mat = b * layer.out_channels * k * p
            ghost = b * p * p * (layer.out_channels + k)
            fwd += mat
            norms += min(mat, ghost)
            first = mat if first is None else first
            print(f"  {layer}: forward {mat / 1e6:7.0f} M, per-sample norms >= {min(mat, ghost) / 1e6:6.0f} M")
            lf, lg = (b * c for c in conv_costs(layer, p))
            route = "ghost" if lg < lf else "formed"
            print(f"    norms and g_i . gbar: formed {lf / 1e6:.0f} M, ghost {lg / 1e6:.0f} M -> LeanEconomy {route}")
        elif isinstance(layer, nn.Linear):
            fwd += b * layer.in_features * layer.out_features
        x = y
    plain = 3 * fwd - first  # forward, weight gradients, input gradients (none for the first layer)
    probes = n_probes / b * (2 * fwd - first + norms)  # forward, input gradients, per-sample conv gradients
    print(f"  plain step {plain / 1e9:.2f} G multiply-adds; per-sample conv norms at least {norms / 1e9:.2f} G")
    print(f"  -> at the plain step's own speed, per-sample conv norms alone cost {1 + norms / plain:.2f}x")
    print(
        f"  -> TracIn with {n_probes} probes: their pass and per-sample conv gradients {probes / 1e9:.2f} G, "
        f"with the batch's norms at least {1 + (norms + probes) / plain:.2f}x before any cross product"
    )


def gpt_floor(model_name: str = "gpt", reps: int = 3) -> dict:
    """The least work exact per-sample statistics need on the small GPT (B = 16, T = 128), counted and
    timed. Every Linear call (B, T, i) -> (B, T, o) is seen by a forward hook; per layer the cheaper
    route by multiply-adds: per-sample squared norms min(ghost B T^2 (i + o), formed B T i o);
    norms and g_i . gbar together the formed B T i o (a projection onto gbar costs B T i o as well,
    so the ghost route only adds work). The plain step: 3 x the Linear multiply-adds (forward, weight
    and input gradients) and 3 x the attention products (2 B T^2 d per layer forward).

    Then the same kernels are timed at the real shapes (random factors, 1 thread), interleaved with
    plain steps: the ratio 1 + kernels / plain step is what these statistics cost with no hook,
    bookkeeping or memory traffic beyond the kernels themselves."""
    import statistics

    build, data, b = MODELS[model_name]
    torch.manual_seed(0)
    model = build()
    opt = OPTIMIZERS["adam"](model.parameters())
    shapes: list[tuple[int, int, int, int]] = []

    def hook(mod, inp, out):
        x = inp[0]
        shapes.append((x.shape[0], x[0].numel() // x.shape[-1], mod.in_features, mod.out_features))

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    batches = make_batches(model_name, 1)
    x, y = batches[0]
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    n_layers = sum(1 for m in model.modules() if type(m).__name__ == "CausalSelfAttention")
    d = shapes[0][2]
    attn = [(b, shapes[0][1], d)] * n_layers
    lin = sum(bb * t * i * o for bb, t, i, o in shapes)
    att = sum(2 * bb * t * t * dd for bb, t, dd in attn)
    plain = 3 * lin + 3 * att
    ghost = [bb * t * t * (i + o) for bb, t, i, o in shapes]
    formed = [bb * t * i * o for bb, t, i, o in shapes]
    norms = sum(min(g, f) for g, f in zip(ghost, formed, strict=True))
    dots = sum(formed)
    print(f"{model_name} (B = {b}, T = {shapes[0][1]}): {len(shapes)} Linear calls, {n_layers} attention layers")
    print(
        f"  plain step {plain / 1e9:.2f} G multiply-adds (Linear {3 * lin / 1e9:.2f} G, "
        f"attention {3 * att / 1e9:.2f} G)"
    )
    print(f"  per-sample norms at least {norms / 1e9:.2f} G -> {1 + norms / plain:.3f}x at the plain step's speed")
    print(f"  norms and g_i . gbar at least {dots / 1e9:.2f} G -> {1 + dots / plain:.3f}x at the plain step's speed")

    factors = [(torch.randn(bb, t, i), torch.randn(bb, t, o)) for bb, t, i, o in shapes]

    def norm_kernels():
        for (a, e), g, f in zip(factors, ghost, formed, strict=True):
            if g < f:
                aa, ee = a @ a.transpose(1, 2), e @ e.transpose(1, 2)
                torch.linalg.vecdot(aa.flatten(1), ee.flatten(1))
            else:
                torch.linalg.vector_norm(torch.bmm(e.transpose(1, 2), a).flatten(1), dim=1)

    def dot_kernels():
        for a, e in factors:
            gw = torch.bmm(e.transpose(1, 2), a).flatten(1)
            gw @ gw.mean(0)
            torch.linalg.vector_norm(gw, dim=1)

    def plain_step():
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    times: dict[str, list[float]] = {"plain": [], "norms": [], "dots": []}
    for fn in (plain_step, norm_kernels, dot_kernels):
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in (("plain", plain_step), ("norms", norm_kernels), ("dots", dot_kernels)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"  timed ({reps} interleaved reps, medians): plain step {med['plain'] * 1e3:.0f} ms")
    print(f"  per-sample norm kernels {med['norms'] * 1e3:.0f} ms -> {1 + med['norms'] / med['plain']:.3f}x")
    print(f"  norm and g_i . gbar kernels {med['dots'] * 1e3:.0f} ms -> {1 + med['dots'] / med['plain']:.3f}x")
    return {
        "plain_gmacs": plain / 1e9,
        "norms_bound": 1 + norms / plain,
        "dots_bound": 1 + dots / plain,
        "norms_timed": 1 + med["norms"] / med["plain"],
        "dots_timed": 1 + med["dots"] / med["plain"],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="economy-alpha,economy,tracin-self,tracin-probes")
    ap.add_argument("--optims", default="sgd,adam")
    ap.add_argument(
        "--models", default="mlp", help="mlp and/or cnn (the CNN has a lean reference for economy-alpha only)"
    )
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cnn-macs", action="store_true")
    ap.add_argument(
        "--gpt-floor", action="store_true", help="the small GPT's least per-sample work, counted and timed (only)"
    )
    args = ap.parse_args(argv)
    if args.gpt_floor:
        torch.set_num_threads(args.threads)
        return [gpt_floor("gpt", args.reps)]
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.reps} interleaved reps x {args.steps} steps")
    print(f"{'part':26} {'plain ms':>9} {'cockpit x':>10} {'lean x':>7} {'max rel diff':>13}  cockpit / lean by rep")
    rows = []

    def report(name: str, r: dict) -> None:
        rows.append({"part": name, **r})
        paired = ""
        if "over_lean" in r:  # per round: the cockpit's time over the lean reference's, median [quartiles]
            paired = f"  {r['over_lean']:.3f} [{r['over_lean_iqr'][0]:.3f}, {r['over_lean_iqr'][1]:.3f}]"
        print(
            f"{name:26} {r['plain'] * 1e3:9.2f} {r['cockpit'] / r['plain']:10.2f} {r['lean'] / r['plain']:7.2f} "
            f"{r['diff']:13.1e}{paired}",
            flush=True,
        )

    for part in args.parts.split(","):
        if part.startswith("economy"):
            for model in args.models.split(","):
                if model not in ("mlp", "cnn"):
                    raise SystemExit(f"unknown model {model!r}")
                if model == "cnn" and part != "economy-alpha":
                    continue
                for optim in args.optims.split(","):
                    r = economy(optim, part == "economy", args.steps, args.reps, model)
                    report(f"{model} {optim} {part}", r)
        elif part.startswith("tracin"):
            if "mlp" not in args.models.split(","):
                continue
            report(f"mlp sgd {part}", tracin(part == "tracin-probes", args.steps, args.reps))
        else:
            raise SystemExit(f"unknown part {part!r}")
    if args.cnn_macs:
        print("CNN (benchmarks/common.py), B = 64:")
        cnn_macs()
    return rows


if __name__ == "__main__":
    main()
