"""The cost of per-sample statistics, cockpit-lite against its peers, on the models people train (issue 15).

    python benchmarks/peers.py                               # every model and row, then the table
    python benchmarks/peers.py --models mlp,lm --rows norms,economy-alpha,func-norms,floor --reps 5
    python benchmarks/peers.py --sweep                       # B-sweep: MLP B = 32 ... 2048, CNN to 512
    python benchmarks/peers.py --reps 1 --steps 1            # a smoke run: does every row run?

One run per model (benchmarks/common.py): the MLP 784-512-256-10 (B = 128), the 3C3D CNN (B = 64),
the small transformer LM ``lm`` (nanoGPT, 2 layers, d = 256, T = 64, B = 16, tied embeddings, SDPA
attention; ``lm-eager``, not in the default list: the same with explicit attention), the
small GPT ``gpt`` (4 layers, d = 256, T = 128, B = 16, tied embeddings) and ResNet-18 on 32x32
(B = 32, BatchNorm in train mode). Every row owns a copy of the model (same initial weights), its
optimizer and its instrumentation; blocks of --steps training steps run interleaved over --reps
repetitions, and each row's median time per step is printed as a ratio to a plain step of the same
model measured in the same run. Rows (``--rows``):

- ``norms``: cockpit-lite with the PerSampleGradNorms instrument alone;
- ``economy-alpha``: the ``economy`` preset without Alpha; ``economy``: the preset;
- ``economy@5%``: the preset with ``Cockpit(..., budget=0.05)``, where this checkout has the budget;
- ``backpack``: BackPACK's ``BatchL2Grad`` (``extend`` + ``with backpack(...)`` around backward);
- ``opacus``: Opacus' ghost-clipping module (``GradSampleModuleFastGradientClipping``, ghost norms
  for Linear and Embedding, per-sample gradients for the rest), its per-sample norms read each step;
- ``func-norms`` / ``func-norms-dot``: torch.func ``vmap(grad)``, norms and norms + g_i . gbar
  (common.FuncNorms, as in benchmarks/overhead.py);
- ``cockpit-1.0.2``: Cockpit 1.0.2's economy: not installable here (no number is made up);
- ``floor``: hand-written per-sample squared norms by forward/backward hooks (:class:`GhostNorms`),
  the least code that computes them: the floor of the ``norms`` row.

Every peer computes ||g_i||^2 with g_i the gradient of example i's own loss (B times its share of the
mean loss's gradient: BackPACK's squared norms are multiplied by B^2, Opacus is told the loss is a
mean). Before timing, each row's numbers from its first step are checked against a float64 loop over the
examples (float32 for ResNet-18: ``CHECK_DTYPE``), one autograd call each on the batch's graph, and the
largest relative difference is printed; a row that disagrees is marked in the table, never timed
silently, and a row that raises is reported as "cannot run: <reason>". The B-sweep (``--sweep``) times
plain training and the rows named by --rows (default ``norms,economy-alpha``) on the MLP and the CNN at
growing batch sizes, without the check (the main table checks the same rows).

Progress goes to stderr; the tables are printed at the end. ``--json out.json`` appends the rows
(with ``--round``) to that file, as docs/overhead.json holds its rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    MODELS,
    OPTIMIZERS,
    FuncNorms,
    interleaved,
    loss_module,
    make_batches,
    make_batches_of,
    train_steps,
)

from cockpit_lite import Cockpit  # noqa: E402

#: row key -> the label of the issue's table
ROWS = {
    "norms": "cockpit-lite per-sample norms",
    "economy-alpha": "cockpit-lite economy minus Alpha",
    "economy": "cockpit-lite economy",
    "economy@5%": "cockpit-lite economy @5%",
    "backpack": "BackPACK BatchL2Grad",
    "opacus": "Opacus ghost norms",
    "func-norms": "torch.func vmap: norms",
    "func-norms-dot": "torch.func vmap: norms + g_i . gbar",
    "cockpit-1.0.2": "Cockpit 1.0.2 economy",
    "floor": "hand-written ghost norms (floor of norms)",
}

#: model key -> column title
TITLES = {
    "mlp": "MLP 784-512-256-10, B=128",
    "cnn": "3C3D CNN, B=64",
    "lm": "small transformer LM (2 layers, d=256, T=64, B=16)",
    "lm-eager": "the same LM, explicit attention (flash=False)",
    "gpt": "small GPT (4 layers, d=256, T=128, B=16)",
    "resnet18": "ResNet-18 32x32, B=32, train BatchNorm",
}

#: batch sizes of the B-sweep
SWEEP = {"mlp": (32, 128, 512, 2048), "cnn": (32, 128, 512)}

#: the loop reference's dtype where float64 is too slow for one check (B backward passes through
#: ResNet-18's float64 convolutions take minutes on one core; float32 is good to about 1e-5 here)
CHECK_DTYPE = {"resnet18": torch.float32}

#: largest relative difference (to the largest |value| over the batch) a float32 row may have
RTOL = 1e-3

BUDGET_MISSING = "budget mode not available in this checkout"
COCKPIT_MISSING = "not installable here"
COCKPIT_WHY = "cockpit-for-pytorch 1.0.2 is not on this machine's package registry; no figure is measured for it"


class CannotRun(Exception):
    """A peer does not run on a model; the message says why."""


@dataclass
class Arm:
    """One row on one model: what a training step calls and how its per-sample numbers are read.

    ``sq_norms()`` / ``dots()`` give the last step's ||g_i||^2 and g_i . gbar (None: not computed
    there); ``inner()`` the cockpit's inner-product test, which rests on its g_i . gbar."""

    model: nn.Module
    opt: torch.optim.Optimizer
    loss_fn: nn.Module
    after_backward: Callable[[torch.Tensor, torch.Tensor], Any] | None = None
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    sq_norms: Callable[[], np.ndarray | None] = lambda: None
    dots: Callable[[], np.ndarray | None] = lambda: None
    inner: Callable[[], float | None] = lambda: None
    close: Callable[[], None] = lambda: None
    note: str = ""

    def run(self, batches: list) -> None:
        with self.context():
            train_steps(self.model, self.opt, self.loss_fn, batches, self.after_backward)


