"""The coupled path: exact per-sample gradients of a model whose forward couples its examples
(train-mode BatchNorm), by replaying the batch's forward.

Definition. Let z = f(theta; x_1, ..., x_B) be the model's output (B rows along ``batch_axis``), each
per-sample loss l_i depend on z only through its row z_i, and c = dL/dz be the output gradient the
loop's backward produced. With the batch as it was (the other examples fixed, the batch statistics
depending on all of them), example i's gradient is

    g_i = d l_i / d theta = s J_i^T c_i,        J_i = d z_i / d theta through the whole batch's graph,

with s = B for L = mean_i l_i and s = 1 for L = sum_i l_i (then d l_i / d z_i = s c_i). The g_i add up
to the gradient: sum_i g_i = s J^T c = s p.grad. Row i of a layer's output gradient is *not* example
i's share here (the batch statistics carry every l_j to every row), so the per-layer factor engine
does not apply; this path differentiates the whole model instead.

Method. The forward of the batch is replayed with ``torch.func.functional_call`` on the captured
(detached) inputs, with the RNG state of the original forward (the same dropout masks), the same
autocast state, copies of the buffers (BatchNorm's running statistics are not touched), under
``paused()`` (no cockpit sees the replay) and ``torch.random.fork_rng`` (the user's random stream is
unchanged); ``p.grad`` is never written (only ``torch.autograd.grad`` and ``torch.func.jvp``). Then

- projections g_i . v = s <(J v)_i, c_i> for any direction v: one forward-mode JVP (``torch.func.jvp``)
  per direction, about one step's cost, for all i at once. g_i . gbar is the projection onto
  gbar = mean_i g_i (given by the caller, or s/B times one VJP of the replay with c);
- ||g_i||^2 per parameter, Gram entries g_i . g_j, materialised g_i: B vector-Jacobian products s J^T e_i c_i
  on one retained replay graph, over chunks of C examples, each chunk either batched
  (``torch.autograd.grad(..., is_grads_batched=True)``: vmap over backward) or one backward per example,
  whichever a timed trial finds faster (``vjp_mode``). A chunk holds C x D gradient entries (plus, when
  batched, C copies of the activation gradients of the whole batch) and is reduced at once to squared
  norms, dot products with gbar, projections onto the directions given and Gram blocks, so B x D is
  never held unless the materialised g_i are asked for. Gram entries across chunks recompute the later
  chunk (two chunks alive). Cost: one replay forward plus B backward passes, for any model.

Both are exact up to floating-point round-off (no approximation; the replay's output is checked
against the captured output when the caller gives it).

Gradient accumulation (several model calls and backward passes per optimizer step): the examples of
micro-batch k interact only through its own batch statistics, so each micro-batch is replayed on its
own and the statistics are joined over the step's N examples, g_i scaled to the step
(:meth:`CoupledPath.joined_statistics`, one :class:`Capture` per call).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from cockpit_lite.compat import BatchNormBase, cut_second_derivative, tree_flatten, tree_map
from cockpit_lite.errors import warn
from cockpit_lite.hooks import SharedHook
from cockpit_lite.needs import Need, Needs
from cockpit_lite.pause import is_paused, paused
from cockpit_lite.persample.engine import PerSampleResult
from cockpit_lite.profiling import Costs
from cockpit_lite.sandbox import cuda_devices

#: default bound on the memory of one chunk of batched vector-Jacobian products (estimate, bytes)
CHUNK_BYTES = 1 << 29

#: the squared per-sample norms (the total, or per tensor too)
SQ_NEEDS = frozenset({Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_SQ_NORMS_BY_PARAM})
#: the needs served by the chunked VJP pass (B backward passes; the others are projections: one JVP each)
CHUNK_NEEDS = SQ_NEEDS | {Need.PER_SAMPLE_GRAM, Need.PER_SAMPLE_GRAM_BY_PARAM, Need.PER_SAMPLE_GRADS}


class ReplayMismatch(RuntimeError):
    """The replayed forward did not reproduce the captured output (a random op whose state was not
    captured, a buffer the forward reads after changing it, inputs changed in place since)."""


def couples_examples(norm: nn.Module) -> bool:
    """Whether a BatchNorm module's forward couples the examples right now: in train mode, or without
    running statistics (``track_running_stats=False`` normalises with the batch's statistics in eval
    mode too)."""
    return norm.training or norm.running_mean is None


def coupling_modules(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` whose forward couples the examples right now
    (:func:`couples_examples`). Empty: the per-layer factor engine applies."""
    return [name for name, m in model.named_modules() if isinstance(m, BatchNormBase) and couples_examples(m)]


