"""The per-sample engine: per-layer hooks that turn factor pairs into the statistics a step needs.

Data flow within one step: a forward hook on every handled module keeps its (detached) inputs and
registers a hook on its output; when the output gradient arrives during ``backward()`` the layer is
reduced at once to what the step needs (squared norms, Gram entries, dot products with the mean) and
its inputs are released. Only when an instrument asks for projections onto a direction known after
the optimizer step (the update) are the layer's factors kept until the step's post-hook. Under
gradient accumulation each micro-batch is reduced into a segment, and the segments are joined over
the step's examples (:meth:`PerSampleEngine._joined`); g_i . gbar and Gram entries then need every
micro-batch's views until the optimizer's pre-hook (docs/design.md, "Gradient accumulation").
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from cockpit_lite.compat import (
    BatchNormBase,
    InstanceNormBase,
    graph_nodes,
    tensor_version,
    tree_flatten,
    tree_leaves,
    tree_map,
)
from cockpit_lite.errors import CockpitWarning
from cockpit_lite.hooks import SharedHook, on_gradient
from cockpit_lite.needs import Need, Needs
from cockpit_lite.pause import is_paused, paused
from cockpit_lite.persample.broadcast import BroadcastTracker, expand_over_batch
from cockpit_lite.persample.checks import DeferredCheck
from cockpit_lite.persample.layers import (
    AttentionHandler,
    BareParamsHandler,
    FuncHandler,
    Handler,
    LayerLeftOut,
    LinearHandler,
    PerSampleUndefined,
    SampleAxes,
    build_handlers,
    tied_groups,
)
from cockpit_lite.persample.uses import call_nodes, outside_uses
from cockpit_lite.persample.views import (
    JoinedView,
    View,
    combined,
    factor_grams_cheaper,
    joined_gram,
    tied_view,
    view_bytes,
)
from cockpit_lite.profiling import Costs, timed
from cockpit_lite.sandbox import cuda_devices, scratch_state

#: modules whose CUDA kernels come from cuDNN (TF32 by ``torch.backends.cudnn.allow_tf32``, on by default)
_CUDNN_MODULES = (nn.modules.conv._ConvNd, nn.RNNBase)


def _tf32(t: torch.Tensor, module: nn.Module | None = None) -> bool:
    """Whether CUDA products on ``t`` may run in TF32 (10-bit mantissa, relative error ~1e-3): matrix
    products (cuBLAS: the engine's own, a Linear layer's) when ``allow_tf32`` or a float32 matmul
    precision below "highest" allows it; ``module``'s own kernels too when cuDNN computes them
    (convolutions, RNNs: cuDNN's flag, on by default, says nothing of a Linear layer's products)."""
    if not (t.is_cuda and t.dtype == torch.float32):
        return False
    if torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest":
        return True
    return isinstance(module, _CUDNN_MODULES) and torch.backends.cudnn.allow_tf32


@dataclass(frozen=True)
class PerSampleResult:
    """One step's per-sample statistics (tensors on the model's device), read-only."""

    #: ||g_i||^2 per parameter name, shape (B,); their sum alone under ``ALL_PARAMS`` when the step asked
    #: for the total only (``Need.PER_SAMPLE_SQ_NORMS`` without ``_BY_PARAM``)
    sq_norms: Mapping[str, torch.Tensor]
    dot_mean: torch.Tensor | None  #: g_i . gbar over every covered parameter, shape (B,)
    gram: Mapping[str, torch.Tensor]  #: g_i . g_j per parameter name, shape (B, B)
    grads: Mapping[str, torch.Tensor]  #: materialised g_i per parameter name, shape (B, *p.shape)
    projections: Mapping[str, torch.Tensor]  #: g_i . v per direction key, shape (B,)
    covered: frozenset[str]  #: parameter names whose per-sample gradients were seen
    failure: str | None  #: why nothing was computed this step (None: all is well)
    notes: tuple[str, ...] = ()  #: what was left out, and why
    #: conditions the statistics hold under, decided with the step's values on the host
    checks: tuple[DeferredCheck, ...] = ()

    def __post_init__(self) -> None:
        """Read-only views of the mappings the engine built (it builds new ones for its next step)."""
        for name in ("sq_norms", "gram", "grads", "projections"):
            object.__setattr__(self, name, MappingProxyType(getattr(self, name)))
        object.__setattr__(self, "covered", frozenset(self.covered))
        object.__setattr__(self, "notes", tuple(self.notes))
        object.__setattr__(self, "checks", tuple(self.checks))


def _projections(views: list[View], directions: Mapping) -> dict[str, torch.Tensor]:
    """g_i . v summed over the layers' views, per direction key (keys no view serves are absent)."""
    out: dict[str, torch.Tensor] = {}
    for view in views:
        for key, p in view.project_many(directions).items():
            out[key] = p if key not in out else out[key] + p
    return out


@dataclass
class _Segment:
    """One micro-batch of an accumulated step: what the engine computed for it."""

    batch: int
    mean: bool
    sq: dict
    dot_mean: torch.Tensor | None
    kept: list
    covered: set
    gram: dict  #: its own Gram entries {name: (B_k, B_k)} (the diagonal block of the step's)
    grads: dict  #: its materialised g_i {name: (B_k, *shape)}
    whole: bool  #: every view of the micro-batch was kept (cross products and projections can be joined)


@dataclass
class _Calls:
    captures: list = field(default_factory=list)
    grads: dict[int, tuple] = field(default_factory=dict)
    #: per call, the weight gradient autograd computed for that call (when the layer's own backward
    #: node could be hooked): sum_i g_i up to the gradient scale, free instead of recomputed
    weight_grads: dict[int, torch.Tensor] = field(default_factory=dict)
    #: per call whose shapes alone do not tell the sample axis: where it lies (the shape probe's answer)
    axes: dict[int, SampleAxes] = field(default_factory=dict)
    #: the batch size each entry of ``axes`` holds for (a loss that later sets another batch voids it)
    axes_batch: dict[int, int] = field(default_factory=dict)


def _outside_gradients(handler: Handler, output: Any) -> bool:
    """Whether the engine hands a call's outputs downstream as copies, to see only the gradients
    that reach them from outside the call (``_forward_hook``): for modules replayed by torch.func (whose
    outputs may be computed from one another: an encoder returning every layer's hidden states) with several
    outputs in plain tuples and lists, or in a Hugging Face ``ModelOutput`` (a PackedSequence or another
    dict output is left as it is). Attention's factor form reads its outputs' own."""
    if not isinstance(handler, FuncHandler) or isinstance(handler, AttentionHandler):
        return False

    def plain(x: Any) -> bool:
        if type(x) in (tuple, list):
            return all(plain(y) for y in x)
        return torch.is_tensor(x) or x is None or isinstance(x, (bool, int, float, str))

    if _is_model_output(output):
        return all(plain(v) for v in output.values())
    return type(output) in (tuple, list) and plain(output)


def _is_model_output(x: Any) -> bool:
    """A Hugging Face ``ModelOutput`` (an ordered dict of tensors that pytree maps as its own class), told by
    its base class's name and module without importing transformers."""
    return isinstance(x, collections.OrderedDict) and any(
        c.__name__ == "ModelOutput" and c.__module__.startswith("transformers") for c in type(x).__mro__
    )


def _outside_copy(t: Any) -> Any:
    """``t.clone()`` for a tensor that requires grad (a new autograd node of its own), else ``t``. Not a view:
    an in-place op downstream (``nn.ReLU(inplace=True)`` after a GRU) on a view would rebase it onto the
    call's output, past the hook on the view's node, and the call would get no gradient at all."""
    return t.clone() if torch.is_tensor(t) and t.requires_grad else t


#: the autograd nodes of the matrix products a layer reshapes into its output (F.linear on (B, T, d) inputs,
#: transformers' Conv1D): view(addmm(...)) or view(mm(...))
_PRODUCTS = frozenset({"AddmmBackward0", "MmBackward0"})


def _product_under_view(out: torch.Tensor) -> torch.Tensor | None:
    """The product ``out`` is a reshaping view of (F.linear on a (B, T, d) input returns view(addmm), a
    tensor the layer made and nothing else holds), or None. The engine takes the layer's output gradient
    at the product's node: an in-place op downstream (``nn.ReLU(inplace=True)``, ``x += r``) rebases a view
    onto its base, past the view's own node, whose hook then never runs (the layer was left out as unseen);
    the product's node receives the same gradient either way."""
    if not out._is_view():
        return None
    base = out._base
    node = base.grad_fn if base is not None else None
    if node is None or node.name() not in _PRODUCTS or base.numel() != out.numel():
        return None
    return base if base.is_contiguous() and out.is_contiguous() else None


def _rebasable(t: torch.Tensor, single: bool) -> bool:
    """A layer's output an in-place op downstream would rebase past the engine's hook: a view, other than the
    single output's reshaping view of a product (:func:`_product_under_view`: the engine takes its gradient at
    the product; several outputs share one hook on themselves)."""
    return t._is_view() and not (single and _product_under_view(t) is not None)


def _copy_if_rebasable(t: Any, single: bool) -> Any:
    return t.clone() if torch.is_tensor(t) and t.requires_grad and _rebasable(t, single) else t


def _leaf_shapes(tree: Any) -> tuple[tuple[int, ...] | None, ...]:
    """The shape of every leaf of ``tree`` (None for a leaf that is no tensor)."""
    return tuple(tuple(t.shape) if torch.is_tensor(t) else None for t in tree_leaves(tree))


def _tensor_shapes(tree: Any) -> tuple[tuple[int, ...], ...]:
    """The shapes of the tensor leaves of ``tree``."""
    return tuple(tuple(t.shape) for t in tree_leaves(tree) if torch.is_tensor(t))


def _several_batch_axes(shapes: tuple, batch: int) -> bool:
    """Whether some tensor has more than one axis of size ``batch``: its sample axis is not told by shape."""
    return any(s is not None and sum(1 for n in s if n == batch) > 1 for s in shapes)


def _flattened(args: tuple, batch: int) -> bool:
    """Whether a call's first argument has an axis of a multiple of the batch size and none of the batch
    size first: its examples may be flattened with their positions ((B T, d) rows, as OPT's feed-forward
    blocks and Swin's windows have them; (B k, N, d) rows with N == B, as MobileViT's unfolded patches and
    PatchTST's channels have them at some sizes), which the shape probe tells
    (:meth:`PerSampleEngine._resolve_pending`). An argument whose first axis has the batch size is taken to
    be batch-first, as the layers' own rules take it."""
    x = args[0] if args and torch.is_tensor(args[0]) else None
    return x is not None and x.dim() > 0 and x.shape[0] != batch and any(n > batch and n % batch == 0 for n in x.shape)