# --- the hand-written floor ----------------------------------------------------------------------------
class GhostNorms:
    """Per-sample squared gradient norms ||g_i||^2 of Linear, Conv2d, Embedding and LayerNorm layers
    by plain forward and backward hooks, the leanest exact code: the floor of the ``norms`` row.

    A layer's input a and output gradient e (scaled by B: the gradient of each example's own loss
    under a mean loss) give, per example, with T positions (T = 1 for a plain Linear layer):

    - Linear, T = 1: ||g_i||^2 = ||a_i||^2 ||e_i||^2 (weight), ||e_i||^2 (bias);
    - Linear, T > 1: the ghost form sum_{s,t} (a_is . a_it)(e_is . e_it) (B T^2 (d_in + d_out)
      multiply-adds) or the formed g_i = e_i^T a_i (B T d_in d_out), whichever needs fewer;
      bias ||sum_t e_it||^2;
    - Conv2d: the same with a = the unfolded input (C_in k^2 x P positions), e = (C_out x P);
    - Embedding: sum_{s,t} [id_s = id_t] (e_is . e_it), or the formed rows scattered into V x d;
      a lookup shared by every example (positions ``wpe(arange(T))``) has its output expanded over
      the batch in the forward hook, so its output gradient stays per example;
    - LayerNorm: g_i = sum_t e_it * xhat_it (weight), sum_t e_it (bias), formed (B T d).

    A parameter used by several layers (tied embeddings) has its per-sample gradient formed and
    summed over its uses. Any other layer with parameters (train-mode BatchNorm: the output
    gradients mix the examples) is refused with :class:`CannotRun`.
    """

    RULES = (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm)

    def __init__(self, model: nn.Module):
        own = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
        other = sorted({type(m).__name__ for m in own if not isinstance(m, self.RULES)})
        if other:
            why = " (train-mode BatchNorm couples the samples)" if any("BatchNorm" in o for o in other) else ""
            raise CannotRun(f"no hand-written rule for {', '.join(other)}{why}")
        for m in own:
            if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)):
                raise CannotRun(f"{m}: only groups=1, zero padding given as numbers")
            if isinstance(m, nn.Embedding) and (m.scale_grad_by_freq or m.sparse):
                raise CannotRun(f"{m}: scale_grad_by_freq / sparse")
        uses = Counter(id(p) for m in own for p in m.parameters(recurse=False) if p.requires_grad)
        self.tied = {k for k, n in uses.items() if n > 1}
        self.hooks = [model.register_forward_pre_hook(self._begin)]
        self.hooks += [m.register_forward_hook(self._forward) for m in own]
        self.batch, self.ndim = 0, 0
        self.sq: list[torch.Tensor] = []
        self.formed: dict[int, torch.Tensor] = {}
        self.seen: set[nn.Module] = set()
        self.last: torch.Tensor | None = None

    def close(self) -> None:
        for h in self.hooks:
            h.remove()

    def _begin(self, module: nn.Module, args: tuple) -> None:
        self.batch, self.ndim = args[0].shape[0], args[0].dim()
        self.sq, self.formed, self.seen = [], {}, set()

    def _forward(self, mod: nn.Module, inp: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if not torch.is_grad_enabled():
            return None
        if mod in self.seen:
            raise CannotRun(f"{type(mod).__name__} called twice in one step")
        self.seen.add(mod)
        a, new = inp[0].detach(), None
        if isinstance(mod, nn.Embedding) and a.dim() < self.ndim:  # one lookup for every example
            new = out = out.unsqueeze(0).expand(self.batch, *out.shape)
            a = a.unsqueeze(0).expand(self.batch, *a.shape)
        out.register_hook(lambda g, mod=mod, a=a: self._backward(mod, a, g))
        return new

    def _put(self, p: nn.Parameter | None, formed: Callable[[], torch.Tensor], sq: Callable[[], torch.Tensor]) -> None:
        if p is None or not p.requires_grad:
            return
        if id(p) in self.tied:
            g = formed().reshape(self.batch, *p.shape)
            self.formed[id(p)] = g if id(p) not in self.formed else self.formed[id(p)] + g
        else:
            self.sq.append(sq())

    @torch.no_grad()
    def _backward(self, mod: nn.Module, a: torch.Tensor, g: torch.Tensor) -> None:
        e = g * self.batch
        b = self.batch
        if isinstance(mod, nn.Linear):
            a3, e3 = a.reshape(b, -1, a.shape[-1]).to(e.dtype), e.reshape(b, -1, e.shape[-1])
            self._factor_pair(mod, a3, e3)
        elif isinstance(mod, nn.Conv2d):
            u = F.unfold(a, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # (B, C_in k^2, P)
            self._factor_pair(mod, u.transpose(1, 2), e.flatten(2).transpose(1, 2))
        elif isinstance(mod, nn.Embedding):
            ids = a.reshape(b, -1)
            e3 = e.reshape(b, ids.shape[1], -1)
            if mod.padding_idx is not None:
                e3 = e3 * (ids != mod.padding_idx).unsqueeze(-1)
            t, d, v = ids.shape[1], e3.shape[2], mod.num_embeddings

            def formed() -> torch.Tensor:
                return e3.new_zeros(b, v, d).scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, d), e3)

            def ghost() -> torch.Tensor:
                same = ids.unsqueeze(2) == ids.unsqueeze(1)
                return (torch.bmm(e3, e3.transpose(1, 2)) * same).sum((1, 2))

            cheaper = (lambda: formed().square().sum((1, 2))) if t * d + v * d <= t * t * (d + 1) else ghost
            self._put(mod.weight, formed, cheaper)
        elif isinstance(mod, nn.LayerNorm):
            dims = tuple(range(a.dim() - len(mod.normalized_shape), a.dim()))
            mean, var = a.mean(dims, keepdim=True), a.var(dims, unbiased=False, keepdim=True)
            xhat = (a - mean) * torch.rsqrt(var + mod.eps)
            shape = (b, -1, *mod.normalized_shape)
            gw = (e * xhat).reshape(shape).sum(1)
            gb = e.reshape(shape).sum(1)
            self._put(mod.weight, lambda: gw, lambda: gw.flatten(1).square().sum(1))
            self._put(mod.bias, lambda: gb, lambda: gb.flatten(1).square().sum(1))

    def _factor_pair(self, mod: nn.Module, a3: torch.Tensor, e3: torch.Tensor) -> None:
        """A layer whose per-sample weight gradient is g_i = sum_t e_it a_it^T: a3 (B, T, d_in), e3
        (B, T, d_out); the bias gradient sum_t e_it."""
        t, d_in, d_out = a3.shape[1], a3.shape[2], e3.shape[2]

        def formed() -> torch.Tensor:
            return torch.bmm(e3.transpose(1, 2), a3)

        if t == 1:
            sq = lambda: a3.square().sum((1, 2)) * e3.square().sum((1, 2))  # noqa: E731
        elif t * d_in * d_out <= t * t * (d_in + d_out):
            sq = lambda: formed().square().sum((1, 2))  # noqa: E731
        else:
            sq = lambda: (torch.bmm(a3, a3.transpose(1, 2)) * torch.bmm(e3, e3.transpose(1, 2))).sum((1, 2))  # noqa: E731
        self._put(mod.weight, formed, sq)
        gb = e3.sum(1)
        self._put(mod.bias, lambda: gb, lambda: gb.square().sum(1))

    def __call__(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """The step's ||g_i||^2 (B,): call after backward."""
        total = sum(self.sq) + sum(g.flatten(1).square().sum(1) for g in self.formed.values())
        self.last = total
        return total


# --- the rows ---------------------------------------------------------------------------------------------
#: what a row starts from: a fresh (model, optimizer, loss module), the same initial weights each call
Start = Callable[[], tuple[nn.Module, torch.optim.Optimizer, nn.Module]]


def starter(model_name: str, optim: str) -> Start:
    """The benchmark model ``model_name`` (seed 0) with ``optim`` and its loss module."""
    return lambda: _start(model_name, optim)


def _start(model_name: str, optim: str) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module]:
    torch.manual_seed(0)
    model = MODELS[model_name][0]()
    loss_fn = loss_module(model_name)
    if loss_fn is None:
        raise SystemExit(f"{model_name}: the peers need a loss module (use a model without the loss inside forward)")
    return model, OPTIMIZERS[optim](model.parameters()), loss_fn