@dataclass(frozen=True)
class ReplayState:
    """What a forward depends on besides its inputs and parameters: the random generators' states
    (dropout masks) and the autocast state. Take it in a forward *pre*-hook of the model."""

    cpu_rng: torch.Tensor
    cuda_rng: tuple[tuple[int, torch.Tensor], ...]
    #: (device type, dtype) for every device type with autocast on
    amp: tuple[tuple[str, torch.dtype], ...]

    @classmethod
    def capture(cls, devices: Sequence[int] = (), device_types: Collection[str] = ("cpu", "cuda")) -> ReplayState:
        """The current state; ``devices``: the CUDA device indices the model lives on."""
        amp = []
        for kind in device_types:
            try:
                if torch.is_autocast_enabled(kind):
                    amp.append((kind, torch.get_autocast_dtype(kind)))
            except (RuntimeError, TypeError):  # a device type this build does not know
                continue
        cuda = tuple((d, torch.cuda.get_rng_state(d)) for d in devices)
        return cls(torch.get_rng_state(), cuda, tuple(amp))

    def restore_rng(self) -> None:
        torch.set_rng_state(self.cpu_rng)
        for d, s in self.cuda_rng:
            torch.cuda.set_rng_state(s, d)

    def autocast(self) -> contextlib.AbstractContextManager:
        """A context with autocast as it was at capture (on where it was on, with its dtype)."""
        stack = contextlib.ExitStack()
        for kind, dtype in self.amp:
            stack.enter_context(torch.autocast(kind, dtype=dtype))
        return stack


@dataclass
class Capture:
    """One model call as :meth:`CoupledPath.statistics` replays it: the detached inputs, the
    :class:`ReplayState` taken before the forward, the detached outputs (one entry per leaf of the
    flattened output) and the gradient backward delivered to each (None where none arrived)."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    state: ReplayState | None = None
    outputs: list = field(default_factory=list)
    output_grads: list = field(default_factory=list)

    @property
    def reached(self) -> bool:
        """Whether backward reached this call's output (a call the loop abandoned has no gradient)."""
        return any(g is not None for g in self.output_grads)


class CoupledRecorder:
    """Captures what :meth:`CoupledPath.statistics` replays, one :class:`Capture` per model call
    (``captures``; several under gradient accumulation): before the forward, the
    :class:`ReplayState` and the detached inputs; after it, the detached outputs and a tensor hook on
    each output that keeps its gradient when backward reaches it (``output_grads``, one entry per leaf
    of the flattened output, None where no gradient arrived). ``args``, ``kwargs``, ``state``,
    ``outputs`` and ``output_grads`` are the last call's.

    With ``hooks=True`` it registers a forward pre-hook and a forward hook on ``model`` that do this for
    every call not under ``paused()`` (the path's own replays are); with ``hooks=False`` the owner calls
    :meth:`before_forward` and :meth:`after_forward` from hooks of its own. ``calls`` counts the forwards
    since :meth:`reset`.
    """

    def __init__(self, model: nn.Module, devices: Sequence[int] | None = None, hooks: bool = True):
        self.model = model
        self.devices = list(devices) if devices is not None else cuda_devices(model.parameters())
        self.reset()
        self._handles = []
        if hooks:
            self._handles = [
                model.register_forward_pre_hook(SharedHook(self._pre), with_kwargs=True),
                model.register_forward_hook(SharedHook(self._post)),
            ]

    def reset(self) -> None:
        """Drop what was captured (call at the start or end of each step)."""
        self.captures: list[Capture] = []

    @property
    def calls(self) -> int:
        return len(self.captures)

    @property
    def _last(self) -> Capture:
        return self.captures[-1] if self.captures else Capture()

    @property
    def args(self) -> tuple:
        return self._last.args

    @property
    def kwargs(self) -> dict:
        return self._last.kwargs

    @property
    def state(self) -> ReplayState | None:
        return self._last.state

    @property
    def outputs(self) -> list[torch.Tensor | None]:
        return self._last.outputs

    @property
    def output_grads(self) -> list[torch.Tensor | None]:
        return self._last.output_grads

    def close(self) -> None:
        """Remove the hooks (what was captured stays until :meth:`reset`)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def before_forward(self, args: tuple, kwargs: Mapping[str, Any]) -> None:
        """The model's forward is about to run on ``args``/``kwargs``: keep them (detached) and the state."""
        detach = lambda t: t.detach() if torch.is_tensor(t) else t  # noqa: E731
        state = ReplayState.capture(self.devices)
        self.captures.append(Capture(tree_map(detach, tuple(args)), tree_map(detach, dict(kwargs)), state))

    def after_forward(self, output: Any) -> None:
        """The model's forward returned ``output``: keep it (detached) and hook its gradients."""
        if not self.captures:
            return
        capture = self.captures[-1]
        leaves = tree_flatten(output)[0]
        capture.outputs = [t.detach() if torch.is_tensor(t) else None for t in leaves]
        capture.output_grads = [None] * len(leaves)
        for k, t in enumerate(leaves):
            if torch.is_tensor(t) and t.requires_grad:
                t.register_hook(lambda g, k=k, c=capture: self._grad(c, k, g))

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not is_paused() and module is self.model:
            self.before_forward(args, kwargs)

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not is_paused() and module is self.model:
            self.after_forward(output)

    @staticmethod
    def _grad(capture: Capture, k: int, g: torch.Tensor) -> None:
        capture.output_grads[k] = g.detach()


def _rows(c: torch.Tensor, idx: Sequence[int], axis: int) -> torch.Tensor:
    """(len(idx), *c.shape): entry k is c restricted to row idx[k] along ``axis`` (zero elsewhere)."""
    onehot = torch.zeros(len(idx), c.shape[axis], dtype=c.dtype, device=c.device)
    onehot[torch.arange(len(idx), device=c.device), torch.as_tensor(list(idx), device=c.device)] = 1
    shape = (len(idx),) + (1,) * axis + (c.shape[axis],) + (1,) * (c.dim() - axis - 1)
    return onehot.view(shape) * c.unsqueeze(0)