def _same_first_rows(
    first: torch.Tensor, axis: int | None, probe: torch.Tensor | None, batch: int, grouped: bool = False
) -> int:
    """For a call whose examples are flattened with their positions along ``axis`` (B k rows): the probe's
    (B - 1) k rows must be the step's first ones (up to float32 round-off of another batch size), as they
    are when the flattening goes example by example: returns 1. With ``grouped`` (a torch.func replay
    serves the call) the rows may also lie as (G, B, k / G), every example's rows repeated in G groups
    (Llama 4's experts: the tokens once per expert): the probe's (G, B - 1, k / G) must then be the first
    B - 1 of each group; returns the least such G. Another order (positions first: (T, B) flattened) is
    refused, never guessed. A read of values, once per shape (the probe runs once).

    Raises:
        ValueError: the rows differ, or the probe did not see the call's argument."""
    if axis is None or first.shape[axis] == batch:
        return 1
    if probe is None or probe.shape[axis] > first.shape[axis]:
        raise ValueError("the shape probe did not see the call's first argument")
    if _rows_match(first.narrow(axis, 0, probe.shape[axis]), probe, first):
        return 1
    k = first.shape[axis] // batch
    if grouped and batch > 1 and first.shape[axis] == batch * k and probe.shape[axis] == (batch - 1) * k:
        for g in range(2, k + 1):
            if k % g:
                continue
            mine, theirs = first.unflatten(axis, (g, batch, k // g)), probe.unflatten(axis, (g, batch - 1, k // g))
            # (the first row of each group first: a cheap refusal of most groupings)
            heads = [t.narrow(axis + 1, 0, 1).narrow(axis + 2, 0, 1) for t in (mine, theirs)]
            if _rows_match(*heads, first) and _rows_match(mine.narrow(axis + 1, 0, batch - 1), theirs, first):
                return g
    raise ValueError(
        f"its {first.shape[axis]} rows along axis {axis} hold {batch} examples with their positions, but the "
        "shape probe found them in another order than example by example"
        + (" or grouped example by example" if grouped else "")
        + " (or a random op, dropout, drew other numbers in it)"
    )


def _rows_match(head: torch.Tensor, probe: torch.Tensor, first: torch.Tensor) -> bool:
    """Whether the step's rows ``head`` are the probe's (float32 round-off of another batch size allowed)."""
    if head.shape != probe.shape:
        raise ValueError(f"its first argument {tuple(first.shape)} became {tuple(probe.shape)} in the probe")
    if head.is_floating_point():
        scale = float(head.abs().max()) if head.numel() else 0.0
        return torch.allclose(head.double(), probe.double(), rtol=1e-4, atol=1e-6 * scale)
    return torch.equal(head, probe)


def _changed_axis(
    real: tuple[int, ...] | None, probe: tuple[int, ...] | None, batch: int, flattened: bool = False
) -> int | None:
    """The sample axis of a tensor of shape ``real`` (batch B) that had shape ``probe`` when the model ran
    on B - 1 examples: the one axis whose size followed the batch (B to B - 1; with ``flattened``, also B k
    to (B - 1) k for examples flattened with their positions, whose order :func:`_same_first_rows`
    checks); None for a tensor shared by every example (no axis changed). Raises ValueError when the
    shapes differ in any other way (other data, another code path) or several axes followed the batch."""
    if real is None or probe is None:
        if real != probe:
            raise ValueError("a tensor argument in one run is not a tensor in the other")
        return None
    if len(real) != len(probe):
        raise ValueError(f"shape {real} became {probe}")
    changed = [a for a, (n, m) in enumerate(zip(real, probe, strict=True)) if n != m]
    if any(
        (real[a] % batch or probe[a] * batch != real[a] * (batch - 1))
        if flattened
        else (real[a] != batch or probe[a] != batch - 1)
        for a in changed
    ):
        raise ValueError(f"shape {real} became {probe}, not only along an axis of the batch size")
    if len(changed) > 1:
        raise ValueError(f"shape {real} became {probe}: several axes follow the batch")
    return changed[0] if changed else None


class _WritesParameter(Exception):
    """The probe's forward was about to write a parameter in place (stopped before the write)."""


_INPLACE_DUNDERS = frozenset(
    {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__"}
    | {"__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__"}
)


class _LookupRecorder(TorchFunctionMode):
    """Active during TracIn's probe forward (the engine's own pass) when an ``nn.Embedding`` subclass is
    read at its lookup: records each ``F.embedding`` of such a module's weight, (indices, output, its
    version), so the probe differentiates with respect to the lookup's own output."""

    def __init__(self, weights: list[torch.Tensor]):
        super().__init__()
        self.weights = {id(w) for w in weights}
        self.calls: dict[int, list[tuple[torch.Tensor, torch.Tensor, int]]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.embedding:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if id(weight) in self.weights:
                indices = args[0] if args else kwargs["input"]
                self.calls.setdefault(id(weight), []).append((indices, out, tensor_version(out)))
        return out


class _ParameterGuard(TorchFunctionMode):
    """Active during the shape probe: stops the forward before any in-place op on a tensor that shares
    storage with a parameter (``clamp_``, ``copy_``, ``__setitem__``, an ``out=`` argument, through
    ``.data`` too), so that a forward that writes its own parameters changes nothing and the probe
    reports it."""

    def __init__(self, params: dict[int, str]):
        super().__init__()
        self.params = params  #: storage address -> parameter name

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inplace = (name.endswith("_") and not name.startswith("__")) or name in _INPLACE_DUNDERS
        targets = [args[0]] if inplace and args else []
        out = kwargs.get("out")
        targets += [t for t in (out if isinstance(out, (tuple, list)) else [out]) if t is not None]
        for t in targets:
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() in self.params:
                raise _WritesParameter(f"{name} on {self.params[t.untyped_storage().data_ptr()]}")
        return func(*args, **kwargs)


def _sharded(model: nn.Module) -> bool:
    """Whether the model's forward gathers its parameters with collectives (FSDP2's DTensor parameters,
    FSDP1's wrapper modules)."""
    import sys

    tensor, fsdp = sys.modules.get("torch.distributed.tensor"), sys.modules.get("torch.distributed.fsdp")
    dtensor = getattr(tensor, "DTensor", None)
    wrapper = getattr(fsdp, "FullyShardedDataParallel", None)
    if dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters()):
        return True
    return wrapper is not None and any(isinstance(m, wrapper) for m in model.modules())


@dataclass(frozen=True)
class _Pending:
    """A module call of the current model forward with several axes of the batch size, unresolved."""

    module: nn.Module
    idx: int  #: its index among the module's calls this step (``_Calls``)
    key: tuple  #: (module, order in the forward, batch, input leaf shapes, output tensor shapes)
    grad_outputs: tuple[bool, ...]  #: per tensor output, whether it required grad (had an output gradient)
    ambiguous: bool  #: some tensor of the call has several axes of size B (else: checked, in a suspect forward)
    out: torch.Tensor | None  #: its single output that requires grad (a broadcast candidate if it has no sample axis)
    #: its first argument, when its examples may be flattened with their positions (``_flattened``): the
    #: probe's rows must be its first rows for the flattening to be example by example
    first: torch.Tensor | None = None


#: the key of ``PerSampleResult.sq_norms`` under which the squared norms summed over every parameter
#: stand when no instrument asked for them per parameter (no parameter is named "")
ALL_PARAMS = ""

#: the needs the engine computes (any of them switches its per-layer work on for a step)
PER_SAMPLE_NEEDS = frozenset(
    {
        Need.PER_SAMPLE_SQ_NORMS,
        Need.PER_SAMPLE_SQ_NORMS_BY_PARAM,
        Need.PER_SAMPLE_DOT_MEAN,
        Need.PER_SAMPLE_GRAM,
        Need.PER_SAMPLE_GRAM_BY_PARAM,
        Need.PER_SAMPLE_GRADS,
        Need.PER_SAMPLE_CROSS,
        Need.PER_SAMPLE_PROJECTIONS,
    }
)

#: the most memory the per-sample gradients of one group of modules with tied weights may take
TIED_BYTES = 1 << 29

#: needs whose values under gradient accumulation need every micro-batch's views until the step:
#: g_i . gbar projects onto the step's gradient (known after the last backward), and Gram entries of
#: examples in different micro-batches are cross products of their views
JOIN_NEEDS = frozenset({Need.PER_SAMPLE_DOT_MEAN, Need.PER_SAMPLE_GRAM, Need.PER_SAMPLE_GRAM_BY_PARAM})

#: the most memory the first micro-batch's views may take when they are kept on trial: on the first
#: step that asks for ``JOIN_NEEDS`` the engine does not know yet whether the loop accumulates (it learns
#: it at the second forward), so it keeps them up to this size and releases them at the optimizer step
#: if no second micro-batch came (:meth:`PerSampleEngine.expect_accumulation` saves the question)
TRIAL_BYTES = 1 << 29
#: model calls without per-sample work (steps, where a Cockpit drives the engine: :meth:`PerSampleEngine.rest`)
#: after which the layers' hooks are taken off until a step needs them
#: (each hooked layer's call costs the slow path of ``Module.__call__`` and a hook's call: about 5 us)
SLEEP_AFTER = 4


def _tied_bytes(handlers: dict[nn.Module, Handler], group: dict[nn.Module, int]) -> dict[int, int]:
    """Bytes of one sample's gradient of every parameter of each group of tied modules."""
    params: dict[int, dict[int, int]] = {}
    for module, gid in group.items():
        for local in handlers[module].names:
            p = module.get_parameter(local)
            params.setdefault(gid, {})[id(p)] = p.numel() * p.element_size()
    return {gid: sum(ps.values()) for gid, ps in params.items()}


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _no_autocast(grads: list):
    """A context that switches autocast off for the device of the output gradients, if it is on."""
    device = next((g.device.type for gs in grads for g in gs if g is not None), "cpu")
    try:
        on = torch.is_autocast_enabled(device)
    except (TypeError, RuntimeError):  # a device type autocast does not know
        on = False
    return torch.autocast(device, enabled=False) if on else contextlib.nullcontext()


#: what a layer left out because the rows of its calls could not be given to examples says (the shape
#: probe's reason follows it): :meth:`PerSampleEngine.serve_at_parent` then tries its parent
_ROWS_REFUSED = "cannot find the batch axis in the output gradient"


def _forward_ancestor(model: nn.Module, name: str) -> nn.Module | None:
    """The nearest ancestor of the submodule ``name`` whose forward can use a child's parameters itself: not a
    container (``nn.ModuleList``, ``nn.ModuleDict``: no forward; ``nn.Sequential``: only calls its children)."""
    parts = name.split(".")
    for k in range(len(parts) - 1, -1, -1):
        m = model.get_submodule(".".join(parts[:k]))
        if not isinstance(m, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
            return m
    return None


class PerSampleEngine:
    """Computes per-sample gradient statistics of ``model`` for the steps that need them.

    On its first per-sample steps (up to ``CHECKS`` attempts, until one completes) the engine also
    checks that the per-sample gradients it sees add up to the gradient autograd accumulated: per
    layer, ||sum_i g_i||^2 = B sum_i g_i . gbar must equal sum_p ||p.grad||^2 / f^2 for p.grad =
    f sum_i g_i (:meth:`check_sums`). A layer that fails it has parameters that get gradient the
    per-layer hooks do not see (a functional use of a weight, a term added to the loss outside the loss
    module, a gradient hook), and its per-sample numbers are not theirs.
    """

    CHECKS = 5

    def __init__(
        self,
        model: nn.Module,
        costs: Costs | None = None,
        params: Collection[int] | None = None,
        warn: Callable[[str], None] | None = None,
        attach: bool = True,
        handlers: Mapping[nn.Module, Handler] | None = None,
        model_hooks: bool = True,
    ):
        """``model_hooks=False``: the engine puts no hook on ``model`` itself; its driver calls
        :meth:`forward_begins`, :meth:`forward_ends` and :meth:`rest` (the Cockpit's per-sample provider, from
        the hooks the Cockpit has on the model anyway: two hooks fewer a model call)."""
        self.model = model
        self._model_hooks = model_hooks
        self.costs = costs if costs is not None else Costs()  # per-layer work: labelled, timed as "engine"
        self._warn = warn
        #: ``params``: ids of the parameters to cover (the optimizer's); default every trainable one
        self.handlers: dict[nn.Module, Handler] = (
            dict(handlers) if handlers is not None else build_handlers(model, params)
        )
        #: tensors broadcast over the batch (position embeddings, bare parameters): see broadcast.py
        self._bcast = BroadcastTracker(self, self._derive())
        self._hooks: list = []
        #: the handled layers' hooks (none while asleep, see :meth:`_sleep`), and the model calls without
        #: per-sample work since the last step with it
        self._layer_hooks: list = []
        self._idle = 0
        #: whether the layer hooks may be taken off after SLEEP_AFTER calls without per-sample work (not
        #: under torch.compile: its compiled code guards on them, every change would recompile)
        self.may_sleep = False
        self._attached = attach
        if attach:
            self._attach()
        self.active = False
        self._processing = False
        #: a probe session (:meth:`probe`): sees calls inside ``paused()`` and hands clones downstream
        self._probing = False
        self._outputs: list[torch.Tensor] = []
        #: TracIn's probe forward: the lookups of nn.Embedding subclasses read at their lookup (_LookupRecorder)
        self._lookups: dict[int, list[tuple[torch.Tensor, torch.Tensor, int]]] | None = None
        #: the current model call's arguments (until its forward returns), each handled module's calls so
        #: far in it, and its calls whose sample axis the shape probe must resolve
        self._model_call: tuple[tuple, dict] | None = None
        self._order: dict[nn.Module, int] = {}
        self._pending: list[_Pending] = []
        self._suspect = False
        #: the first forward with per-sample work has been looked through for layers used without a call
        self._graph_seen = False
        #: the next forward with per-sample work is looked through for parameters used outside the calls of
        #: the layers serving them (:mod:`cockpit_lite.persample.uses`; again after parameters move), with the
        #: layer calls it captured; not where the graph does not show the layers' calls (a compiled or a
        #: sharded model: ``walks_uses`` False)
        self._uses_pending = True
        self._use_calls: list[tuple[nn.Module, tuple, frozenset]] = []
        self.walks_uses = True
        #: layers whose parameters :meth:`serve_at_parent` moved to their parent (once per layer and run)
        self._moved_up: set[nn.Module] = set()
        #: resolved sample axes by (module, order in the forward, batch, input shapes, output shapes):
        #: (per input leaf, per tensor output), or None where the probe could not tell (see resolve_axes)
        self._axes: dict[tuple, tuple[tuple, tuple] | None] = {}
        #: shape probes run so far, and their total wall time (ms)
        self.probe_runs = 0
        self.probe_ms = 0.0
        #: per module, why the shape probe could not resolve its sample axis (added to a refusal's note)
        self._probe_notes: dict[nn.Module, str] = {}
        self.warned: set[str] = set()
        self.checks_left = self.CHECKS
        #: the loop accumulates gradients over several forward/backward passes per step (seen once: sticky;
        #: :meth:`expect_accumulation` says so before the first step)
        self.accumulating = False
        #: bytes of views the first micro-batch may keep on trial (``TRIAL_BYTES``), and whether the trial ran
        self.trial_bytes = TRIAL_BYTES
        self._tried = False
        self._reset(Needs())

    def _attach(self) -> None:
        if self._model_hooks:
            self._hooks = [
                self.model.register_forward_pre_hook(SharedHook(self._model_input), with_kwargs=True),
                self.model.register_forward_hook(SharedHook(self._model_output)),
            ]
        self._wake()

    def _wake(self) -> None:
        """Hook the handled layers (again, after :meth:`_sleep`)."""
        # first among the module's forward hooks: a hook of the user's that replaces the output (out * 2)
        # is then part of what follows the module, and the engine pairs the module's own output with its input
        self._layer_hooks = [
            m.register_forward_hook(SharedHook(self._forward_hook), with_kwargs=True, prepend=True)
            for m in self.handlers
        ]
        # handlers that keep what holds just before the call (the random state attention dropout draws from)
        self._layer_hooks += [
            m.register_forward_pre_hook(SharedHook(self._pre_forward_hook), with_kwargs=True)
            for m, h in self.handlers.items()
            if type(h).pre_forward is not Handler.pre_forward
        ]
        self._idle = 0

    def _sleep(self) -> None:
        """Unhook the handled layers: the model's calls of steps without per-sample work (an overhead budget's
        rest steps, ``every=``) then run no hook of the engine's per layer. :meth:`begin` of a step with
        per-sample work hooks them again, from the model's forward pre-hook, before any layer runs."""
        for h in self._layer_hooks:
            h.remove()
        self._layer_hooks = []

    # --- lifecycle ------------------------------------------------------------------------------------
    def close_hooks(self) -> None:
        for h in (*self._hooks, *self._layer_hooks):
            h.remove()
        self._hooks.clear()
        self._layer_hooks = []

    def stop(self) -> None:
        """No more per-layer work until the next :meth:`begin`; release what this step held."""
        self.active = False
        self._model_call = None
        self._bcast.reset()
        self._calls.clear()
        self._kept = []
        self._segments = []
        self._early = None
        self._outputs = []

    def close(self) -> None:
        self.close_hooks()
        self.stop()

    def _reset(self, needs: Needs) -> None:
        self.needs = needs
        self._calls: dict[nn.Module, _Calls] = {}
        self._kept: list[View] = []
        self.failure: str | None = None
        self.batch: int | None = None
        self.inv_scale: float | None = None
        self.sq: dict[str, torch.Tensor] = {}
        self.gram: dict[str, torch.Tensor] = {}
        self.dot_mean: torch.Tensor | None = None
        self.grads: dict[str, torch.Tensor] = {}
        self.covered: set[str] = set()
        #: parameters left out of this step by :meth:`drop`, by full name, with the reason said
        self.left_out: dict[str, str] = {}
        self._tied_views: dict[int, list[View]] = {}
        self._dropped_groups: set[int] = set()
        #: conditions of this step's statistics, decided on the host with its other values
        self.checks: list[DeferredCheck] = []
        #: this step is checked by :meth:`check_sums`: per layer (B sum_i g_i . gbar, B sum_i |g_i . gbar|)
        self.checking = False
        #: some output gradient arrived in float16/bfloat16 (autocast): looser tolerance for the check
        self.low_precision = False
        self._sums: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        #: earlier micro-batches of this step (gradient accumulation), and whether the current one's
        #: per-sample gradients are of a mean loss over its examples
        self._segments: list[_Segment] = []
        self.mean = True
        #: the handled modules called this step (:meth:`rehome` serves the parameters of one never called)
        self._called: set[nn.Module] = set()
        self._use_calls = []  # (a forward that never reached its end: what it recorded is not kept)
        #: handled modules left out this step because their calls' rows could not be split (:meth:`serve_at_parent`)
        self._rows_refused: set[nn.Module] = set()
        self._bcast.reset()
        #: this step keeps the first micro-batch's views on trial (see ``TRIAL_BYTES``), their bytes so
        #: far, and the bytes at which the trial was given up (None: it was not)
        self._trial = False
        self._trial_size = 0
        self._trial_over: int | None = None
        #: every view of the current micro-batch is being kept
        self._whole = False
        #: the joined result, when :meth:`before_step` formed it
        self._early: PerSampleResult | None = None
        #: directions known before the step (:meth:`project_early`), and g_i . v onto them summed so far
        self._early_dirs: dict[str, Mapping[str, torch.Tensor]] | None = None
        self._early_proj: dict[str, torch.Tensor] = {}

    def begin(self, needs: Needs) -> None:
        """A new step starts; attach per-layer work only if the step needs it."""
        self._reset(needs)
        self.active = bool(needs.names() & PER_SAMPLE_NEEDS)
        if self.active:
            self._idle = 0
            if self._attached and not self._layer_hooks:
                self._wake()
        self.checking = self.active and self.checks_left > 0
        if self.active and not self.accumulating and not self._tried and needs.flags & JOIN_NEEDS:
            if not self._keeps_views():
                self._trial = self._tried = True
        self._whole = self._keeps_views()

    def expect_accumulation(self) -> None:
        """Say that the training loop accumulates gradients over several forward/backward passes per
        ``optimizer.step()`` (Lightning's ``accumulate_grad_batches > 1``, Hugging Face's
        ``gradient_accumulation_steps > 1``), before its first step.

        Without it the engine learns it at the second forward of the first accumulated step, when the
        first micro-batch's views may be gone: g_i . gbar and Gram entries of that step would be left
        out unless the views fit the trial budget (``TRIAL_BYTES``). With it every micro-batch's views
        are kept from the first step on, by the needs that join them (``JOIN_NEEDS``); a loop that then
        runs one micro-batch per step loses nothing but that memory until each step. Reach it as
        ``cockpit.engine.expect_accumulation()``.
        """
        self.accumulating = True
        if not self.covered and not self._segments:  # called before this step reduced any layer
            self._whole = self._keeps_views()

    def needs_changed(self) -> None:
        """The step's needs changed after :meth:`begin` (a later provider's ``begin_step``: under DDP the
        distributed provider turns g_i . gbar into a projection onto the all-reduced gbar): decide again,
        before any layer is reduced, whether this step keeps its layers' views."""
        if self.active and not self.covered and not self._segments:
            self._whole = self._keeps_views()

    def _keeps_views(self) -> bool:
        """Whether this step keeps the layers' views past their reduction (until the optimizer step)."""
        flags = self.needs.flags
        if self.needs.directions or Need.PER_SAMPLE_CROSS in flags:
            return True
        return bool(flags & JOIN_NEEDS) and (self.accumulating or self._trial)

    def set_batch(self, batch: int, inv_scale: float, mean: bool = True) -> None:
        """The current micro-batch: ``batch`` examples; captured output gradients times ``inv_scale`` are
        those of the per-sample losses of a ``mean`` (or summed) loss over them."""
        self.batch, self.inv_scale, self.mean = batch, inv_scale, mean

    def project_early(self, directions: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Directions known before the optimizer step (``Needs.early``), given as the step's backward begins:
        a layer whose g_i another statistic formed (``View.formed_now``) is projected onto them as it is
        reduced, from those; the other layers, whose kept factors cost the same either way, after the step
        in one product with the other directions (:meth:`project`). Not under gradient accumulation, nor
        once a layer was reduced: those steps project onto them after the step."""
        begun = self.covered or self._segments or self.accumulating
        if self.active and self.failure is None and directions and not begun:
            self._early_dirs, self._early_proj = dict(directions), {}

    def next_micro_batch(self, batch: int, inv_scale: float, mean: bool = True) -> None:
        """Gradient accumulation: the step's next forward/backward begins. What the last one computed is
        kept as a segment; :meth:`result` joins the segments, scaled to the step's N examples."""
        if not self.active:
            return
        self._early_dirs, self._early_proj = None, {}  # (every micro-batch is projected after the step)
        self.accumulating = True  # from now on views are kept from the first micro-batch on
        self._segments.append(self._segment())
        self.sq, self.gram, self.grads, self.dot_mean, self._kept = {}, {}, {}, None, []
        self.checking = False  # the check compares with p.grad, which now holds the earlier micro-batches
        self._whole = self._keeps_views()
        self.set_batch(batch, inv_scale, mean)

    def abandon_micro_batch(self) -> None:
        """The micro-batch begun last got no backward (a model call after the step's last backward that the
        loop never trained on): it is dropped, and the one before it is current again, as if it had not begun."""
        self._calls.clear()
        if not self._segments:
            return
        seg = self._segments.pop()
        self.batch, self.mean, self.sq, self.dot_mean, self._kept = seg.batch, seg.mean, seg.sq, seg.dot_mean, seg.kept
        self.covered, self.gram, self.grads, self._whole = set(seg.covered), seg.gram, seg.grads, seg.whole

    def _segment(self) -> _Segment:
        """What the current micro-batch computed."""
        return _Segment(
            self.batch,
            self.mean,
            self.sq,
            self.dot_mean,
            self._kept,
            set(self.covered),
            self.gram,
            self.grads,
            self._whole,
        )

    def fail(self, reason: str) -> None:
        """Give up per-sample work for this step, say why (once per reason), never raise."""
        if self.failure is None:
            self.failure = reason
        self.active = False
        self.checking = False
        self._calls.clear()
        self._kept.clear()
        self._say(reason)

    def _say(self, message: str, stacklevel: int = 3) -> None:
        """Warn once per message: through the Cockpit's warning where there is one, else a
        :class:`CockpitWarning` (``stacklevel`` counted from the caller of this method's caller)."""
        if message in self.warned:
            return
        self.warned.add(message)
        if self._warn is not None:
            self._warn(message)
        else:
            warnings.warn(f"cockpit-lite: {message}", CockpitWarning, stacklevel=stacklevel + 1)

    def _drop_names(self, module: nn.Module, names: set[str], reason: str) -> None:
        """Leave some parameters of a module out of this step (its others are served), said once per reason."""
        self.left_out.update(dict.fromkeys(names, reason))
        message = (
            f"per-sample statistics leave out {', '.join(sorted(names))} of {type(module).__name__} for this step "
            f"(its other parameters are served): {reason}"
        )
        self._say(message)

    def drop(self, module: nn.Module, reason: str) -> None:
        """Leave one layer out of this step (its parameters are then reported as not covered, with their
        share of ||p.grad||^2); every other layer is still computed. Said once per layer and reason."""
        self._calls.pop(module, None)
        if _ROWS_REFUSED in reason and isinstance(self.handlers.get(module), FuncHandler):
            self._rows_refused.add(module)  # (its parent may serve them: :meth:`serve_at_parent`)
        if module in self.tied:  # its group's other uses cannot be combined without it
            gid = self.tied[module]
            self._tied_views.pop(gid, None)
            self._dropped_groups.add(gid)
        full = sorted(self.handlers[module].names.values()) if module in self.handlers else []
        names = ", ".join(full) or "?"
        self.left_out.update(dict.fromkeys(full, reason))
        if ("ambiguous" in reason or "cannot find the batch axis" in reason) and module in self._probe_notes:
            reason = f"{reason} ({self._probe_notes[module]})"
        message = f"per-sample statistics leave out {type(module).__name__} ({names}) for this step: {reason}"
        self._say(message)

    def _derive(self) -> dict[str, nn.Parameter]:
        """What follows from ``self.handlers`` (at construction, and again when :meth:`rehome` changed them): the
        covered parameter names, the groups of tied modules and their bytes, the modules whose parameters are used
        bare; returns those bare parameters by full name (for the broadcast tracker)."""
        self.param_names: list[str] = [n for h in self.handlers.values() for n in h.names.values()]
        #: modules with tied weights: their views are added up at the end of backward (see combined())
        self.tied = tied_groups(self.handlers)
        self._tied_bytes = _tied_bytes(self.handlers, self.tied)
        #: the modules whose parameters are used bare (their handlers change only by :meth:`rehome`)
        self._bare_handlers = [(m, h) for m, h in self.handlers.items() if isinstance(h, BareParamsHandler)]
        return {full: m.get_parameter(local) for m, h in self._bare_handlers for local, full in h.names.items()}

    def rehome(self, unseen: Collection[str], in_graph: bool = False) -> dict[str, str]:
        """Serve parameters of a handled layer that was never called while they were used: its ancestor's
        forward reads them itself (transformers' Mamba mixer reads ``self.conv1d.weight`` and
        ``self.dt_proj.weight``). They become bare parameters
        (:class:`~cockpit_lite.persample.layers.BareParamsHandler`: split where they meet the batch, else
        torch.func over the ancestor's forward) of the nearest ancestor called this step that holds bare
        parameters of its own, else of the nearest ancestor with a forward of its own (containers such as
        ``nn.ModuleList`` passed over), which is then hooked. The gradient-sum check runs again on the next
        steps, so a use outside that forward is said, not hidden.

        ``unseen``: full names of such parameters. Without ``in_graph`` they are those with a gradient no layer
        covered at the end of backward (served from the next step; a layer whose gradients are zero, only not
        called, is left to its rule); with it, those :meth:`_rehome_from_graph` found in the graph of the forward
        that just ended, moved only to an ancestor already handled (its call of that forward was captured) and
        served from this step. Says where they go (one warning) and returns {full name: that sentence} for those
        moved."""
        unseen = set(unseen)
        if not unseen or not self._called:
            return {}
        path = {m: name for name, m in self.model.named_modules()}
        # the called modules that hold bare parameters, innermost first
        owners = sorted(
            (m for m in self._called if m in path and isinstance(self.handlers.get(m), BareParamsHandler)),
            key=lambda m: -len(path[m]),
        )
        moved: dict[str, str] = {}
        created: set[nn.Module] = set()  # (ancestors that had no handler: hooked from the next step)
        for module, handler in list(self.handlers.items()):
            if module in self._called or module not in path or isinstance(handler, BareParamsHandler):
                continue
            if not handler.names or not unseen.issuperset(handler.names.values()):
                continue
            grads = (module.get_parameter(local).grad for local in handler.names)
            if not in_graph and all(g is None or not bool(g.any()) for g in grads):  # (zeroed: only not called)
                continue
            name = path[module]
            parent = next((m for m in owners if path[m] == "" or name.startswith(path[m] + ".")), None)
            if parent is None and in_graph:  # (an ancestor hooked only now has no call of this step)
                continue
            if parent is None:  # its nearest ancestor with a forward of its own, handled from now on
                parent = _forward_ancestor(self.model, name)
                if parent is None or (parent in self.handlers and parent not in created):
                    continue
                created.add(parent)
            rel = name[len(path[parent]) + 1 :] if path[parent] else name
            names = dict(self.handlers[parent].names) if parent in self.handlers else {}
            names.update({f"{rel}.{local}": full for local, full in handler.names.items()})
            del self.handlers[module]
            self.handlers[parent] = BareParamsHandler(parent, names)
            layer = f"{type(module).__name__} ({', '.join(sorted(handler.names.values()))})"
            owner = f"{type(parent).__name__} ({path[parent] or 'the model'})"
            said = (
                f"{layer} is never called, its parameters used by {owner}: they are served as its bare parameters"
                if in_graph
                else f"{layer} was never called while its parameters got gradient: from the next step they are "
                f"served as bare parameters of {owner}, whose forward uses them"
            )
            moved.update(dict.fromkeys(handler.names.values(), said))
        self._after_moves(moved, rehook=bool(created))
        return moved

    def _after_moves(self, moved: dict[str, str], rehook: bool) -> None:
        """Parameters have moved to other handlers (:meth:`rehome`, :meth:`serve_at_parent`): say where (one
        warning), derive the handlers' state again, run the gradient-sum check again (the next steps verify
        that the new owner's forward is where they are used) and, with ``rehook``, hook the new owners."""
        if not moved:
            return
        self._say(f"parameters {sorted(moved)}: " + "; ".join(dict.fromkeys(moved.values())), stacklevel=3)
        self._bcast.bare = self._derive()
        self.checks_left = self.CHECKS
        self._uses_pending = True  # (the new owners' calls are looked through at the next forward)
        if rehook and self._layer_hooks:  # (asleep: :meth:`_wake` hooks them with the others)
            self._sleep()
            self._wake()

    def serve_at_parent(self) -> dict[str, str]:
        """Layers left out this step because the rows of their calls could not be given to examples (DBRX's
        expert MLP is called once per expert on the tokens routed to it: rows whose number and order follow the
        routing): their parameters become bare parameters of their parent (the nearest ancestor with a forward of
        its own, not the model itself), hooked from the next step and served by a torch.func replay of its
        forward on each example's rows, checked against the call's own rows. Returns {full name: the sentence
        said} for those moved (each layer once per run)."""
        refused, self._rows_refused = self._rows_refused, set()
        path = {m: name for name, m in self.model.named_modules()}
        moved: dict[str, str] = {}
        for module in refused:
            handler = self.handlers.get(module)
            if handler is None or module not in path or not handler.names or module in self._moved_up:
                continue
            parent = _forward_ancestor(self.model, path[module])
            if parent is None or parent is self.model or parent in self.handlers or module in self.tied:
                continue
            self._moved_up.add(module)
            rel = path[module][len(path[parent]) + 1 :]
            del self.handlers[module]
            self.handlers[parent] = BareParamsHandler(parent, {f"{rel}.{k}": v for k, v in handler.names.items()})
            layer = f"{type(module).__name__} ({', '.join(sorted(handler.names.values()))})"
            said = (
                f"{layer} is called on rows that cannot be given to examples: from the next step its parameters are "
                f"served as bare parameters of "
                f"{type(parent).__name__} ({path[parent]}), replayed on each example's rows"
            )
            moved.update(dict.fromkeys(handler.names.values(), said))
        self._after_moves(moved, rehook=True)
        return moved

    def _rehome_from_graph(self, output: Any) -> None:
        """Once, at the end of the first forward with per-sample work: the parameters of handled layers this
        forward never called that are in its graph all the same (used by an ancestor's forward itself) are
        served from this step (:meth:`rehome`)."""
        # (a parameter a called layer holds too, tied weights, is in the graph through that layer)
        held = {full for m in self._called if m in self.handlers for full in self.handlers[m].names.values()}
        nodes: dict[Any, str] = {}
        for module, handler in self.handlers.items():
            if module in self._called or isinstance(handler, BareParamsHandler):
                continue
            for local, full in handler.names.items():
                p = module.get_parameter(local)
                if p.requires_grad and full not in held:
                    nodes[torch.autograd.graph.get_gradient_edge(p).node] = full
        if not nodes:
            return
        found: set[str] = set()
        for node in graph_nodes(tree_flatten(output)[0]):
            if node in nodes:
                found.add(nodes[node])
                if len(found) == len(nodes):
                    break
        if found:
            self.rehome(found, in_graph=True)

    def _record_use(self, module: nn.Module, outs: list[torch.Tensor], given: tuple[tuple, dict]) -> None:
        """Keep a call's nodes for :meth:`_leave_out_outside_uses`; a call whose nodes cannot be read ends the
        look for this forward (a layer is never left out for want of them: the gradient-sum check stays)."""
        try:
            self._use_calls.append((module, *call_nodes(outs, *given)))
        except Exception:
            self._uses_pending, self._use_calls = False, []

    def _leave_out_outside_uses(self, output: Any) -> None:
        """Once (and again after parameters move): leave out, from this step on, the layers whose parameters
        this forward also uses outside their calls (:func:`~cockpit_lite.persample.uses.outside_uses`): their
        per-sample gradients would miss that use."""
        calls, self._use_calls, self._uses_pending = self._use_calls, [], False
        if not self.walks_uses or not calls:
            return
        served = {}
        for module in dict.fromkeys(m for m, _, _ in calls):
            handler = self.handlers.get(module)
            if handler is not None and module in self._calls:  # (not left out already)
                params = [(module.get_parameter(local), full) for local, full in handler.names.items()]
                served[module] = [(p, full) for p, full in params if p.requires_grad]
        try:
            found = outside_uses(output, calls, served)
        except Exception:  # (never the user's forward: the gradient-sum check still runs)
            return
        for module, names in found.items():
            reason = (
                f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} used by the model's forward outside this "
                "layer's calls (a method that skips its hooks, as ProphetNet's position_embeddings._forward, or a "
                "functional use such as F.linear(h, layer.weight)): per-sample gradients would miss that use, so the "
                "layer is left out on every step"
            )
            self.handlers[module].refused = reason  # (every later call: left out with this reason)
            self.drop(module, reason)

    def rescale(self, factor: float) -> None:
        """Multiply the factor that turns captured output gradients into those of the per-sample losses
        (backward started from the loss times 1 / factor: AMP's loss scale)."""
        if self.inv_scale is not None:
            self.inv_scale *= factor

    # --- hooks ----------------------------------------------------------------------------------------
    def _pre_forward_hook(self, module, args, kwargs):
        if not self.active or self._processing or module not in self.handlers or (is_paused() and not self._probing):
            return None
        try:
            self.handlers[module].pre_forward(args, kwargs)
        except Exception as e:  # never break the user's forward
            self.fail(f"per-sample engine disabled for this step ({type(module).__name__}: {e})")
        return None

    def _model_input(self, module, args, kwargs):
        if module is self.model:
            self.forward_begins(args, kwargs)

    def _model_output(self, module, args, output):
        if module is not self.model:
            return
        if self.active:
            self.forward_ends(output)
        elif not self._processing and not (is_paused() and not self._probing):
            self.rest()

    def forward_begins(self, args: tuple, kwargs: dict) -> None:
        """A call of the model begins (its forward pre-hook): keep its inputs for the shape probe."""
        # (inactive: a step without per-sample work; the Cockpit's pre-hook has begun it, see Cockpit)
        if self.active and not self._processing and (not is_paused() or self._probing):
            # kept (no copy) until the forward returns: the shape probe reruns the model on fewer examples
            self._model_call, self._order, self._pending = (args, kwargs), {}, []
            if not kwargs and len(args) == 1 and type(args[0]) is torch.Tensor:  # model(x): no tree walk
                shapes = (tuple(args[0].shape),)
            else:
                shapes = _leaf_shapes((args, kwargs))
            rows = next((s[0] for s in shapes if s), None)  # the first tensor input's leading size
            self._bcast.on_model_input(rows)
            # an input with several axes of its batch size (tokens (B, T) with T == B): every call of this
            # forward is checked by the shape probe, also those with one axis of size B that may be a
            # position axis shared by the batch (a Linear on (T, k) position features)
            self._suspect = rows is not None and rows > 1 and _several_batch_axes(shapes, rows)

    def rest(self) -> None:
        """A model call (or, driven, a step) without per-sample work: after ``SLEEP_AFTER`` of them the layer
        hooks come off (:meth:`_sleep`) until :meth:`begin` of a step with per-sample work."""
        self._idle += 1
        if self._idle >= SLEEP_AFTER and self._layer_hooks and self.may_sleep:
            self._sleep()

    def forward_ends(self, output: Any) -> None:
        """The model's call returned ``output`` (its forward hook): resolve the sample axes its calls left
        ambiguous, and hook the consumers of tensors broadcast over the batch."""
        if not self.active or self._processing or (is_paused() and not self._probing):
            return
        call, self._model_call = self._model_call, None
        if call is not None and any(p.ambiguous for p in self._pending):
            try:
                self._resolve_pending(*call, output)
            except Exception as e:  # never break the user's forward
                self.fail(f"per-sample engine disabled for this step (sample axis probe: {type(e).__name__}: {e})")
        self._pending = []
        if not self._graph_seen and not self._probing:
            self._graph_seen = True
            try:
                self._rehome_from_graph(output)
            except Exception:  # (never the user's forward: the end of backward finds them instead)
                pass
        if self._uses_pending and not self._probing:
            self._leave_out_outside_uses(output)
        if self._bcast.wanted:
            try:
                self._bcast.walk(output)
            except Exception as e:  # never break the user's forward
                self.fail(f"per-sample engine disabled for this step (broadcast parameters: {e})")

    def _forward_hook(self, module, args, kwargs, output):
        # not during our own recomputation (torch.func), nor for a deepcopy that carries our hooks
        if not self.active or self._processing or module not in self.handlers or (is_paused() and not self._probing):
            return None
        # (what the layer's call keeps is the engine's work too)
        if not self.costs.measuring:  # (Costs.call's own short path, without its frame: once per layer)
            return self._capture_call(module, args, kwargs, output)
        return self.costs.call("engine", self._capture_call, module, args, kwargs, output)

    def _capture_call(self, module, args, kwargs, output):
        """:meth:`_forward_hook`'s work: keep what this call of a handled module needs at its backward."""
        given = (args, kwargs) if self._uses_pending and not self._probing else None
        order = self._order.get(module, 0)
        self._order[module] = order + 1
        self._called.add(module)
        try:
            handler = self.handlers[module]
            if type(handler) is LinearHandler and given is None and self._plain_linear(handler, args, output):
                return self._capture_linear(module, handler, args[0], output)
            if handler.refused is not None:
                raise PerSampleUndefined(handler.refused)
            handler.check()
            if torch.is_tensor(output):  # the usual single output: no pytree walk
                outs = [output] if output.requires_grad else []
            else:
                outs = [t for t in tree_flatten(output)[0] if torch.is_tensor(t) and t.requires_grad]
            if not outs:
                return None
            lookup = None
            if getattr(handler, "own_forward", False) and self._probing:  # its lookup, as the recorder saw it
                seen = self._lookups.get(id(module.weight)) if self._lookups is not None else None
                if not seen or len(outs) != 1 or tensor_version(seen[-1][1]) != seen[-1][2]:
                    raise PerSampleUndefined(
                        f"{type(module).__name__} (an nn.Embedding with a forward of its own) is read at its lookup, "
                        "which TracIn's probe pass did not see once, unchanged, in this call"
                    )
                indices, looked_up, _ = seen.pop()
                args, kwargs, outs = (indices,), {}, [looked_up]
            elif getattr(handler, "own_forward", False):  # an nn.Embedding subclass: read at its lookup
                if len(outs) != 1:
                    raise PerSampleUndefined(
                        f"{type(module).__name__} (an nn.Embedding with a forward of its own) is read at its lookup, "
                        "which a call with several outputs does not reach"
                    )
                lookup, indices = handler.lookup(outs[0])
                args, kwargs = (indices,), {}
                if lookup is outs[0].grad_fn:  # its output is the lookup's (BART's positions): served as one
                    lookup = None
            replaced = None
            copy = None
            single = len(outs) == 1
            if not self._probing and not single and _outside_gradients(handler, output):
                # a hook on an output sees its whole gradient: where one output is computed from another
                # inside the call (LSTMCell: h = o * tanh(c)), c's would hold h's share too, counted twice by
                # the replay; the copies handed downstream get only the gradients from outside
                copy = _outside_copy
            elif not self._probing and lookup is None and any(_rebasable(t, single) for t in outs):
                # an output that is a view (MultiheadAttention's transposed output): an in-place op downstream
                # would rebase it past the hook on its node; a copy downstream keeps that node in the graph
                copy = functools.partial(_copy_if_rebasable, single=single)
            elif not self._probing and lookup is None and single and self._shared_view(module, outs[0]):
                # a product's view shared by the batch (a position projection): an in-place op on a view of it
                # downstream (DeBERTa's `pos /= scale`) would rebase it past the node the broadcast tracker
                # starts from; a copy downstream keeps that node in the graph
                copy = _outside_copy
            if copy is not None:
                output = replaced = tree_map(copy, output)
                outs = [t for t in tree_flatten(output)[0] if torch.is_tensor(t) and t.requires_grad]
            calls = self._calls.get(module)
            if calls is None:
                calls = self._calls[module] = _Calls()
            idx = len(calls.captures)
            calls.captures.append(handler.capture(args, kwargs, output))
            shared = self._sample_axes(module, idx, order, args, kwargs, output, outs, calls)
            if lookup is not None:  # (its indices tell: the batch's own, or positions shared by it)
                if shared or self.batch not in args[0].shape:
                    raise PerSampleUndefined(
                        f"{type(module).__name__} (an nn.Embedding with a forward of its own) looks up indices "
                        "shared by the batch, which the engine splits where the module's output meets the batch, "
                        "not at its lookup"
                    )
                lookup.register_prehook(lambda grads, m=module, i=idx: self._on_grads(m, i, (grads[0],)))
                if given is not None:
                    self._record_use(module, outs, given)
                return replaced
            # an output that may lack the batch axis (a position embedding): decided by its consumers
            broadcast = len(outs) == 1 and (shared or self._bcast.is_candidate(module, outs[0]))
            if broadcast:
                label = f"the output of {type(module).__name__} ({', '.join(handler.names.values())})"
                self._bcast.add_call(module, idx, outs[0], label)
            if self._probing:
                # gradients are taken with respect to these outputs: hand a copy downstream, so that an
                # in-place op there (ReLU(inplace=True)) does not rebase them
                self._outputs.extend(outs)
                self._register_grads(module, idx, outs)
                if getattr(handler, "own_forward", False):  # (the lookup's output, inside the module's forward)
                    return None
                return tree_map(lambda t: t.clone() if torch.is_tensor(t) and t.requires_grad else t, output)
            wants_dot = Need.PER_SAMPLE_DOT_MEAN in self.needs.flags or self.checking
            node = handler.weight_grad_node(outs) if wants_dot and not broadcast else None
            if node is not None:
                flat = outs[0].grad_fn is not node  # (the node's output is the call's output flattened)
                self._on_weight_grad_node(node, module, idx, handler, outs[0].shape if flat else None)
            else:
                self._register_grads(module, idx, outs)
            if given is not None:
                self._record_use(module, outs, given)
            return replaced
        except PerSampleUndefined as e:
            if getattr(e, "couples", False):  # examples interact: no layer's rows are per-example shares
                self.fail(str(e))
            else:
                self.drop(module, str(e))
        except Exception as e:  # never break the user's forward
            self.drop(module, f"{type(e).__name__}: {e}")
        return None

    def _plain_linear(self, handler: Handler, args: tuple, output: Any) -> bool:
        """Whether a call of an ``nn.Linear`` served by :class:`LinearHandler` itself is the plain one the
        general path of :meth:`_capture_call` would take no branch for: one (B, i) input of the step's batch
        size, one (B, o) output that requires grad and is no view, no probe, no several axes of the batch size
        in the model's input. :meth:`_capture_linear` then keeps what the general path keeps."""
        if handler.refused is not None or self._probing or self._suspect or len(args) != 1:
            return False
        x, batch = args[0], self.batch
        return (
            type(output) is torch.Tensor
            and type(x) is torch.Tensor
            and batch is not None
            and output.requires_grad
            and x.dim() == 2 == output.dim()
            and x.shape[0] == batch == output.shape[0]
            and not output._is_view()
        )

    def _capture_linear(self, module: nn.Module, handler: Handler, x: torch.Tensor, out: torch.Tensor) -> None:
        """:meth:`_capture_call` for a call that :meth:`_plain_linear` admits: its input kept (the handler's
        capture), its output gradient hooked, or the weight-gradient node where g_i . gbar takes the batch
        gradient. Its shapes tell the sample axis (no pending probe) and its output holds the batch axis (no
        broadcast candidate)."""
        calls = self._calls.get(module)
        if calls is None:
            calls = self._calls[module] = _Calls()
        idx = len(calls.captures)
        calls.captures.append(x.detach())
        node = None
        if (Need.PER_SAMPLE_DOT_MEAN in self.needs.flags or self.checking) and not factor_grams_cheaper(
            x.shape[0], x.shape[1], out.shape[1]
        ):
            node = handler.weight_grad_node([out])
        if node is not None:
            self._on_weight_grad_node(node, module, idx, handler)
        else:
            on_gradient(out, lambda g, m=module, i=idx: self._on_grads(m, i, (g,)))
        return None

    def _on_weight_grad_node(
        self, node: Any, module: nn.Module, idx: int, handler: Handler, shape: torch.Size | None = None
    ) -> None:
        """Hook call ``idx``'s weight-gradient node: it fires once the layer's backward has run, with its output
        gradient (reshaped to the call's output ``shape`` where the node's output is that output flattened) and
        its weight gradient (:meth:`Handler.weight_grad_node`)."""
        if shape is None:
            node.register_hook(
                lambda gi, go, m=module, i=idx, h=handler: self._on_grads(m, i, (go[0],), h.weight_grad(gi))
            )
        else:
            node.register_hook(
                lambda gi, go, m=module, i=idx, h=handler, s=shape: self._on_grads(
                    m, i, (None if go[0] is None else go[0].reshape(s),), h.weight_grad(gi)
                )
            )

    def _shared_view(self, module: nn.Module, out: torch.Tensor) -> bool:
        """Whether a call's single output is a view of a product that the batch shares: a broadcast candidate
        with a leading axis of 1 (a table unsqueezed), or no axis that could hold the batch's rows (a multiple of
        the batch size: Swin's (B windows, N, C) is the batch's own, copied for nothing)."""
        if _product_under_view(out) is None or not self._bcast.is_candidate(module, out):
            return False
        batch = self.batch if self.batch is not None else self._bcast.input_batch
        if out.dim() and out.shape[0] == 1:
            return True
        return batch is not None and batch > 1 and not any(n >= batch and n % batch == 0 for n in out.shape)

    # --- the sample axis of calls whose shapes do not tell it ---------------------------------------
    def _sample_axes(self, module, idx: int, order: int, args, kwargs, output, outs, calls: _Calls) -> bool:
        """A call with several axes of the batch size B (a (B, T, d) or (T, B, d) activation with T == B),
        or any call of a forward whose input has them: take its sample axes from the cache, or leave it
        to the shape probe at the end of the model's forward. For B == 1 any axis of size 1 is the
        sample axis (moving it does not reorder data). True if the call's output is shared by every
        example (no sample axis): a broadcast candidate, split where it meets the batch."""
        batch = self.batch
        if batch is None or batch < 2 or self._model_call is None:
            return False
        handler = self.handlers[module]
        flattened = _flattened(args, batch) or (
            # a replay takes every argument's rows apart: one of the others may hold (B k) rows (DBRX's experts:
            # (B, T, d) states with (B T, k) routing indices)
            isinstance(handler, FuncHandler)
            and not isinstance(handler, AttentionHandler)
            and any(_flattened((a,), batch) for a in args[1:] if torch.is_tensor(a))
        )
        ambiguous = handler.ambiguous(args, kwargs, output, batch) or flattened
        if not ambiguous and not self._suspect:
            return False
        inputs = _leaf_shapes((args, kwargs))
        outputs = _tensor_shapes(output)
        key = (module, order, batch, inputs, outputs)
        grad_outputs = tuple(t.requires_grad for t in tree_leaves(output) if torch.is_tensor(t))
        if key not in self._axes:
            out = outs[0] if len(outs) == 1 else None
            first = args[0].detach() if flattened else None
            self._pending.append(_Pending(module, idx, key, grad_outputs, ambiguous, out, first))
            return False
        found = self._axes[key]
        if found is None:
            return False
        outs_axes = tuple(a for a, g in zip(found[1], grad_outputs, strict=True) if g)
        calls.axes[idx] = SampleAxes(found[0], outs_axes, *found[2:])
        calls.axes_batch[idx] = batch
        return len(outs) == 1 and all(a is None for a in found[1])

    def _resolve_pending(self, args: tuple, kwargs: dict, output: Any) -> None:
        """Resolve the sample axes of this forward's ambiguous calls by one shape probe, cache them, and
        hand them to the calls' records. A call the probe cannot resolve gets no axes: its handler goes
        by shapes and documented layouts as before, and refuses what they do not tell."""
        # the calls whose examples may be flattened with their positions: the probe keeps their first argument
        want = {p.key[:2] for p in self._pending if p.first is not None}
        rows: dict[str, Any] = {}
        probe = self.resolve_axes(args, kwargs, self.batch, output, want, rows)
        firsts, in_eval = rows.get("probe", {}), rows.get("eval")
        for pend in self._pending:
            module, order, batch, inputs, outputs = pend.key
            found: tuple[tuple, tuple] | None = None
            if isinstance(probe, str):
                reason = probe
            else:
                seen = probe.get((module, order))
                reason = f"{type(module).__name__} was not called as often in the probe"
                if seen is not None:
                    try:
                        if len(seen[0]) != len(inputs) or len(seen[1]) != len(outputs):
                            raise ValueError("the call's arguments or outputs differ in number")
                        flat = pend.first is not None  # (its first argument's rows checked below; outputs follow)
                        # a torch.func replay takes every argument's rows apart, and checks its outputs are the
                        # call's (FuncHandler._rows_view); a layer rule takes the first argument's
                        handler = self.handlers[module]
                        every = isinstance(handler, FuncHandler) and not isinstance(handler, AttentionHandler)
                        found = (
                            tuple(
                                _changed_axis(r, q, batch, flat and (j == 0 or every))
                                for j, (r, q) in enumerate(zip(inputs, seen[0], strict=True))
                            ),
                            tuple(_changed_axis(r, q, batch, flat) for r, q in zip(outputs, seen[1], strict=True)),
                        )
                        if pend.first is not None and found[0]:
                            full, part = in_eval if in_eval is not None else ({}, {})
                            if (module, order) in full and (module, order) in part:  # (the order, without randomness)
                                first, probed = full[(module, order)], part[(module, order)]
                            else:
                                first, probed = pend.first, firsts.get((module, order))
                            groups = _same_first_rows(first, found[0][0], probed, batch, grouped=every)
                            if groups > 1:
                                found = (*found, groups)
                    except ValueError as e:
                        found = None
                        reason = str(e)
            self._axes[pend.key] = found
            if found is None:  # said only if the handler then refuses the call (see drop)
                self._probe_notes[module] = f"the shape probe on {batch - 1} examples did not resolve it: {reason}"
                continue
            calls = self._calls.get(module)
            if calls is not None and pend.idx < len(calls.captures):
                outs = tuple(a for a, g in zip(found[1], pend.grad_outputs, strict=True) if g)
                calls.axes[pend.idx] = SampleAxes(found[0], outs, *found[2:])
                calls.axes_batch[pend.idx] = batch
                shared = pend.out is not None and all(a is None for a in found[1])
                if shared and not self._bcast.has_call(module, pend.idx):  # split where it meets the batch
                    label = f"the output of {type(module).__name__} ({', '.join(self.handlers[module].names.values())})"
                    self._bcast.add_call(module, pend.idx, pend.out, label)

    @timed("engine")
    def resolve_axes(
        self,
        args: tuple,
        kwargs: dict,
        batch: int,
        output: Any,
        want: Collection[tuple[nn.Module, int]] = (),
        rows: dict[str, Any] | None = None,
    ) -> dict[tuple[nn.Module, int], tuple] | str:
        """The shape probe: run the model once on the first B - 1 examples of its call ``(args, kwargs)``
        (every tensor argument whose axis 0 has size B is cut; axis 0 of the model's input is the batch),
        check that the batch axis of the call's ``output`` (axis 0, the loss's) followed where there is
        one, and record,
        per handled module and call order within the forward, the shapes of the call's input leaves and
        tensor outputs. An axis of size B in the step whose size is B - 1 in the probe
        follows the batch: it is the call's sample axis (see ``_changed_axis``); the layout of a call is
        a property of the model's code, so one probe serves every step with these shapes (cached).

        Training is untouched: no cockpit sees the probe (``paused()``), no graph is built
        (``torch.no_grad()``), the random streams are forked (``torch.random.fork_rng``), every module
        keeps its mode except batch-norm layers, which run in eval mode (the same shapes, no update of
        their running statistics), embeddings with ``max_norm`` do not renormalise their weights, and
        every buffer is replaced by a copy for the probe (a forward that writes one writes the copy). Returns
        {(module, order): (input leaf shapes, output tensor shapes)}, or why the probe failed.

        ``want``: calls (module, order) whose examples may be flattened with their positions; their first
        argument goes into ``rows``: ``"probe"`` {(module, order): as the probe saw it}, and ``"eval"``
        the same from the model run in eval mode on B and on B - 1 examples (:meth:`_rows_in_eval`).
        """
        import time

        small = batch - 1
        if small < 1:
            return "a batch of one example needs no probe"
        if _sharded(self.model):
            return (
                "the model is sharded (FSDP): a probe forward would gather parameters with collectives that the "
                "other ranks, whose batches may have other shapes, do not join"
            )

        def cut(t):  # copies: a forward that writes its input in place writes the copy
            if not torch.is_tensor(t):
                return t
            return (t[:small] if t.dim() > 0 and t.shape[0] == batch else t).detach().clone()

        p_args, p_kwargs = tree_map(cut, args), tree_map(cut, kwargs)
        if _leaf_shapes((p_args, p_kwargs)) == _leaf_shapes((args, kwargs)):
            return f"no tensor argument of the model has {batch} rows"
        seen: dict[tuple[nn.Module, int], tuple] = {}
        counts: dict[nn.Module, int] = {}
        firsts: dict[tuple[nn.Module, int], torch.Tensor] = {}

        def record(module, a, kw, out):
            order = counts.get(module, 0)
            counts[module] = order + 1
            seen[(module, order)] = (_leaf_shapes((a, kw)), _tensor_shapes(out))
            if (module, order) in want and a and torch.is_tensor(a[0]):  # (compared: _same_first_rows)
                firsts[(module, order)] = a[0]

        model = self.model
        hooks = [m.register_forward_hook(record, with_kwargs=True) for m in self.handlers]
        norms = [m for m in model.modules() if isinstance(m, (BatchNormBase, InstanceNormBase)) and m.training]
        params = [(n, p, tensor_version(p)) for n, p in model.named_parameters()]
        storages = {p.untyped_storage().data_ptr(): n for n, p, _ in params if p.untyped_storage().data_ptr()}
        devices = cuda_devices([*model.parameters(), *model.buffers()])
        t0 = time.perf_counter()
        self.probe_runs += 1
        self._processing = True  # no hook of this engine sees the probe (a TracIn session sees paused calls)
        try:
            for m in norms:
                m.training = False
            # the probe writes to copies of the buffers: the step's own are never touched
            with scratch_state(model), paused(), torch.no_grad(), torch.random.fork_rng(devices=devices):
                with _ParameterGuard(storages):
                    p_output = model(*p_args, **p_kwargs)
            if rows is not None:
                rows["probe"] = firsts
                if want:  # examples flattened with their positions: their order, without randomness
                    rows["eval"] = self._rows_in_eval(want, args, kwargs, p_args, p_kwargs, storages, devices)
        except _WritesParameter as e:
            return f"the model's forward writes its own parameters in place ({e}); the probe stopped before the write"
        except Exception as e:
            return f"the model failed on {small} examples ({type(e).__name__}: {e})"
        finally:
            self._processing = False
            for h in hooks:
                h.remove()
            for m in norms:
                m.training = True
            self.probe_ms += (time.perf_counter() - t0) * 1e3
        changed = [n for n, p, version in params if tensor_version(p) != version]
        if changed:  # a forward that writes its own parameters: cannot be undone, and must not be guessed
            reason = f"the model's forward changed the parameters {changed} in place, which the probe cannot undo"
            message = f"the shape probe (the model run once on {small} examples to find its sample axes): {reason}"
            self._say(message, stacklevel=2)  # training saw one more write than without the cockpit: say so
            return reason
        real, probe = _tensor_shapes(output), _tensor_shapes(p_output)
        rows = [(r, q) for r, q in zip(real, probe, strict=False) if r and r[0] == batch]
        # (a model that returns only a scalar loss has nothing to check: axis 0 of its input is the batch)
        scalars = all(len(r) == 0 for r in real)
        bad = any(q[:1] != (small,) or q[1:] != r[1:] for r, q in rows)
        if len(real) != len(probe) or bad or (not rows and not scalars):
            return (
                f"the model's outputs {list(real)} became {list(probe)} on {small} examples: their axis 0 does not "
                "follow the batch, so axis 0 of the model's input is not the batch"
            )
        return seen

    def _rows_in_eval(self, want, args, kwargs, p_args, p_kwargs, storages, devices) -> tuple[dict, dict] | None:
        """The first argument of each call in ``want`` (:func:`_flattened` asked about it), from the model
        run in eval mode on the step's B examples and on the probe's B - 1 (every module's ``training``
        off for the two runs, buffers on copies): whether the rows go example by example is a property of the model's
        code, which these two runs tell even where dropout made the step's rows differ from any rerun.
        None if the runs failed."""
        model = self.model
        runs: list[dict] = [{}, {}]
        counts: list[dict] = [{}, {}]
        which = [0]

        def record(module, a, kw, out):
            order = counts[which[0]].get(module, 0)
            counts[which[0]][module] = order + 1
            if (module, order) in want and a and torch.is_tensor(a[0]):
                runs[which[0]][(module, order)] = a[0]

        modes = [(m, m.training) for m in model.modules()]
        hooks = [m.register_forward_hook(record, with_kwargs=True) for m in self.handlers]
        try:
            for m, _ in modes:
                m.training = False
            for k, (a, kw) in enumerate(((args, kwargs), (p_args, p_kwargs))):
                which[0] = k
                with scratch_state(model), paused(), torch.no_grad(), torch.random.fork_rng(devices=devices):
                    with _ParameterGuard(storages):
                        model(*a, **kw)
        except Exception:
            return None
        finally:
            for h in hooks:
                h.remove()
            for m, mode in modes:
                m.training = mode
        return runs[0], runs[1]

    def _register_grads(self, module: nn.Module, idx: int, outs: list[torch.Tensor]) -> None:
        if len(outs) == 1:
            hook = lambda g, m=module, i=idx: self._on_grads(m, i, (g,))  # noqa: E731
            if self._probing:  # torch.autograd.grad(..., outs) stops at outs: their nodes never run
                outs[0].register_hook(hook)
                return
            out = outs[0]
            base = _product_under_view(out)
            if base is None:
                on_gradient(out, hook)
            else:  # the product's gradient, in the output's shape (the same numbers)
                on_gradient(base, lambda g, shape=out.shape, h=hook: h(g.view(shape)))
        else:
            torch.autograd.graph.register_multi_grad_hook(
                outs, lambda gs, m=module, i=idx: self._on_grads(m, i, tuple(gs))
            )

    def _on_grads(self, module, idx, grads, weight_grad=None):
        if not self.active:
            return
        try:
            calls = self._calls.get(module)
            if calls is None:  # (its calls already taken: a layer left out, or a second backward through the call)
                return
            if len(calls.captures) == 1 and len(grads) == 1 and self._single(module, calls, grads[0], weight_grad):
                return
            if len(grads) == 1 and grads[0] is not None:
                shares = self._bcast.complete_call(module, idx, grads[0])
                if isinstance(shares, str):
                    raise PerSampleUndefined(shares)
                if shares is not None:  # broadcast over the batch: each example's output gradient
                    calls.captures[idx] = expand_over_batch(calls.captures[idx], self.batch)
                    grads = (shares,)
                    # the expanded inputs and the shares carry the samples on a new leading axis
                    leaves = tree_flatten(calls.captures[idx])[0]
                    calls.axes[idx] = SampleAxes(tuple(0 if torch.is_tensor(t) else None for t in leaves), (0,))
                    calls.axes_batch[idx] = self.batch
            # (a gradient needs detaching only under create_graph=True)
            calls.grads[idx] = tuple(g.detach() if g is not None and g.requires_grad else g for g in grads)
            if any(g is not None and (g.dtype in _LOW_PRECISION or _tf32(g, module)) for g in grads):
                # autocast: the step's gradients carry half-precision round-off; TF32 products ~1e-3
                self.low_precision = True
            if weight_grad is not None:
                calls.weight_grads[idx] = weight_grad.detach() if weight_grad.requires_grad else weight_grad
            if len(calls.grads) == len(calls.captures) and not isinstance(self.handlers[module], BareParamsHandler):
                self._process(module)  # (bare parameters wait for their gradients: end of backward)
        except LayerLeftOut as e:
            self.drop(module, str(e))
        except PerSampleUndefined as e:
            self.fail(str(e))
        except Exception as e:
            self.drop(module, f"{type(e).__name__}: {e}")

    def _single(self, module, calls: _Calls, g: torch.Tensor | None, weight_grad: torch.Tensor | None) -> bool:
        """The short path of :meth:`_on_grads` for the step's only call of a module with one output: its
        view straight from the handler's :meth:`~Handler.single_view` and reduced, without the general
        path's bookkeeping (broadcast candidates, resolved sample axes, tied parameters, autocast, a
        gradient with a graph). The same view and statistics as the general path; False where that path
        is needed (nothing done)."""
        if (
            g is None
            or g.requires_grad
            or calls.axes
            or self.batch is None
            or module in self.tied
            or self._bcast.has_call(module, 0)
            or torch.is_grad_enabled()
            or not (g.is_cpu or g.is_cuda)
            or torch.is_autocast_enabled("cuda" if g.is_cuda else "cpu")
        ):
            return False
        if not self.costs.measuring:  # (Costs.call's own short path, without its frame: once per layer)
            return self._single_view(module, calls, g, weight_grad)
        return self.costs.call("engine", self._single_view, module, calls, g, weight_grad)

    def _single_view(self, module, calls: _Calls, g: torch.Tensor, weight_grad: torch.Tensor | None) -> bool:
        """:meth:`_single`'s work, once its conditions hold."""
        view = self.handlers[module].single_view(calls.captures[0], g, self.batch, self.inv_scale)
        if view is None:
            return False
        del self._calls[module]
        if g.dtype in _LOW_PRECISION or _tf32(g, module):
            self.low_precision = True
        if weight_grad is not None:  # (no graph: grad mode is off in this backward)
            view.batch_grad_parts = ([weight_grad], self.inv_scale)
        self._reduce(view)
        return True

    def _process(self, module) -> None:
        with self.costs.region("engine"):
            if not torch.is_grad_enabled():  # a gradient hook: grad mode is off unless create_graph=True
                return self._process_calls(module)
            with torch.no_grad():
                return self._process_calls(module)

    def _process_calls(self, module) -> None:
        calls = self._calls.pop(module)
        if self.batch is None:
            raise RuntimeError("no model call with a batch axis was seen before backward")
        handler = self.handlers[module]
        grads = [calls.grads.get(i, (None,)) for i in range(len(calls.captures))]
        # the sample axes the shape probe resolved (calls whose shapes do not tell: an axis of the batch size
        # that is not the examples', a sequence as long as the batch)
        axes = {i: a for i, a in calls.axes.items() if calls.axes_batch.get(i) == self.batch}
        if isinstance(handler, BareParamsHandler):
            with _no_autocast(grads):
                self._processing = True
                if axes:  # (for its torch.func fallback)
                    handler.sample_axes = axes
                try:
                    with paused():  # a torch.func replay of the whole model must not look like a model call
                        view = handler.bare_view(self._bcast, calls.captures, grads, self.batch, self.inv_scale)
                finally:
                    self._processing = False
                    handler.__dict__.pop("sample_axes", None)
                self.checks += handler.take_checks()
                partial = handler.take_partial()
                if partial is not None:
                    self._drop_names(module, *partial)
            if view is not None:
                self._reduce(view)
            return
        if all(g is None for gs in grads for g in gs):
            return
        # a backward called inside autocast must not recast the engine's own products
        with _no_autocast(grads):
            self._processing = True
            if axes:
                handler.sample_axes = axes
            try:
                with paused():  # a replay (torch.func, attention) is no call of the user's model or loss
                    view = handler.view(calls.captures, grads, self.batch, self.inv_scale)
            finally:
                self._processing = False
                handler.__dict__.pop("sample_axes", None)
            self.checks += handler.take_checks()
            if calls.weight_grads and len(calls.weight_grads) == len(calls.captures):
                view.batch_grad_parts = (list(calls.weight_grads.values()), self.inv_scale)
            if module in self.tied:  # added to the other uses of its parameters at the end of backward
                if self.tied[module] not in self._dropped_groups:
                    self._tied_views.setdefault(self.tied[module], []).append(view)
                return
            self._reduce(view)

    def _reduce_tied(self) -> None:
        for gid, views in self._tied_views.items():
            factored = tied_view(views)
            if factored is not None:  # an embedding and its output layer: no B x V x d gradients
                self._reduce(factored)
                continue
            size = self.batch * self._tied_bytes[gid]
            if size > TIED_BYTES:
                names = sorted({n for v in views for n in v.names})
                raise RuntimeError(
                    f"parameters shared by several modules ({', '.join(names)}) need their per-sample "
                    f"gradients formed and added over their uses: {size / 2**20:.0f} MiB at this batch size, "
                    f"more than the {TIED_BYTES / 2**20:.0f} MiB allowed. Per-sample statistics are skipped "
                    "(the other records are unaffected); untie the weights or use a smaller batch to get them"
                )
            self._reduce(combined(views))
        self._tied_views = {}

    def _reduce(self, view: View) -> None:
        flags = self.needs.flags
        view.kept = self._whole
        view.early_directions = self._early_dirs is not None and self._whole
        # what forms g_i first, so that the cheaper statistics reuse it
        if Need.PER_SAMPLE_GRADS in flags:
            self.grads.update(view.grads())
        if Need.PER_SAMPLE_GRAM in flags or Need.PER_SAMPLE_GRAM_BY_PARAM in flags:
            self.gram.update(view.gram())
        if Need.PER_SAMPLE_DOT_MEAN in flags or self.checking:
            dm = view.dot_mean()
            if Need.PER_SAMPLE_DOT_MEAN in flags:
                self.dot_mean = dm if self.dot_mean is None else self.dot_mean + dm
            if self.checking:
                self._sums[tuple(view.names)] = (dm.sum() * len(dm), dm.abs().sum() * len(dm))
        if Need.PER_SAMPLE_SQ_NORMS_BY_PARAM in flags:
            self.sq.update(view.sq_norms())
        elif Need.PER_SAMPLE_SQ_NORMS in flags:  # the total alone: one row, summed layer by layer
            total = view.sq_total()
            if total is not None:
                self.sq[ALL_PARAMS] = total if ALL_PARAMS not in self.sq else self.sq[ALL_PARAMS] + total
        if view.early_directions and view.formed_now():  # (before release() drops them)
            early = self._early_proj
            for key, p in view.project_many(self._early_dirs).items():
                early[key] = p if key not in early else early[key] + p
            view.projected_early = True
        self.covered.update(view.names)
        if self._whole:
            if Need.PER_SAMPLE_CROSS not in flags:  # cross products need what release() drops (conv g_i)
                view.release()
            self._kept.append(view)
            if self._trial and not self._segments and not self.accumulating:
                self._trial_size += view_bytes(view)
                if self._trial_size > self.trial_bytes and not (
                    self.needs.directions or Need.PER_SAMPLE_CROSS in flags
                ):  # over the budget: give the trial up for this micro-batch
                    self._trial_over, self._trial, self._whole, self._kept = self._trial_size, False, False, []

    def decide_checks(self) -> None:
        """Decide this step's conditions now (one transfer; a pass whose values are needed before the
        step's own transfer, such as cross products read before the optimizer step): the first that
        fails the whole step fails it (:meth:`fail`); one that concerns some statistics only stays."""
        if not self.checks:
            return
        whole = [c for c in self.checks if c.drops is None]
        self.checks = [c for c in self.checks if c.drops is not None]
        if not whole:
            return
        host = torch.cat([c.values.reshape(-1) for c in whole]).double().cpu().numpy()
        at = 0
        for c in whole:
            n = c.values.numel()
            note = c.decide(host[at : at + n])
            at += n
            if note is not None:
                self.fail(note)
                return

    def before_step(self, mean_grad: Mapping[str, torch.Tensor] | None = None) -> None:
        """The optimizer is about to step: no micro-batch follows. Views kept only to join micro-batches
        (not for directions known after the step, nor for cross products read before it) are used now
        and released before the optimizer allocates anything: the step's joined statistics are formed
        (``mean_grad`` as for :meth:`result`), or, with one micro-batch (the first step's trial, or a
        loop said to accumulate that did not this step), the views are dropped."""
        if self.failure is not None or self.needs.directions or Need.PER_SAMPLE_CROSS in self.needs.flags:
            return
        if self._segments:
            self._early = self._joined({}, mean_grad)
        else:
            self._kept = []

    def skip_check(self) -> None:
        """No check this step (p.grad held more than this backward's gradient, or was changed)."""
        if self.checking:
            self.checking = False
            self.checks_left -= 1
            self._sums = {}

    @torch.no_grad()
    def check_sums(self, grads: dict[str, torch.Tensor], factor: float) -> dict[tuple[str, ...], float]:
        """Layers (by parameter names) whose per-sample gradients do not add up to their gradient,
        with the ratio ||sum_i g_i||^2 factor^2 / sum_p ||p.grad||^2 (1 when p.grad = factor sum_i g_i).

        Called at the end of backward with ``factor`` = the loss's batch factor times the factor
        backward started from. Float32 round-off is allowed for: a mismatch must exceed 1e-3 of the
        expected value plus 1e-4 of B sum_i |g_i . gbar| (cancellation when the mean gradient is small
        next to the g_i); 3e-2 and 3e-3 when autocast gave half-precision gradients (bfloat16 keeps 8
        bits of mantissa).
        """
        if not self.checking:
            return {}
        sums, layers = self._sums, list(self._sums)
        if not layers:
            self.skip_check()
            return {}
        expected = [sum(grads[n].double().square().sum() for n in names if n in grads) / factor**2 for names in layers]
        rows, floors = [], []
        for k, e in zip(layers, expected, strict=True):
            got, spread = sums[k]
            want = torch.as_tensor(e, dtype=torch.float64, device=got.device)
            rows.append(torch.stack([got.double(), spread.double(), want]))
            # products of gradients this small lose their digits in the subnormals of the engine's dtype
            # (or underflow to 0): below this the check cannot tell, and says nothing
            info = torch.finfo(got.dtype)
            floors.append(info.tiny / info.eps * sum(grads[n].numel() for n in k if n in grads) / factor**2)
        flat = torch.stack([r.to(rows[0].device) for r in rows]).cpu().tolist()  # one transfer (layers on any GPU)
        if not all(math.isfinite(x) for row in flat for x in row):  # an overflowing AMP step: try later
            self.skip_check()
            return {}
        self.checking, self.checks_left, self._sums = False, 0, {}
        bad = {}
        rtol, stol = (3e-2, 3e-3) if self.low_precision else (1e-3, 1e-4)
        for names, (got, spread, want), floor in zip(layers, flat, floors, strict=True):
            if want > floor and abs(got - want) > rtol * want + stol * spread:
                bad[names] = got / want
        return bad

    def finish_backward(self) -> None:
        """Called before the optimizer step: reduce layers whose outputs got no gradient in some call."""
        if not self.active:
            return
        for module, handler in self._bare_handlers:  # bare parameters used outside their module's call
            if module not in self._calls and handler.refused is None:
                if self._bcast.has_results(handler.names.values()):
                    self._calls[module] = _Calls()
        for module in list(self._calls):
            try:
                self._process(module)
            except LayerLeftOut as e:
                self.drop(module, str(e))
            except Exception as e:
                self.drop(module, f"{type(e).__name__}: {e}")
        try:
            self._reduce_tied()
            check = self._bcast.check()
            if check is not None:
                self.checks.append(check)
        except PerSampleUndefined as e:
            self.fail(str(e))
        except Exception as e:
            self.fail(f"per-sample engine disabled for this step ({e})")

    def kept_views(self) -> list[View]:
        """The views kept for this step (for ``Need.PER_SAMPLE_CROSS`` or directions), after backward.
        Under gradient accumulation one :class:`~cockpit_lite.persample.views.JoinedView` per layer: its
        rows are every example of the step, scaled to the step (see :meth:`_joined`)."""
        if self.failure is not None:
            return []
        if not self._segments:
            return list(self._kept)
        segments, factors = self._parts()
        return [
            JoinedView(parts, factors, [seg.batch for seg in segments]) for parts in self._by_layer(segments).values()
        ]

    def _parts(self) -> tuple[list[_Segment], list[float]]:
        """The step's micro-batches (the current one last) and their factors r_k (see :meth:`_joined`)."""
        segments = [*self._segments, self._segment()]
        n = sum(seg.batch for seg in segments)
        return segments, [n / seg.batch if seg.mean else 1.0 for seg in segments]

    @staticmethod
    def _by_layer(segments: list[_Segment]) -> dict[tuple[str, ...], list[View | None]]:
        """{parameter names of a layer: its view in each micro-batch (None where it got no gradient)}."""
        out: dict[tuple[str, ...], list[View | None]] = {}
        for k, seg in enumerate(segments):
            for view in seg.kept:
                out.setdefault(tuple(view.names), [None] * len(segments))[k] = view
        return out

    @timed("engine")
    @torch.no_grad()
    def project(self, directions: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """g_i . v for each named direction v (per-parameter tensors), from the kept factors."""
        out: dict[str, torch.Tensor] = {}
        if self.failure is not None:
            return out
        early = self._early_dirs or {}  # (None under accumulation: next_micro_batch drops them)
        try:
            if early:  # the layers projected onto them during backward take the others alone
                late = {k: d for k, d in directions.items() if k not in early}
                out = _projections([v for v in self._kept if v.projected_early], late) if late else {}
                rest = _projections([v for v in self._kept if not v.projected_early], directions)
                for k, p in [*rest.items(), *((k, p) for k, p in self._early_proj.items() if k in directions)]:
                    out[k] = p if k not in out else out[k] + p
            else:
                out = _projections(self._kept, directions)
        except Exception as e:
            self.fail(f"per-sample projections failed ({e})")
            return {}
        finally:
            self._kept.clear()
            self._early_dirs, self._early_proj = None, {}
        return out

    def result(
        self,
        directions: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        mean_grad: Mapping[str, torch.Tensor] | None = None,
    ) -> PerSampleResult:
        """This step's per-sample statistics as an immutable result (projections onto ``directions``
        computed now from the kept factors, which are then released). Under gradient accumulation
        ``mean_grad`` (the step's p.grad in the optimizer's units: gbar for a mean loss, N gbar for a
        sum) gives g_i . gbar."""
        if self._early is not None and self.failure is None:
            early, self._early = self._early, None
            return early
        if self._segments and self.failure is None:
            return self._joined(directions or {}, mean_grad)
        projections = self.project(dict(directions)) if directions and self.failure is None else {}
        self._kept = []
        return PerSampleResult(
            self.sq, self.dot_mean, self.gram, self.grads, projections, self.covered, self.failure, (), self.checks
        )

    @torch.no_grad()
    def _joined(self, directions: Mapping, mean_grad: Mapping[str, torch.Tensor] | None) -> PerSampleResult:
        """Join the micro-batches of an accumulated step. Micro-batch k (B_k examples) holds per-sample
        gradients of w_k L_k (its backward's loss); over the step's N examples g_i = r_k x those, with
        r_k = N / B_k for a mean loss (1 for a sum), so that p.grad = mean_i g_i (sum_i g_i).

        Squared norms (r_k^2) and materialised g_i (r_k) are each micro-batch's, scaled; g_i . gbar is
        the projection onto the step's gradient ``mean_grad`` (p.grad after the last backward) and,
        like projections onto ``directions``, needs every micro-batch's views; Gram entries are each
        micro-batch's own Gram (r_k^2) on the diagonal blocks and cross products of two micro-batches'
        views (r_k r_l) off it (:func:`~cockpit_lite.persample.views.joined_gram`)."""
        segments, factors = self._parts()
        flags = self.needs.flags
        batches = [seg.batch for seg in segments]
        notes = []

        def join(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
            """Rows of every example of the step; a micro-batch a layer got no gradient from: zeros."""
            like = next((p for p in parts if p is not None), None)
            if like is None:
                return None
            zeros = lambda b: like.new_zeros((b, *like.shape[1:]))  # noqa: E731
            return torch.cat([p if p is not None else zeros(b) for p, b in zip(parts, batches, strict=True)])

        def joined(per_segment: list[dict], power: int = 1) -> dict[str, torch.Tensor]:
            keys = dict.fromkeys(k for d in per_segment for k in d)
            out = {}
            for key in keys:
                parts = [None if key not in d else d[key] * r**power for d, r in zip(per_segment, factors, strict=True)]
                value = join(parts)
                if value is not None:
                    out[key] = value
            return out

        sq = joined([seg.sq for seg in segments], power=2)
        grads = joined([seg.grads for seg in segments]) if Need.PER_SAMPLE_GRADS in flags else {}
        whole = all(seg.whole for seg in segments)
        left_out = []
        dot_mean, projections, gram = None, {}, {}
        if Need.PER_SAMPLE_DOT_MEAN in flags:
            if not whole:
                left_out.append("g_i . gbar")
            elif mean_grad is None:
                notes.append(
                    "g_i . gbar of this accumulated step is left out: p.grad was not seen after its last backward"
                )
            else:
                gbar = {"__gbar__": dict(mean_grad)}
                dot_mean = joined([_projections(seg.kept, gbar) for seg in segments])["__gbar__"]
                if not segments[-1].mean:  # p.grad = sum_i g_i: gbar is p.grad / N
                    dot_mean = dot_mean / sum(batches)
                names = {name for seg in segments for v in seg.kept for name in v.names}
                unit = 1.0 if segments[-1].mean else 1.0 / sum(batches)
                self.checks.append(self._mean_check(dot_mean, mean_grad, names, unit))
        if directions:
            if whole:
                projections = joined([_projections(seg.kept, dict(directions)) for seg in segments])
            else:
                left_out.append("projections")
        if Need.PER_SAMPLE_GRAM in flags or Need.PER_SAMPLE_GRAM_BY_PARAM in flags:
            if whole:
                for parts in self._by_layer(segments).values():
                    names = {n for v in parts if v is not None for n in v.names}
                    grams = [{n: g for n, g in seg.gram.items() if n in names} for seg in segments]
                    gram.update(joined_gram(parts, grams, factors, batches))
                    for v in parts:  # what the cross products formed (conv g_i) is not kept
                        if v is not None:
                            v.release()
            else:
                left_out.append("Gram entries")
        if left_out:
            notes.append(self._first_step_note(" and ".join(left_out)))
        for seg in segments:
            seg.kept = []
        self._segments, self._kept = [], []
        covered = set.intersection(*(seg.covered for seg in segments))
        return PerSampleResult(sq, dot_mean, gram, grads, projections, covered, None, notes, self.checks)

    def _mean_check(
        self, dot: torch.Tensor, mean_grad: Mapping[str, torch.Tensor], names: Collection[str], unit: float
    ) -> DeferredCheck:
        """gbar = ``unit`` x ``mean_grad`` (over ``names``) must be the mean of the g_i whose g_i . gbar are
        ``dot``: sum_i g_i . gbar = N ||gbar||^2, to the tolerance of :meth:`check_sums`; decided on the
        host with the step's values (else g_i . gbar is left out, with the ratio of the two sides)."""
        sq = [mean_grad[n].double().square().sum() for n in names if n in mean_grad]
        want = (torch.stack(sq).sum() if sq else dot.new_zeros((), dtype=torch.float64)) * (unit * unit * len(dot))
        values = torch.stack([dot.double().sum(), dot.double().abs().sum(), want.to(dot.device)])
        rtol, stol = (3e-2, 3e-3) if self.low_precision else (1e-3, 1e-4)

        def verdict(host: np.ndarray) -> str | None:
            got, spread, want = (float(v) for v in host)
            if not all(math.isfinite(v) for v in (got, spread, want)) or abs(got - want) <= rtol * want + stol * spread:
                return None
            ratio = got / want if want > 0 else float("inf")
            return (
                "g_i . gbar of this accumulated step is left out: gbar taken from p.grad after its last "
                "backward is not the mean of the step's per-sample gradients (sum_i g_i . gbar / "
                f"(N ||gbar||^2) = {ratio:.4g}, not 1): a gradient left from before the step (no "
                "zero_grad()), or a term of the loss or a use of the weights that the per-layer hooks do "
                "not see"
            )

        return DeferredCheck(values, verdict, frozenset({"dot_mean"}))

    def _first_step_note(self, what: str) -> str:
        """Why the first accumulated step leaves ``what`` out, and the fix."""
        if self._trial_over is not None:
            why = (
                f"the first micro-batch's views ({self._trial_over / 2**20:.0f} MiB and more) were over the "
                f"{self.trial_bytes / 2**20:.0f} MiB kept before the cockpit knows that the loop accumulates"
            )
        else:
            why = (
                "the first micro-batch's views were not kept: the cockpit learns that the loop accumulates at "
                "its second forward"
            )
        return (
            f"{what} of the first step with gradient accumulation are left out ({why}); from the next step on "
            "they are computed. A loop that knows it accumulates can say so before its first step: "
            "cockpit.engine.expect_accumulation()"
        )

    # --- another batch through the same capture code (TracIn probes) ---------------------------------
    def probe(self, inputs: Any, targets: Any, loss_fn: nn.Module) -> tuple[dict[tuple[str, ...], View], torch.Tensor]:
        """Per-layer views of the gradients of the example losses l_k of another batch (K examples) at
        the current parameters, and l_k (:func:`cockpit_lite.losses.example_losses`).

        A session of its own, with the engine's capture, view and tied-weights code (memory guard
        included): its own forward hooks for the length of one forward and one ``autograd.grad`` with
        respect to the layers' outputs. No cockpit sees it (``paused()``), ``p.grad`` is untouched,
        the global RNG is forked, the model's mode is kept. Raises :class:`PerSampleUndefined` (e.g.
        train-mode BatchNorm) before any forward, and ``RuntimeError`` when the session failed.
        """
        from cockpit_lite.losses import example_losses
        from cockpit_lite.pause import paused

        for h in self.handlers.values():
            h.check()  # before any forward: e.g. train-mode BatchNorm must not update its statistics
        session = PerSampleEngine(self.model, costs=self.costs, warn=self._warn, attach=False, handlers=self.handlers)
        session.checks_left = 0
        session._probing = True
        session._axes, session._probe_notes = self._axes, self._probe_notes  # one cache of sample axes
        session.begin(Needs({Need.PER_SAMPLE_CROSS}))
        args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        # the batch of the probe's inputs during its forward (sample axes are resolved for it); the
        # losses' rows then decide
        first = next((t for t in tree_leaves(args) if torch.is_tensor(t) and t.dim() > 0), None)
        session.batch = None if first is None else int(first.shape[0])
        devices = cuda_devices(self.model.parameters())
        own = [m.weight for m, h in self.handlers.items() if getattr(h, "own_forward", False)]
        recorder = _LookupRecorder(own) if own else contextlib.nullcontext()
        with paused(), torch.random.fork_rng(devices=devices), torch.enable_grad():
            session._attach()
            try:
                with recorder:
                    session._lookups = recorder.calls if own else None
                    pred = self.model(*args)
            finally:
                session.close_hooks()
            losses = example_losses(loss_fn, pred, targets)
            session.set_batch(int(losses.shape[0]), 1.0)
            if session._outputs:
                torch.autograd.grad(losses.sum(), session._outputs, allow_unused=True)
            session.finish_backward()
        if session.failure is None:  # (the probe is its own pass: its conditions are decided now)
            session.decide_checks()
        if session.failure is not None:
            raise RuntimeError(session.failure)
        views = {tuple(v.names): v for v in session.kept_views()}
        session.close()
        return views, losses.detach()