def _numpy(t: Any) -> np.ndarray | None:
    if t is None:
        return None
    return t.detach().double().numpy() if torch.is_tensor(t) else np.asarray(t, dtype=np.float64)


def _cockpit(start: Start, instruments: Any, **kw: Any) -> Arm:
    model, opt, loss_fn = start()
    cockpit = Cockpit(model, opt, loss_fn, instruments=instruments, sinks=[], **kw)

    def sq() -> np.ndarray | None:
        # the record of the step just taken (a step that skipped the norms has none of its own)
        latest = cockpit.history.latest("persample/grad_norm")
        if latest is None or latest[0] != cockpit.step - 1:
            return None
        return np.asarray(latest[1], dtype=np.float64) ** 2

    def inner() -> float | None:
        latest = cockpit.history.latest("tests/inner")
        return None if latest is None or latest[0] != cockpit.step - 1 else float(latest[1])

    return Arm(model, opt, loss_fn, sq_norms=sq, inner=inner, close=cockpit.close)


def _economy_minus_alpha() -> list:
    from cockpit_lite.instruments import Alpha
    from cockpit_lite.instruments.presets import economy

    return [i for i in economy() if not isinstance(i, Alpha)]


def build_norms(start: Start) -> Arm:
    from cockpit_lite.instruments import PerSampleGradNorms

    return _cockpit(start, [PerSampleGradNorms()])