def _per_row(t: torch.Tensor, c: torch.Tensor, axis: int) -> torch.Tensor:
    """sum over everything but ``axis`` of t * c: (B,)."""
    return (t * c).movedim(axis, 0).reshape(c.shape[axis], -1).sum(1)


class CoupledPath:
    """Exact per-sample gradient statistics of ``model`` with the batch as it was (module docstring).

    Args:
        model: the module whose forward was captured (inside DDP/compile wrappers).
        params: the parameters to cover, by name as in ``model.named_parameters()`` (the optimizer's).
        batch_axis: the batch axis of the model's output tensors.
        chunk_bytes: bound on the (estimated) memory of one chunk of batched VJPs.
        chunk: examples per chunk, overriding the estimate.
        costs: where the path's time is accounted (region ``coupled``).
    """

    def __init__(
        self,
        model: nn.Module,
        params: Mapping[str, nn.Parameter],
        *,
        batch_axis: int = 0,
        chunk_bytes: int = CHUNK_BYTES,
        chunk: int | None = None,
        costs: Costs | None = None,
    ):
        self.model = model
        self.params = dict(params)
        self.batch_axis = batch_axis
        self.chunk_bytes = chunk_bytes
        self.chunk = chunk
        self.costs = costs if costs is not None else Costs()
        self.devices = cuda_devices(self.params.values())
        #: ``"jvp"`` (forward mode) or ``"double_vjp"`` (reverse over reverse, where an op has no
        #: forward-mode derivative: switched to at the first failure, with a warning)
        self.projection_method = "jvp"
        #: how a chunk's VJPs run: ``"batched"`` (vmap over backward), ``"loop"`` (one backward per
        #: example), or ``"auto"``: batched on the first chunked pass (which pays vmap's one-time
        #: setup), then the second runs one chunk each way and keeps the faster per example (both
        #: times in :attr:`vjp_times`). A failing batched backward switches to ``"loop"`` with a warning.
        self.vjp_mode = "auto"
        self._passes = 0  # chunked passes so far
        #: seconds per example of the two ways, from the ``"auto"`` trial
        self.vjp_times: dict[str, float] = {}
        #: the chunk size used by the last chunked pass, and its estimated bytes per example
        self.last_chunk: tuple[int, int] | None = None
        #: sum_i g_i . gbar / (B ||gbar||^2) of the last call given ``mean_grad`` (1 when gbar is the
        #: mean of the g_i the replay gives: a check that p.grad holds this batch's gradient alone)
        self.sum_ratio: float | None = None
        #: bytes of the largest tensor the last measured replay saved for backward (chunk estimate)
        self.largest_saved = 0

    # --- the replay ------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of the current parameter values (D floats): keep theta_t for projections onto a
        direction known only after the optimizer step (pass them as ``values``)."""
        return {n: p.detach().clone() for n, p in self.params.items()}

    def _call(
        self,
        values: Mapping[str, torch.Tensor],
        args: tuple,
        kwargs: dict,
        state: ReplayState | None,
        measure: bool = False,
    ) -> list[Any]:
        """The flattened output of the model's forward at ``values``, replayed. ``measure``: record the
        largest tensor the forward saves for backward (``self.largest_saved``, bytes)."""
        if state is not None:
            state.restore_rng()
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}  # running statistics stay as they are
        amp = state.autocast() if state is not None else contextlib.nullcontext()
        largest = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            largest[0] = max(largest[0], t.numel() * t.element_size())
            return t

        saved = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if measure else contextlib.nullcontext()
        with amp, saved:
            out = functional_call(self.model, {**values, **buffers}, tuple(args), dict(kwargs), strict=False)
        if measure:
            self.largest_saved = largest[0]
        return tree_flatten(out)[0]

    @contextlib.contextmanager
    def _session(self) -> Iterator[None]:
        with self.costs.region("coupled"), paused(), torch.random.fork_rng(devices=self.devices), torch.enable_grad():
            yield

    @staticmethod
    def _check(replayed: Sequence[Any], outputs: Sequence[Any] | None, sel: Sequence[int]) -> None:
        if outputs is None:
            return
        for k in sel:
            want, got = outputs[k], replayed[k]
            if want is None:
                continue
            if not torch.is_tensor(got) or got.shape != want.shape:
                raise ReplayMismatch(f"the replayed forward gave output {k} of another shape")
            if want.numel() == 0:
                continue
            if not bool(torch.isfinite(want).all()):
                raise ReplayMismatch(f"output {k} of the captured forward is not finite: nothing to replay")
            scale = float(want.detach().abs().max())
            gap = float((got.detach() - want).abs().max())
            if not gap <= 1e-4 * scale + 1e-12:
                raise ReplayMismatch(
                    f"the replayed forward differs from the captured one (output {k}: max |difference| {gap:.3g} "
                    f"for values up to {scale:.3g}): a random op whose state was not captured, inputs changed "
                    "in place after the forward, or a buffer the forward reads after changing it"
                )

    # --- the statistics ------------------------------------------------------------------------------
    def statistics(
        self,
        args: tuple,
        kwargs: Mapping[str, Any] | None,
        output_grads: Sequence[torch.Tensor | None],
        scale: float,
        needs: Needs | Iterable[str],
        directions: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        *,
        state: ReplayState | None = None,
        outputs: Sequence[torch.Tensor | None] | None = None,
        values: Mapping[str, torch.Tensor] | None = None,
        mean_grad: Mapping[str, torch.Tensor] | None = None,
    ) -> PerSampleResult:
        """Per-sample statistics of one batch, by replaying its forward.

        Args:
            args, kwargs: the model's forward inputs as captured (detached).
            output_grads: dL/dz for each leaf of the flattened output (``tree_flatten``), None for leaves
                backward did not reach, as backward delivered them.
            scale: s, with g_i = s J_i^T c_i: B for a mean loss, 1 for a sum; divided by the factor
                backward started from (AMP's loss scale).
            needs: the need names to serve (``Need.PER_SAMPLE_SQ_NORMS``, ``_DOT_MEAN``, ``_GRAM``,
                ``_GRAM_BY_PARAM``, ``_GRADS``); projections are served for ``directions``.
            directions: {key: {name: tensor}} (missing names count as zero): g_i . v per key.
            state: the :class:`ReplayState` taken before the forward (None: a deterministic forward).
            outputs: the detached outputs of the original forward, to check the replay against.
            values: the parameter values to evaluate at (default: the current ones; pass
                :meth:`snapshot` taken before ``optimizer.step()`` when calling after it).
            mean_grad: gbar = mean_i g_i by name, if known (s/B p.grad when p.grad holds exactly this
                batch's gradient); else computed from the replay (one more backward).

        Returns:
            a :class:`PerSampleResult`: ``sq_norms`` ||g_i||^2 per parameter (B,), ``dot_mean``
            g_i . gbar (B,), ``gram`` g_i . g_j per parameter (B, B), ``grads`` g_i per parameter
            (B, *shape), ``projections`` g_i . v per key (B,), as asked; every covered parameter.

        Raises:
            ReplayMismatch: the replay does not reproduce ``outputs``.
            ValueError: output gradients that do not match the output, or an output without batch axis.
        """
        self._refuse_collectives()
        flags = {str(n) for n in (needs.names() if isinstance(needs, Needs) else needs)}
        directions = dict(directions or {})
        kwargs = dict(kwargs or {})
        base = {n: (values[n] if values is not None else p).detach() for n, p in self.params.items()}
        with self._session():
            sel = [k for k, c in enumerate(output_grads) if c is not None]
            if not sel:
                raise ValueError("no output gradient: backward did not reach the model's output")
            cs = [output_grads[k] for k in sel]
            batch = self._batch(cs)
            chunked = bool(flags & {str(n) for n in CHUNK_NEEDS})
            wants_dot = str(Need.PER_SAMPLE_DOT_MEAN) in flags
            gbar = dict(mean_grad) if (wants_dot and mean_grad is not None) else None
            sq: dict[str, torch.Tensor] = {}
            gram: dict[str, torch.Tensor] = {}
            grads: dict[str, torch.Tensor] = {}
            proj: dict[str, torch.Tensor] = {}
            dot: torch.Tensor | None = None
            if chunked or (wants_dot and gbar is None):
                leaves = {n: v.detach().requires_grad_() for n, v in base.items()}
                out = self._call(leaves, args, kwargs, state, measure=chunked)
                zs = self._outputs(out, output_grads)
                self._check(out, outputs, sel)
                names = list(leaves)
                if wants_dot and gbar is None:
                    ls = [leaves[n] for n in names]
                    gs = torch.autograd.grad(zs, ls, cs, retain_graph=chunked, allow_unused=True)
                    gbar = {n: _or_zeros(g, leaves[n]) * (scale / batch) for n, g in zip(names, gs, strict=True)}
                if chunked:
                    dirs = dict(directions)
                    if wants_dot:
                        dirs[_GBAR] = gbar
                    sq, gram, grads, proj = self._chunks(zs, cs, leaves, names, batch, scale, flags, dirs)
                    dot = proj.pop(_GBAR, None)
                    directions = {}
                del out, zs
            replay = (args, kwargs, state, outputs, output_grads, scale)
            if wants_dot and dot is None:
                dot = self._project(base, gbar, *replay)
            for key, d in directions.items():
                proj[key] = self._project(base, d, *replay)
        if wants_dot and mean_grad is not None:
            self.sum_ratio = self._ratio(dot, mean_grad, batch)
        return self._result(sq, dot if wants_dot else None, gram, grads, proj)

    def joined_statistics(
        self,
        captures: Sequence[Capture],
        scale: float,
        needs: Needs | Iterable[str],
        directions: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        *,
        values: Mapping[str, torch.Tensor] | None = None,
        mean_grad: Mapping[str, torch.Tensor] | None = None,
    ) -> PerSampleResult:
        """Per-sample statistics of a step that accumulated the gradients of several micro-batches (one
        model call and one backward each), over its N = sum_k B_k examples in the order of the calls.

        Micro-batch k's examples interact only through its own batch statistics, so example i of it has
        g_i = s J_i^T c_i with J_i through micro-batch k's graph as it was and c its output gradient
        (that of its backward's loss w_k L_k). With s = N for a mean loss (1 for a sum), divided by the
        factor backward started from, these are the step's g_i: r_k = N / B_k times micro-batch k's own
        per-sample gradients s_k J_i^T c_i (s_k = B_k), and p.grad = mean_i g_i (sum_i g_i).

        Each micro-batch is replayed on its own (:meth:`statistics`, the same replay, check and chunks):
        squared norms, g_i, projections onto ``directions`` and onto gbar (g_i . gbar, ``mean_grad``:
        the step's gradient, e.g. p.grad after the last backward; else the sum of one VJP per micro-batch)
        and Gram blocks within it. Gram entries g_i . g_j of two micro-batches replay both (two graphs
        alive) and take chunks of VJPs of each (:meth:`_cross_gram`). Memory: what one micro-batch's
        :meth:`statistics` takes, two replays for Gram entries, plus the (N,) results (N x N for Gram
        entries, N x D for g_i).

        Args:
            captures: the step's model calls whose outputs backward reached, in order.
            scale: s as above. needs, directions, values: as for :meth:`statistics`.
            mean_grad: gbar = mean_i g_i over the step, by name (None: computed from the replays, one VJP
                per micro-batch; also when the given one is not the mean of the g_i, by ``sum_ratio``).
        """
        flags = {str(n) for n in (needs.names() if isinstance(needs, Needs) else needs)}
        if not captures:
            raise ValueError("no micro-batch to replay")
        base = {n: (values[n] if values is not None else p).detach() for n, p in self.params.items()}
        batches = [self.batch_of(c) for c in captures]
        n = sum(batches)
        wants_dot = str(Need.PER_SAMPLE_DOT_MEAN) in flags
        dirs = dict(directions or {})
        if wants_dot:
            gbar = dict(mean_grad) if mean_grad is not None else self._joined_mean(captures, scale, base, n)
            dirs[_STEP_GBAR] = gbar
        pairs = flags & {str(Need.PER_SAMPLE_GRAM), str(Need.PER_SAMPLE_GRAM_BY_PARAM)}
        inner = flags - {str(Need.PER_SAMPLE_DOT_MEAN)}
        results = [
            self.statistics(
                c.args, c.kwargs, c.output_grads, scale, inner, dirs, state=c.state, outputs=c.outputs, values=base
            )
            for c in captures
        ]

        def join(parts: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
            return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

        sq = join([r.sq_norms for r in results]) if results[0].sq_norms else {}
        grads = join([r.grads for r in results]) if results[0].grads else {}
        proj = join([r.projections for r in results]) if results[0].projections else {}
        dot = proj.pop(_STEP_GBAR, None)
        gram: dict[str, torch.Tensor] = {}
        if pairs:
            starts = [sum(batches[:k]) for k in range(len(batches) + 1)]
            rows = [slice(starts[k], starts[k + 1]) for k in range(len(batches))]
            for name, g in results[0].gram.items():
                gram[name] = g.new_zeros(n, n)
            for k, r in enumerate(results):
                for name, g in r.gram.items():
                    gram[name][rows[k], rows[k]] = g
            for k in range(len(captures)):
                for m in range(k + 1, len(captures)):
                    for name, block in self._cross_gram(captures[k], captures[m], scale, base).items():
                        gram[name][rows[k], rows[m]] = block
                        gram[name][rows[m], rows[k]] = block.T
        if wants_dot and dot is not None:
            self.sum_ratio = self._ratio(dot, dirs[_STEP_GBAR], n)
            rtol = 3e-2 if any(c.state is not None and c.state.amp for c in captures) else 1e-3
            if mean_grad is not None and self.sum_ratio is not None and abs(self.sum_ratio - 1.0) > rtol:
                # the given gbar is not the mean of these g_i (p.grad held more): take it from the replays
                gbar = self._joined_mean(captures, scale, base, n)
                parts = [
                    self.statistics(
                        c.args, c.kwargs, c.output_grads, scale, (), {_STEP_GBAR: gbar},
                        state=c.state, outputs=c.outputs, values=base,
                    ).projections[_STEP_GBAR]
                    for c in captures
                ]  # fmt: skip
                dot = torch.cat(parts)
                self.sum_ratio = self._ratio(dot, gbar, n)
        return self._result(sq, dot if wants_dot else None, gram, grads, proj)

    def _result(self, sq: dict, dot: torch.Tensor | None, gram: dict, grads: dict, proj: dict) -> PerSampleResult:
        """The result of a coupled step: every parameter the path differentiates is covered."""
        return PerSampleResult(sq, dot, gram, grads, proj, self.params, None)

    @staticmethod
    def _ratio(dot: torch.Tensor, gbar: Mapping[str, torch.Tensor], n: int) -> float | None:
        """sum_i g_i . gbar / (N ||gbar||^2): 1 when gbar is the mean of the g_i."""
        g2 = sum(float(g.double().square().sum()) for g in gbar.values())
        return float(dot.double().sum()) / (n * g2) if g2 > 0 else None

    def batch_of(self, capture: Capture) -> int:
        """The examples of one captured call: the batch axis of the outputs backward reached."""
        return self._batch([c for c in capture.output_grads if c is not None])

    def _joined_mean(self, captures, scale, base, n) -> dict[str, torch.Tensor]:
        """gbar = (1/N) sum_i g_i = (s/N) sum_k J_k^T c_k: one VJP of each micro-batch's replay."""
        total = {name: torch.zeros_like(v) for name, v in base.items()}
        with self._session():
            for c in captures:
                leaves = {name: v.detach().requires_grad_() for name, v in base.items()}
                out = self._call(leaves, c.args, c.kwargs, c.state)
                sel = self._match(out, c.output_grads)
                self._check(out, c.outputs, sel)
                zs = self._outputs(out, c.output_grads)
                names = list(leaves)
                gs = torch.autograd.grad(
                    zs, [leaves[k] for k in names], [c.output_grads[k] for k in sel], allow_unused=True
                )
                for name, g in zip(names, gs, strict=True):
                    if g is not None:
                        total[name] += g.detach()
        return {name: t * (scale / n) for name, t in total.items()}

    def _mode(self) -> str:
        """How chunks outside the ``"auto"`` trial run: batched until the trial (or a failure) decides."""
        return "batched" if self.vjp_mode == "auto" else self.vjp_mode

    def _cross_gram(self, left: Capture, right: Capture, scale, base) -> dict[str, torch.Tensor]:
        """{name: (B_l, B_r)} g_i . g_j for i of one micro-batch and j of another: both replayed (two
        graphs alive), chunks of VJPs of the left one, each against every chunk of the right one (the
        right chunks are recomputed for each left chunk, as for Gram entries across chunks of one batch)."""
        with self._session():
            leaves = {name: v.detach().requires_grad_() for name, v in base.items()}
            names = list(leaves)
            ls = [leaves[k] for k in names]
            sides, largest = [], 0
            for c in (left, right):
                out = self._call(leaves, c.args, c.kwargs, c.state, measure=True)
                largest = max(largest, self.largest_saved)
                sel = self._match(out, c.output_grads)
                self._check(out, c.outputs, sel)
                sides.append((self._outputs(out, c.output_grads), [c.output_grads[k] for k in sel]))
            self.largest_saved = largest
            (zl, cl), (zr, cr) = sides
            bl, br = cl[0].shape[self.batch_axis], cr[0].shape[self.batch_axis]
            size = self._chunk_size(leaves, zl + zr, max(bl, br), pairs=True)
            dtype, device = _result_dtype(leaves), cl[0].device
            out = {name: torch.zeros(bl, br, dtype=dtype, device=device) for name in names}
            for a in range(0, bl, size):
                ia = list(range(a, min(bl, a + size)))
                ga = [g.flatten(1) for g in self._vjp_rows(zl, cl, ls, ia, scale, self._mode())]
                for b in range(0, br, size):
                    ib = list(range(b, min(br, b + size)))
                    gb = [g.flatten(1) for g in self._vjp_rows(zr, cr, ls, ib, scale, self._mode())]
                    with torch.no_grad():
                        for name, g, h in zip(names, ga, gb, strict=True):
                            out[name][a : a + len(ia), b : b + len(ib)] = (g @ h.T).to(dtype)
                    del gb
                del ga
        return out

    def _refuse_collectives(self) -> None:
        """SyncBatchNorm in train mode across processes: the batch statistics couple the examples of
        every rank, and a replay on one rank would start collectives the others never join."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        synced = [n for n, m in self.model.named_modules() if isinstance(m, nn.SyncBatchNorm) and m.training]
        if synced:
            raise ValueError(
                f"SyncBatchNorm in train mode ({', '.join(synced)}) couples the examples of every process; per-sample "
                "gradients would need the other ranks' examples, and a replay would hang in its collectives"
            )

    def _batch(self, cs: Sequence[torch.Tensor]) -> int:
        sizes = set()
        for c in cs:
            if c.dim() <= self.batch_axis:
                raise ValueError(
                    f"an output of shape {tuple(c.shape)} has no batch axis {self.batch_axis}: the coupled path needs "
                    "every output that gets a gradient to carry the batch (a loss computed inside the model has no "
                    "per-example rows)"
                )
            sizes.add(c.shape[self.batch_axis])
        if len(sizes) != 1:
            raise ValueError(f"the outputs' batch axis {self.batch_axis} gives several batch sizes: {sorted(sizes)}")
        return sizes.pop()

    @staticmethod
    def _match(out: Sequence[Any], output_grads: Sequence[Any]) -> list[int]:
        """The leaves of the replayed output that got a gradient, checked against the gradients."""
        if len(out) != len(output_grads):
            raise ValueError(
                f"{len(output_grads)} output gradients for an output with {len(out)} leaves: give one per leaf of "
                "the flattened output (None where backward did not reach it)"
            )
        sel = [k for k, c in enumerate(output_grads) if c is not None]
        for k in sel:
            if not torch.is_tensor(out[k]) or out[k].shape != output_grads[k].shape:
                shape = tuple(out[k].shape) if torch.is_tensor(out[k]) else type(out[k]).__name__
                raise ValueError(
                    f"the replayed model call's output {k} is {shape}, the gradient backward brought to it "
                    f"{tuple(output_grads[k].shape)}: the loop calls parts of the model (or its output changed "
                    "shape); train-mode BatchNorm's per-sample statistics need the whole forward as one call"
                )
        return sel

    @classmethod
    def _outputs(cls, out: Sequence[Any], output_grads: Sequence[Any]) -> list[torch.Tensor]:
        zs = [out[k] for k in cls._match(out, output_grads)]
        if not all(z.requires_grad for z in zs):
            raise ValueError("an output got a gradient but its replay does not depend on the parameters")
        return zs

    # --- projections: one JVP per direction --------------------------------------------------------------
    def _project(self, base, direction, args, kwargs, state, outputs, output_grads, scale) -> torch.Tensor:
        """g_i . v = s <(J v)_i, c_i> for all i: (B,)."""
        sel = [k for k, c in enumerate(output_grads) if c is not None]
        cs = [output_grads[k] for k in sel]
        batch = cs[0].shape[self.batch_axis]
        keys = [n for n in base if n in direction]
        dtype = _result_dtype(base)
        if not keys:
            return torch.zeros(batch, dtype=dtype, device=cs[0].device)
        tangent = {n: direction[n].detach().to(base[n]).reshape(base[n].shape) for n in keys}
        if self.projection_method == "jvp":
            try:
                tangents = self._jvp(base, tangent, args, kwargs, state, outputs, output_grads)
            except ReplayMismatch:
                raise
            except (RuntimeError, NotImplementedError) as e:
                self.projection_method = "double_vjp"
                warn(
                    f"forward-mode differentiation failed on this model ({type(e).__name__}: {str(e)[:200]}); "
                    "projections of the coupled path use reverse-over-reverse differentiation from now on (exact, "
                    "about twice the cost)"
                )
        if self.projection_method == "double_vjp":
            tangents = self._double_vjp(base, tangent, args, kwargs, state, outputs, output_grads)
        total = None
        for t, c in zip(tangents, cs, strict=True):
            part = _per_row(t.to(dtype), c.to(dtype), self.batch_axis)
            total = part if total is None else total + part
        return total * scale

    def _jvp(self, base, tangent, args, kwargs, state, outputs, output_grads) -> list[torch.Tensor]:
        fixed = {n: v for n, v in base.items() if n not in tangent}
        primal = {n: base[n] for n in tangent}

        def f(p):
            return tuple(self._call({**fixed, **p}, args, kwargs, state))

        with warnings.catch_warnings():
            # torch loads its forward-AD decompositions (TorchScript) at the first JVP of a process
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
            out, tout = torch.func.jvp(f, (primal,), (tangent,))
        sel = self._match(out, output_grads)
        self._check(out, outputs, sel)
        return [tout[k] if torch.is_tensor(tout[k]) else torch.zeros_like(out[k]) for k in sel]

    def _double_vjp(self, base, tangent, args, kwargs, state, outputs, output_grads) -> list[torch.Tensor]:
        """J v as the gradient with respect to u of <J^T u, v> (J^T u is linear in u)."""
        leaves = {n: (v.clone().requires_grad_() if n in tangent else v) for n, v in base.items()}
        out = self._call(leaves, args, kwargs, state)
        sel = self._match(out, output_grads)
        self._check(out, outputs, sel)
        zs = [out[k] for k in sel]
        us = [torch.zeros_like(z, requires_grad=True) for z in zs]
        names = list(tangent)
        ws = torch.autograd.grad(zs, [leaves[n] for n in names], us, create_graph=True, allow_unused=True)
        inner = sum((w * tangent[n]).sum() for n, w in zip(names, ws, strict=True) if w is not None)
        if cut_second_derivative([inner]):  # J v would silently miss what passes that op: wrong numbers
            raise RuntimeError(
                "the coupled path's projections need a second derivative (reverse over reverse) that an op of the "
                "model does not have (a custom autograd Function marked once_differentiable); its per-sample "
                "projections are left out"
            )
        if not torch.is_tensor(inner) or not inner.requires_grad:
            return [torch.zeros_like(z) for z in zs]
        jv = torch.autograd.grad(inner, us, allow_unused=True)
        return [torch.zeros_like(z) if t is None else t for t, z in zip(jv, zs, strict=True)]

    # --- squared norms, Gram, materialised g_i: chunks of batched VJPs ---------------------------------
    def _chunk_size(self, leaves, zs, batch: int, pairs: bool) -> int:
        """Examples per chunk: ``chunk_bytes`` over the estimated bytes per example, D gradient entries
        plus four copies of the largest tensor the replay saved for backward (activation gradients
        of the whole batch); the budget is halved when two chunks are alive (Gram across chunks)."""
        if self.chunk is not None:
            size = self.chunk
        else:
            per = sum(v.numel() * v.element_size() for v in leaves.values())
            per += 4 * max([self.largest_saved] + [z.numel() * z.element_size() for z in zs])
            budget = self.chunk_bytes // (2 if pairs else 1)
            size = max(1, budget // max(per, 1))
            self.last_chunk = (min(batch, size), per)
        return int(max(1, min(batch, size)))

    def _vjp_rows(
        self, zs, cs, leaves: list[torch.Tensor], idx: Sequence[int], scale: float, mode: str
    ) -> list[torch.Tensor]:
        """g_i for i in idx, per parameter (len(idx), *shape): s J_i^T c_i."""
        go = [_rows(c.to(z.dtype), idx, self.batch_axis) for z, c in zip(zs, cs, strict=True)]
        gs = None
        if len(idx) > 1 and mode != "loop":
            try:
                gs = torch.autograd.grad(zs, leaves, go, retain_graph=True, is_grads_batched=True, allow_unused=True)
            except RuntimeError as e:
                self.vjp_mode = "loop"
                warn(
                    f"batched backward (vmap) failed on this model ({str(e)[:200]}); the coupled path takes one "
                    "backward per example from now on (exact)"
                )
        if gs is None:  # one backward per example, written into the chunk's buffers (no second copy)
            out = [p.new_zeros((len(idx), *p.shape)) for p in leaves]
            for k in range(len(idx)):
                row = torch.autograd.grad(zs, leaves, [g[k] for g in go], retain_graph=True, allow_unused=True)
                for buf, g in zip(out, row, strict=True):
                    if g is not None:
                        torch.mul(g, scale, out=buf[k])
            return out
        # in place: no second C x D copy (the grads are fresh tensors, and go is dropped)
        return [
            p.new_zeros((len(idx), *p.shape)) if g is None else g.mul_(scale) for g, p in zip(gs, leaves, strict=True)
        ]

    def _timed_rows(self, zs, cs, leaves, idx, scale, trial: dict[int, str], a: int) -> list[torch.Tensor]:
        """:meth:`_vjp_rows` of span ``a``; during the ``"auto"`` trial span 0 runs batched and span 1 as a
        loop, and the faster per example becomes :attr:`vjp_mode`."""
        if a not in trial or self.vjp_mode != "auto":
            return self._vjp_rows(zs, cs, leaves, idx, scale, "batched" if self.vjp_mode == "auto" else self.vjp_mode)
        sync = torch.cuda.synchronize if zs[0].is_cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        out = self._vjp_rows(zs, cs, leaves, idx, scale, trial[a])
        sync()
        if self.vjp_mode == "auto":  # still: the batched way did not fail
            self.vjp_times[trial[a]] = (time.perf_counter() - t0) / len(idx)
            if len(self.vjp_times) == 2:
                self.vjp_mode = min(self.vjp_times, key=self.vjp_times.get)
        return out

    def _chunks(self, zs, cs, leaves, names, batch, scale, flags, dirs):
        pairs = bool(flags & {str(Need.PER_SAMPLE_GRAM), str(Need.PER_SAMPLE_GRAM_BY_PARAM)})
        size = self._chunk_size(leaves, zs, batch, pairs)
        spans = [list(range(a, min(batch, a + size))) for a in range(0, batch, size)]
        trial: dict[int, str] = {}
        self._passes += 1
        if self.vjp_mode == "auto" and batch >= 2 and self._passes >= 2:
            if len(spans) == 1:  # one chunk would do: two halves for the trial
                spans = [spans[0][: batch // 2], spans[0][batch // 2 :]]
            trial = {0: "batched", 1: "loop"}
        ls = [leaves[n] for n in names]
        dtype, device = _result_dtype(leaves), cs[0].device
        sq = {n: torch.zeros(batch, dtype=dtype, device=device) for n in names}
        proj = {k: torch.zeros(batch, dtype=dtype, device=device) for k in dirs}
        gram = {n: torch.zeros(batch, batch, dtype=dtype, device=device) for n in names} if pairs else {}
        grads = {}
        if str(Need.PER_SAMPLE_GRADS) in flags:
            grads = {n: leaves[n].new_empty((batch, *leaves[n].shape)) for n in names}
        flat_dirs = {k: {n: d[n].detach().to(leaves[n]).reshape(-1) for n in names if n in d} for k, d in dirs.items()}
        for a, ia in enumerate(spans):
            ga = [g.flatten(1) for g in self._timed_rows(zs, cs, ls, ia, scale, trial, a)]
            rows = slice(ia[0], ia[-1] + 1)
            with torch.no_grad():
                for n, g in zip(names, ga, strict=True):
                    sq[n][rows] = g.square().sum(1).to(dtype)
                    if grads:
                        grads[n][rows] = g.view(grads[n][rows].shape)
                for k, d in flat_dirs.items():
                    for n, v in d.items():
                        proj[k][rows] += (ga[names.index(n)] @ v).to(dtype)
                if pairs:
                    for n, g in zip(names, ga, strict=True):
                        gram[n][rows, rows] = (g @ g.T).to(dtype)
            if pairs:
                for ib in spans[a + 1 :]:
                    gb = [g.flatten(1) for g in self._timed_rows(zs, cs, ls, ib, scale, {}, -1)]
                    cols = slice(ib[0], ib[-1] + 1)
                    with torch.no_grad():
                        for n, g, h in zip(names, ga, gb, strict=True):
                            block = (g @ h.T).to(dtype)
                            gram[n][rows, cols] = block
                            gram[n][cols, rows] = block.T
                    del gb
            del ga
        if not flags & {str(n) for n in SQ_NEEDS}:
            sq = {}
        return sq, gram, grads, proj


def _result_dtype(values: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype of the statistics: the parameters' (at least float32, e.g. under autocast)."""
    dtype = next(iter(values.values())).dtype if values else torch.float32
    return torch.promote_types(dtype, torch.float32)


def _or_zeros(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g


_GBAR = "\0gbar"  # internal key of the mean gradient among the chunk pass's directions
_STEP_GBAR = "\0step gbar"  # the same for the step's mean gradient, among the micro-batches' directions


__all__ = [
    "CHUNK_BYTES",
    "Capture",
    "CoupledPath",
    "CoupledRecorder",
    "ReplayMismatch",
    "ReplayState",
    "coupling_modules",
]
