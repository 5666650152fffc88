"""The need ``"replay"``: a closure that recomputes the step's loss at the current parameters, with a
graph, for instruments that differentiate the loss again (Hessian-vector products: Sharpness).

The loop's graph is freed by its ``backward()``. The provider keeps, for each model call of the step,
its inputs (references, no copies), the random state at the start of the forward (CPU and the CUDA
devices of the parameters) and how the loss came from the output, then offers
``record.get("replay")``: a :class:`Replay` (or None, with a note saying why) whose ``loss()`` runs

    L(theta) = sum_k w_k L_k(theta),   w_k = root_k / L_k(theta_t)

over the step's micro-batches k (w_k = 1 without gradient accumulation), L_k the loss of micro-batch
k as the loop computed it: the loss module the Cockpit watches applied to the model's output (the
prediction the loss saw is the output itself or a reshape of it) and the loop's other loss-module
arguments (targets), or the loss the model returns (``out.loss``, a 0-dim output), or a ``loss_fn``
callable given to the Cockpit (``loss_fn(output, *args, **kwargs)``: per-example losses, reduced by
the Cockpit's ``reduction``).

The recomputation leaves training as it was:

- no cockpit sees it (:func:`cockpit_lite.pause.paused`), and it never calls ``backward()``;
- the random streams are forked (``torch.random.fork_rng``) and set, inside the fork, to their state
  at the start of the step's forward: dropout draws the step's own masks, and the loop's random stream
  continues as if the replay never ran;
- the forward runs under the autocast the step's forward ran under;
- every module buffer (BatchNorm running statistics and ``num_batches_tracked``) is replaced by a copy
  for the replay; modules keep their mode (train-mode BatchNorm normalises with the batch statistics,
  as the step did); embeddings with ``max_norm`` do not renormalise their weights;
- ``p.grad`` is untouched as long as the caller differentiates with ``torch.autograd.grad``.

Two checks guard against a replay of another loss than the step's: the recomputed loss must equal
the step's loss (the backward roots, to 1e-4 relative plus round-off), and :meth:`Replay.gradient`
compares ||grad L(theta)|| with ||p.grad|| right after the step's backward (to 1e-3 relative), which
catches what the weights w_k would absorb (a penalty added in the loop, ``(loss + pen).backward()``;
skipped under DDP, where ``p.grad`` is the average over the ranks). A sharded model (FSDP) gets no
replay (its forward gathers parameters with collectives the other ranks would not join).
A model whose forward is not reproducible fails them too; both raise :class:`ReplayMismatch` saying
so. A forward that ran under ``torch.autocast`` (CPU or CUDA) is replayed under the same autocast; the
loss module's call is replayed inside it too (where the loop may have called it outside).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from cockpit_lite import distributed
from cockpit_lite.compat import tree_flatten, tree_map
from cockpit_lite.losses import scalar_loss
from cockpit_lite.needs import Need, Needs
from cockpit_lite.pause import paused
from cockpit_lite.providers import register_provider
from cockpit_lite.providers.base import BackwardRoot, Context, LossCall, ModelCall, Provider
from cockpit_lite.providers.grad_norms import grad_norms
from cockpit_lite.sandbox import cuda_devices, scratch_state
from cockpit_lite.step import StepRecord

#: the need (a plain name: no member of :class:`~cockpit_lite.needs.Need`): ``record.get(REPLAY)``
REPLAY = "replay"


class ReplayMismatch(RuntimeError):
    """The recomputed loss differs from the loss the step optimized."""


@dataclass
class _Call:
    args: tuple
    kwargs: dict
    index: int
    rng: tuple[torch.Tensor, list[torch.Tensor]]
    #: the autocast regions the forward ran in: (device type, dtype)
    autocast: list[tuple[str, torch.dtype]] = field(default_factory=list)
    #: how the loss of this call is computed from the model's output: ("module", (position among the
    #: output's tensors, shape the loss saw), other loss args, loss kwargs), ("model",), ("fn",) or None
    #: (not known yet)
    recipe: tuple | None = None
    value: float | None = None  #: L_k as the loop computed it
    extra: dict = field(default_factory=dict)  #: the step's output, until the step's pre-hook


def _autocast_state() -> list[tuple[str, torch.dtype]]:
    out = []
    for device in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device):
            out.append((device, torch.get_autocast_dtype(device)))
    return out


def _rng_state(devices: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _find_pred(output: Any, pred: torch.Tensor) -> tuple[list[int], torch.Size] | None:
    """Where the loss's prediction sits in the model's output: the position of the output tensor it is
    (or a reshape of: same storage, same number of elements), and the shape the loss saw."""
    leaves, _ = tree_flatten(output)
    for i, t in enumerate(leaves):
        if t is pred:
            return [i], pred.shape
    for i, t in enumerate(leaves):
        if (
            torch.is_tensor(t)
            and t.numel() == pred.numel()
            and t.dtype == pred.dtype
            and t.untyped_storage().data_ptr() == pred.untyped_storage().data_ptr()
            and pred.is_contiguous()
            and t.is_contiguous()
        ):
            return [i], pred.shape
    return None


def _sharded(model: nn.Module) -> bool:
    from cockpit_lite.persample.engine import _sharded as sharded

    return sharded(model)


class Replay:
    """The step's loss recomputed at the current parameters (see the module docstring)."""

    def __init__(
        self,
        context: Context,
        calls: list[_Call],
        weights: list[float],
        loss: float,
        devices: list[int],
        norms: dict[str, float] | None = None,
    ):
        self.context, self.calls, self.weights, self.step_loss, self.devices = context, calls, weights, loss, devices
        #: ||p.grad|| by name right after the step's backward (divided by the AMP scale)
        self.norms = norms
        self.checked = False

    def gradient(
        self, params: list[torch.nn.Parameter], create_graph: bool = True
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        """(L(theta), dL/dparams) by ``torch.autograd.grad`` (``p.grad`` untouched; run it and any
        further differentiation inside :func:`cockpit_lite.pause.paused`). Raises ReplayMismatch unless
        ||dL/dparams|| equals ||p.grad|| after the step's backward over the same parameters (1e-3 relative).
        With ``create_graph`` the forward's scaled dot-product attention takes PyTorch's math kernel, the one
        with a second derivative (the fused CPU/CUDA kernels have none)."""
        loss = self.loss(twice=create_graph)
        grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
        if self.norms is not None:
            names = {id(p): n for n, p in self.context.params.items()}
            pairs = [(g, self.norms.get(names.get(id(p), ""), 0.0)) for p, g in zip(params, grads, strict=True)]
            got = math.sqrt(sum(float(g.detach().double().square().sum()) for g, _ in pairs if g is not None))
            want = math.sqrt(sum(n * n for _, n in pairs))
            if not abs(got - want) <= 1e-3 * want + 1e-12:
                raise ReplayMismatch(
                    f"the gradient of the recomputed loss has norm {got:.6g}, the step's backward gave {want:.6g}: the "
                    "loop adds terms to the loss the cockpit does not see, or p.grad was not zeroed before the step"
                )
        return loss, grads

    def loss(self, twice: bool = False) -> torch.Tensor:
        """L(theta) as a 0-dim tensor with a graph to the parameters (differentiate it with
        ``torch.autograd.grad`` inside :func:`cockpit_lite.pause.paused`; ``twice``: attention by the math
        kernel, differentiable twice). Raises ReplayMismatch when the first recomputation does not
        reproduce the step's loss."""
        total = None
        for call, w in zip(self.calls, self.weights, strict=True):
            part = self._one(call, twice) * w
            total = part if total is None else total + part
        assert total is not None
        if not self.checked:
            value = float(total.detach())
            tol = 1e-4 * abs(self.step_loss) + 1e-6
            if not (math.isfinite(value) and abs(value - self.step_loss) <= tol):
                raise ReplayMismatch(
                    f"the recomputed loss {value:.8g} differs from the step's loss {self.step_loss:.8g}: the loop adds "
                    "terms the cockpit does not see, the forward is not reproducible, or it ran under autocast"
                )
            self.checked = True
        return total

    def _one(self, call: _Call, twice: bool = False) -> torch.Tensor:
        model = self.context.network
        with contextlib.ExitStack() as stack:
            if twice:
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            stack.enter_context(scratch_state(model))
            stack.enter_context(paused())
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.random.fork_rng(devices=self.devices))
            torch.set_rng_state(call.rng[0])
            for d, s in zip(self.devices, call.rng[1], strict=True):
                torch.cuda.set_rng_state(s, d)
            for device, dtype in call.autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype))
            output = model(*call.args, **call.kwargs)
            return self._loss_of(call, output)

    def _loss_of(self, call: _Call, output: Any) -> torch.Tensor:
        kind = call.recipe[0]
        if kind == "model":
            loss = scalar_loss(output)
            if loss is None:
                raise ReplayMismatch("the model's recomputed output holds no loss")
            return loss
        if kind == "fn":
            losses = torch.as_tensor(self.context.loss_fn(output, *call.args, **call.kwargs)).reshape(-1)
            return losses.mean() if self.context.reduction == "mean" else losses.sum()
        _, (position, shape), args, kwargs = call.recipe
        leaves, _ = tree_flatten(output)
        pred = leaves[position[0]].reshape(shape)
        return self.context.loss_fn(pred, *args, **kwargs)