def build_economy_alpha(start: Start) -> Arm:
    return _cockpit(start, _economy_minus_alpha())


def build_economy(start: Start) -> Arm:
    return _cockpit(start, "economy")


def build_economy_budget(start: Start) -> Arm:
    try:
        return _cockpit(start, "economy", budget=0.05)
    except TypeError as e:
        if "budget" in str(e):
            raise CannotRun(BUDGET_MISSING) from e
        raise


def build_backpack(start: Start) -> Arm:
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    model, opt, loss_fn = start()
    model = extend(model)
    owner = {id(p): type(m).__name__ for m in model.modules() for p in m.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    state: dict[str, torch.Tensor] = {}

    def reduce(x: torch.Tensor, y: torch.Tensor) -> None:
        missing = sorted({owner[id(p)] for p in params if getattr(p, "batch_l2", None) is None})
        if missing:
            raise CannotRun(f"no BatchL2Grad for {', '.join(missing)}")
        # BackPACK returns ||g_i / B||^2 for a mean loss
        state["sq"] = sum(p.batch_l2 for p in params) * x.shape[0] ** 2
        for p in params:
            p.batch_l2 = None

    return Arm(
        model, opt, loss_fn, after_backward=reduce, context=lambda: backpack(BatchL2Grad()),
        sq_norms=lambda: _numpy(state.get("sq")),
    )  # fmt: skip


def build_opacus(start: Start) -> Arm:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    model, opt, loss_fn = start()
    try:
        gsm = GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="mean", use_ghost_clipping=True
        )
    except NotImplementedError as e:
        first = e.args[0][0] if e.args and isinstance(e.args[0], list) and e.args[0] else e
        raise CannotRun(reason_of(first)) from e
    state: dict[str, torch.Tensor] = {}

    def reduce(x: torch.Tensor, y: torch.Tensor) -> None:
        state["sq"] = gsm.get_norm_sample().square()

    return Arm(gsm, opt, loss_fn, after_backward=reduce, sq_norms=lambda: _numpy(state.get("sq")), close=gsm._close)


def _func(start: Start, dot: bool) -> Arm:
    model, opt, loss_fn = start()
    ref = FuncNorms(model, loss_fn, dot=dot)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    note = "per-example BatchNorm (replace_all_batch_norm_modules_): another definition of g_i" if has_bn else ""
    return Arm(
        model, opt, loss_fn, after_backward=ref,
        sq_norms=lambda: _numpy(ref.last[0]) if ref.last else None,
        dots=lambda: _numpy(ref.last[1]) if len(ref.last) > 1 else None, note=note,
    )  # fmt: skip


def build_func_norms(start: Start) -> Arm:
    return _func(start, dot=False)


def build_func_norms_dot(start: Start) -> Arm:
    return _func(start, dot=True)


def build_cockpit_102(start: Start) -> Arm:
    raise CannotRun(COCKPIT_MISSING)


def build_floor(start: Start) -> Arm:
    model, opt, loss_fn = start()
    floor = GhostNorms(model)
    return Arm(model, opt, loss_fn, after_backward=floor, sq_norms=lambda: _numpy(floor.last), close=floor.close)


def build_plain(start: Start) -> Arm:
    return Arm(*start())


BUILDERS: dict[str, Callable[[Start], Arm]] = {
    "plain": build_plain,
    "norms": build_norms,
    "economy-alpha": build_economy_alpha,
    "economy": build_economy,
    "economy@5%": build_economy_budget,
    "backpack": build_backpack,
    "opacus": build_opacus,
    "func-norms": build_func_norms,
    "func-norms-dot": build_func_norms_dot,
    "cockpit-1.0.2": build_cockpit_102,
    "floor": build_floor,
}


# --- the check --------------------------------------------------------------------------------------------
def loop_reference(
    model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype = torch.float64
) -> dict[str, np.ndarray]:
    """||g_i||^2, g_i . gbar and the inner-product test of one batch in ``dtype``, one autograd call per
    example on the batch's graph: g_i = B x the backward of the mean loss restricted to example i's
    output row (the gradient of example i's own loss; with train-mode BatchNorm the batch as it was)."""
    m, lf = copy.deepcopy(model).to(dtype), copy.deepcopy(loss_fn).to(dtype)
    params = [p for p in m.parameters() if p.requires_grad]
    out = m(x.to(dtype) if torch.is_floating_point(x) else x)
    (d_out,) = torch.autograd.grad(lf(out, y), out, retain_graph=True)
    b = out.shape[0]
    rows = []
    for i in range(b):
        mask = torch.zeros_like(d_out)
        mask[i] = d_out[i] * b
        gs = torch.autograd.grad(out, params, grad_outputs=mask, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(gs, params, strict=True)])
        )
    g = torch.stack(rows)
    gbar = g.mean(0)
    sq, dots, g2 = g.square().sum(1), g @ gbar, gbar.square().sum()
    inner = torch.sqrt(((dots - g2) ** 2).sum() / (b * (b - 1) * g2**2))
    return {"sq": sq.double().numpy(), "dots": dots.detach().double().numpy(), "inner": float(inner)}


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-300))