@register_provider
class ReplayProvider(Provider):
    """``record.get("replay")``: a :class:`Replay` of the step's loss, or None with a note."""

    PROVIDES = frozenset({REPLAY})
    USES = frozenset({Need.LOSS})

    def __init__(self, context: Context):
        super().__init__(context)
        self.calls: list[_Call] = []
        self.roots: list[float] = []
        self.norms: dict[str, float] | None = None

    def begin_step(self, record: StepRecord, needs: Needs) -> None:
        self.calls, self.roots, self.problem, self.norms = [], [], None, None
        params = list(self.context.network.parameters())
        self.devices = cuda_devices(params)

    def on_forward(self, record: StepRecord, call: ModelCall) -> None:
        self.calls.append(_Call(call.args, dict(call.kwargs), call.index, _rng_state(self.devices), _autocast_state()))

    def on_output(self, record: StepRecord, call: ModelCall) -> None:
        if not self.calls:
            return
        this = self.calls[-1]
        this.extra["output"] = call.output
        fn = self.context.loss_fn
        loss = scalar_loss(call.output)
        if loss is not None:  # a loss module the loop calls replaces this recipe (on_loss)
            this.recipe, this.value = ("model",), float(loss.detach())
        elif callable(fn) and not isinstance(fn, nn.Module):
            this.recipe = ("fn",)
            with torch.no_grad():
                losses = torch.as_tensor(fn(call.output, *call.args, **call.kwargs)).reshape(-1)
            this.value = float(losses.mean() if self.context.reduction == "mean" else losses.sum())

    def on_loss(self, record: StepRecord, call: LossCall) -> None:
        if not self.calls or "output" not in self.calls[-1].extra:
            self.problem = "the loss module was called without a model call the cockpit saw"
            return
        this = self.calls[-1]
        if call.args:
            pred, rest, kwargs = call.args[0], call.args[1:], dict(call.kwargs)
        else:
            self.problem = "the loss module was called with keyword arguments only"
            return
        found = _find_pred(this.extra["output"], pred) if torch.is_tensor(pred) else None
        if found is None:
            self.problem = (
                "the loss module's prediction is neither the model's output nor a reshape of it (the loop transforms "
                "it): the loss cannot be recomputed"
            )
            return
        detach = lambda t: t.detach() if torch.is_tensor(t) else t  # noqa: E731
        this.recipe = ("module", found, tree_map(detach, rest), tree_map(detach, kwargs))
        this.value = float(call.output.detach())

    def on_backward_root(self, record: StepRecord, root: BackwardRoot) -> None:
        if len(root.tensors) == 1 and torch.is_tensor(root.tensors[0]) and root.tensors[0].dim() == 0:
            self.roots.append(float(root.tensors[0]) / root.scale)
        else:
            self.problem = self.problem or "backward started from a non-scalar tensor"

    def on_backward_end(self, record: StepRecord) -> None:
        if distributed.initialized() and distributed.world_size() > 1:
            return  # p.grad is averaged over the ranks: no check against this rank's replay
        scale = record.backward_scale if record.backward_scale and math.isfinite(record.backward_scale) else 1.0
        self.norms = {n: v / scale for n, v in grad_norms(self.context.params).items()}

    def on_before_step(self, record: StepRecord) -> None:
        for c in self.calls:
            c.extra.clear()  # the replay needs the inputs only
        calls = [c for c in self.calls if not record.reached or c.index in record.reached]
        replay, why = None, self.problem
        if why is None and _sharded(self.context.network):
            why = "the model is sharded (FSDP): a replayed forward would gather parameters outside the collectives"
        if why is None:
            if not calls:
                why = "no model call seen this step"
            elif any(c.recipe is None or c.value is None for c in calls):
                why = (
                    "the loss is computed outside a loss module the cockpit watches and outside the model: pass "
                    "Cockpit(..., loss_fn=nn.CrossEntropyLoss()) (the loop must call it) or loss_fn=lambda output, "
                    "*args, **kwargs: per-example losses"
                )
            elif self.roots and len(self.roots) != len(calls):
                why = f"{len(self.roots)} backward passes for {len(calls)} model calls: the loss cannot be recomputed"
            elif any(c.value == 0.0 for c in calls) and len(calls) > 1:
                why = "a micro-batch loss of exactly 0: its weight in the step's loss cannot be read"
        if why is None:
            if self.roots:
                weights = [1.0] if len(calls) == 1 and self.roots[0] == calls[0].value else None
                weights = weights or [r / c.value for r, c in zip(self.roots, calls, strict=True)]
                loss = sum(self.roots)
            else:
                weights, loss = [1.0] * len(calls), sum(c.value for c in calls)
            replay = Replay(self.context, calls, weights, loss, self.devices, self.norms)
        else:
            record.add_note(f"no replay of the loss: {why}", self.PROVIDES)
        record.provided[REPLAY] = replay

    def end_step(self) -> None:
        self.calls, self.roots, self.norms = [], [], None