def check(arm: Arm, ref: dict[str, np.ndarray]) -> float | None:
    """Largest relative difference of the arm's last step against the loop (None: nothing to compare)."""
    diffs = []
    for got, want in ((arm.sq_norms(), ref["sq"]), (arm.dots(), ref["dots"])):
        if got is not None:
            diffs.append(_rel(got, want))
    inner = arm.inner()
    if inner is not None:
        diffs.append(abs(inner - ref["inner"]) / abs(ref["inner"]))
    return max(diffs) if diffs else None


# --- measurement --------------------------------------------------------------------------------------------
@dataclass
class Result:
    """One row on one model: seconds per step, or why it did not run; the check's relative difference."""

    seconds: float | None = None
    reason: str = ""
    diff: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def agrees(self) -> bool:
        return self.diff is None or self.diff <= RTOL


def reason_of(e: BaseException) -> str:
    """The exception's type and first sentence (at most 120 characters)."""
    text = " ".join(str(e).split())
    first = text.split(". ")[0].rstrip(".")
    return f"{type(e).__name__}: {first[:117] + '...' if len(first) > 120 else first}"


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_all(start: Start, rows: list[str]) -> tuple[dict[str, Arm], dict[str, Result]]:
    """The arms of plain training and of ``rows`` that build, and the reasons of those that do not."""
    arms, results = {}, {}
    for r in ["plain", *rows]:
        try:
            arms[r] = BUILDERS[r](start)
        except CannotRun as e:
            results[r] = Result(reason=str(e))
        except Exception as e:  # a peer raising on a model is a finding, not a crash of the benchmark
            results[r] = Result(reason=reason_of(e))
    return arms, results


def _close(arms: dict[str, Arm]) -> None:
    for a in arms.values():
        a.close()


def first_steps(arms: dict[str, Arm], results: dict[str, Result], batch: list, ref: dict | None, tag: str) -> None:
    """Every arm's first step on the same batch from the same weights, checked against ``ref`` (the
    loop); an arm that raises is closed, removed and given its reason."""
    for r in list(arms):
        try:
            arms[r].run(batch)
            results[r] = Result(diff=check(arms[r], ref) if ref is not None else None, note=arms[r].note)
        except CannotRun as e:
            results[r] = Result(reason=str(e))
        except Exception as e:  # a peer raising on a model is a finding, not a crash of the benchmark
            results[r] = Result(reason=reason_of(e))
        if results[r].reason:
            arms.pop(r).close()
            _progress(f"[{tag}] {r:15} cannot run: {results[r].reason}")
        elif ref is not None:
            d = results[r].diff
            _progress(f"[{tag}] {r:15} check: " + ("nothing to compare" if d is None else f"max rel diff {d:.1e}"))


def measure(model_name: str, optim: str, rows: list[str], reps: int, steps: int, verify: bool = True, batch=None):
    """{row: Result} for one model: the check on one batch, then the interleaved timing."""
    t0 = time.perf_counter()
    arms, results = build_all(starter(model_name, optim), rows)
    if "plain" not in arms:
        raise SystemExit(f"{model_name}: plain training does not build: {results['plain'].reason}")
    batches = make_batches(model_name, steps + 1) if batch is None else make_batches_of(model_name, steps + 1, batch)
    first, batches = batches[:1], batches[1:]
    ref = None
    if verify:
        dtype = CHECK_DTYPE.get(model_name, torch.float64)
        _progress(f"[{model_name}] {str(dtype)[6:]} loop reference on one batch ...")
        ref = loop_reference(arms["plain"].model, arms["plain"].loss_fn, *first[0], dtype=dtype)
    first_steps(arms, results, first, ref, model_name)
    runners = {r: (lambda a=a: a.run(batches)) for r, a in arms.items()}
    _progress(f"[{model_name}] warm-up and {reps} interleaved reps x {steps} steps of {len(runners)} rows ...")
    for run in runners.values():
        run()
    med = interleaved(runners, reps)
    _close(arms)
    for r in arms:
        results[r].seconds = med[r] / steps
    _progress(f"[{model_name}] done in {time.perf_counter() - t0:.0f} s")
    return results


# --- output -----------------------------------------------------------------------------------------------
def _cell(res: Result | None, plain: Result) -> str:
    if res is None:
        return "-"
    if res.seconds is None:
        return res.reason if res.reason in (BUDGET_MISSING, COCKPIT_MISSING) else f"cannot run: {res.reason}"
    ratio = res.seconds / plain.seconds
    text = f"{ratio:.0f}x" if ratio >= 20 else f"{ratio:.2f}x"
    if not res.agrees:
        text += f" (differs from the loop: {res.diff:.1e}{', see below' if res.note else ''})"
    return text


def notes(all_results: dict[str, dict[str, Result]]) -> str:
    """One line per row that differs from the loop and says why."""
    lines = []
    for m, results in all_results.items():
        for r, res in results.items():
            if not res.agrees and res.note:
                lines.append(f"- {m}, {r}: {res.note}")
    return "\n".join(lines)


def table(all_results: dict[str, dict[str, Result]], rows: list[str]) -> str:
    models = list(all_results)
    lines = ["| per-step work | " + " | ".join(TITLES.get(m, m) for m in models) + " |"]
    lines.append("|---" * (len(models) + 1) + "|")
    plain = {m: all_results[m]["plain"] for m in models}
    lines.append("| plain step | " + " | ".join(f"{plain[m].seconds * 1e3:.1f} ms" for m in models) + " |")
    done = set()
    for r in rows:
        if r in done:
            continue
        if r in ("func-norms", "func-norms-dot") and {"func-norms", "func-norms-dot"} <= set(rows):
            done |= {"func-norms", "func-norms-dot"}
            cells = []
            for m in models:
                a, b = (_cell(all_results[m].get(k), plain[m]) for k in ("func-norms", "func-norms-dot"))
                cells.append(a if a == b and not a[0].isdigit() else f"{a} / {b}")
            lines.append("| torch.func vmap: norms / norms + g_i . gbar | " + " | ".join(cells) + " |")
            continue
        done.add(r)
        lines.append(f"| {ROWS[r]} | " + " | ".join(_cell(all_results[m].get(r), plain[m]) for m in models) + " |")
    return "\n".join(lines)


def check_table(all_results: dict[str, dict[str, Result]], rows: list[str]) -> str:
    models = list(all_results)
    lines = [
        "| check: max rel diff to the loop | " + " | ".join(models) + " |",
        "|---" * (len(models) + 1) + "|",
    ]
    for r in rows:
        cells = []
        for m in models:
            res = all_results[m].get(r)
            if res is None or res.reason:
                cells.append("-")
            elif res.diff is None:
                cells.append("not compared")
            else:
                cells.append(f"{res.diff:.1e}" + ("" if res.agrees else " DIFFERS"))
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(sweep: dict[tuple[str, int], dict[str, Result]], rows: list[str]) -> str:
    lines = ["| model | B | plain ms | " + " | ".join(ROWS[r] for r in rows) + " |", "|---" * (len(rows) + 3) + "|"]
    for (m, b), res in sweep.items():
        plain = res["plain"]
        cells = [_cell(res.get(r), plain) for r in rows]
        lines.append(f"| {m} | {b} | {plain.seconds * 1e3:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _json_rows(
    results: dict[str, Result], model: str, batch: int, args: argparse.Namespace, sweep: bool
) -> Iterator[dict]:
    plain = results["plain"].seconds
    for r, res in results.items():
        yield {
            "model": model, "batch": batch, "optim": args.optim, "config": r, "sweep": sweep,
            "ms_per_step": None if res.seconds is None else res.seconds * 1e3,
            "time_ratio": None if res.seconds is None else res.seconds / plain,
            "check_rel_diff": res.diff, "not_run": res.reason or None,
            "threads": args.threads, "malloc": args.malloc, "reps": args.reps, "steps": args.steps,
            "round": args.round, "note": args.note,
        }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="default: mlp,cnn,lm,gpt,resnet18 (--sweep: mlp,cnn); also lm-eager")
    listed = ",".join(ROWS).replace("%", "%%")  # argparse formats help strings
    ap.add_argument("--rows", default=None, help=f"comma-separated, of: {listed} (default: all)")
    ap.add_argument("--optim", default="sgd", choices=sorted(OPTIMIZERS))
    ap.add_argument("--steps", type=int, default=3, help="steps per timed block")
    ap.add_argument("--reps", type=int, default=7, help="interleaved repetitions")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sweep", action="store_true", help="the B-sweep (MLP and CNN) instead of the table")
    ap.add_argument("--batches", default=None, help="B-sweep batch sizes, e.g. 32,128 (default: SWEEP)")
    ap.add_argument(
        "--malloc", choices=("default", "tuned"), default="default",
        help="glibc malloc as the process starts, or overhead.py's TUNED_MALLOC (re-executes the script)",
    )  # fmt: skip
    ap.add_argument("--json", help="append the rows to this JSON list")
    ap.add_argument("--round", default="peers", help="label of the rows in --json")
    ap.add_argument("--note", default="", help="note on the rows in --json")
    args = ap.parse_args(argv)
    if args.malloc == "tuned":
        from overhead import TUNED_MALLOC

        if any(os.environ.get(k) != v for k, v in TUNED_MALLOC.items()):
            argv = sys.argv[1:] if argv is None else list(argv)
            os.execve(sys.executable, [sys.executable, __file__, *argv], {**os.environ, **TUNED_MALLOC})
    torch.set_num_threads(args.threads)
    for known in ("Extension saving to", "Full backward hook is firing", "There is a performance drop"):
        warnings.filterwarnings("ignore", message=known)  # the peers' own notices, once per layer
    default_rows = "norms,economy-alpha" if args.sweep else ",".join(ROWS)
    rows = [r for r in (args.rows or default_rows).split(",") if r and r != "plain"]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}: choose from {list(ROWS)}")
    default_models = SWEEP if args.sweep else [m for m in TITLES if m != "lm-eager"]
    models = (args.models or ",".join(default_models)).split(",")
    head = (
        f"torch {torch.__version__}, {args.threads} thread(s), {args.optim}, {args.reps} interleaved reps x "
        f"{args.steps} steps, {args.malloc} malloc, medians; ratios to a plain step of the same model in the same run"
    )
    out_rows: list[dict] = []
    if args.sweep:
        sweep: dict[tuple[str, int], dict[str, Result]] = {}
        for m in models:
            sizes = [int(b) for b in args.batches.split(",")] if args.batches else SWEEP.get(m, (MODELS[m][2],))
            for b in sizes:
                _progress(f"[{m}] B = {b}")
                sweep[m, b] = measure(m, args.optim, rows, args.reps, args.steps, verify=False, batch=b)
                out_rows += _json_rows(sweep[m, b], m, b, args, sweep=True)
        print(head)
        print(sweep_table(sweep, rows))
        result: dict = {"sweep": sweep}
    else:
        all_results = {}
        for m in models:
            all_results[m] = measure(m, args.optim, rows, args.reps, args.steps)
            out_rows += _json_rows(all_results[m], m, MODELS[m][2], args, sweep=False)
        print(head)
        print(table(all_results, rows))
        if notes(all_results):
            print(notes(all_results))
        print()
        print(check_table(all_results, rows))
        result = {"table": all_results}
    if importlib.util.find_spec("cockpit") is None and "cockpit-1.0.2" in rows:
        print(f"\nCockpit 1.0.2: {COCKPIT_MISSING} ({COCKPIT_WHY}).")
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(old + out_rows, indent=1))
    return result


if __name__ == "__main__":
    main()
