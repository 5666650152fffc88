"""Per-layer handlers, dispatched by module type (in the spirit of BackPACK's extensions).

A handler captures what its module's forward saw (detached inputs) and, once the output gradients of
the step have arrived, builds a :class:`~cockpit_lite.persample.views.View`. Layers with a factor form
get one; norm layers materialise their (small) per-sample gradients; everything else with parameters
goes through ``torch.func`` on that module alone.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import sys
import warnings
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel
from torch.overrides import TorchFunctionMode

from cockpit_lite.compat import (
    BatchNormBase,
    InstanceNormBase,
    conv_forward,
    conv_weight_grad,
    pad_like_conv,
    saved_attribute,
    sdpa_backends,
    tensor_version,
    tree_flatten,
    tree_map,
    unguarded,
)
from cockpit_lite.errors import CockpitWarning
from cockpit_lite.persample.broadcast import dropout_active
from cockpit_lite.persample.checks import DeferredCheck
from cockpit_lite.persample.views import (
    BagView,
    ConvView,
    EmbeddingView,
    FactorView,
    MaterialisedView,
    View,
    ViewGroup,
    chunk_rows,
    conv_bias_grads,
    factor_grams_cheaper,
)
from cockpit_lite.sandbox import cuda_devices


class PerSampleUndefined(Exception):
    """Per-sample gradients have no single definition for this layer in its current mode. With
    ``couples=True`` the layer makes the examples interact (train-mode BatchNorm), so no layer's output
    gradient rows are per-example shares and the whole step is left out; otherwise only this layer."""

    def __init__(self, message: str, couples: bool = False):
        super().__init__(message)
        self.couples = couples


class LayerLeftOut(PerSampleUndefined):
    """This layer's per-sample gradients cannot be had on this step (found while computing them, in
    backward): only the layer is left out, with this message as the reason."""


@dataclass(frozen=True)
class SampleAxes:
    """Where the sample axis lies in the tensors of one module call, found by the engine's shape probe
    (:meth:`~cockpit_lite.persample.engine.PerSampleEngine.resolve_axes`) when the call has several
    axes of the batch size: the axis whose size follows the batch when the model runs on fewer examples.

    ``inputs`` has one entry per leaf of ``tree_flatten((args, kwargs))`` (None: not a tensor, or a
    tensor shared by every example); ``outputs`` one per tensor output that required grad, in the order
    of the call's output gradients.
    """

    inputs: tuple[int | None, ...]
    outputs: tuple[int | None, ...] = ()
    #: rows of examples flattened with their positions (B k along a sample axis) laid out as (groups, B,
    #: k / groups): 1 example by example; more, grouped first (Llama 4's experts take the tokens repeated
    #: once per expert, expert-major). Only a torch.func replay of the module serves groups > 1
    groups: int = 1


def _feature_first_samples(
    x: torch.Tensor, batch: int, n_feature: int, axis: int | None = None
) -> tuple[torch.Tensor, int]:
    """Reshape x (..., *features) to (B, T, *features); return it and the sample axis used.

    The sample axis is ``axis`` when given (resolved by the engine's shape probe), else the one leading
    axis of size B. Several such axes (e.g. a (T, B, d) activation with T == B) that the probe could not
    resolve are refused rather than guessed (for B == 1 any of them will do: moving an axis of size 1
    does not reorder the data); so is a loss over a flattened (B*T) batch, whose per-token gradients
    are not separable once a layer mixes positions (attention).
    """
    lead = x.shape[: x.dim() - n_feature]
    feat = x.shape[x.dim() - n_feature :]
    # (a resolved axis may hold the examples flattened with their positions, B k rows example by example)
    if axis is not None and not (0 <= axis < len(lead) and lead[axis] % batch == 0 and lead[axis] > 0):
        raise ValueError(f"the resolved sample axis {axis} of an activation {tuple(x.shape)} has no size {batch}")
    axes = [axis] if axis is not None else [a for a, size in enumerate(lead) if size == batch]
    if len(axes) == 1 or (len(axes) > 1 and batch == 1):
        axis = axes[0]
        if axis == 0:
            return x.reshape(batch, -1, *feat), 0
        return x.movedim(axis, 0).reshape(batch, -1, *feat), axis
    if len(axes) > 1:
        raise ValueError(
            f"an activation of shape {tuple(x.shape)} has several axes of size {batch} (the batch size), so "
            "the sample axis is ambiguous, and a shape probe (the model run on fewer examples) did not resolve "
            "it; per-sample statistics are skipped for this layer. A batch size different from the sequence "
            "length avoids the question."
        )
    flat = next((size for size in lead if size % batch == 0 and size > batch), None)  # (B k rows?)
    raise ValueError(
        f"cannot find the batch axis of size {batch} in an activation of shape {tuple(x.shape)}; per-sample "
        "statistics need the batch axis in every layer's input"
        + (
            f" (here the examples look flattened into one axis with their positions, {batch} x {flat // batch} "
            "rows: a layer on (B T, d) rows, as in OPT's feed-forward blocks, or a loss over flattened tokens)"
            if flat is not None
            else ""
        )
    )


def _same_layout(e: torch.Tensor, batch: int, axis: int, n_feature: int) -> torch.Tensor:
    feat = e.shape[e.dim() - n_feature :]
    if axis == 0:
        return e.reshape(batch, -1, *feat)
    return e.movedim(axis, 0).reshape(batch, -1, *feat)


def _cat(parts: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.cat without the copy for the usual single call of a module per step."""
    return parts[0] if len(parts) == 1 else torch.cat(list(parts), dim)


def _scaled(e: torch.Tensor, inv_scale: float) -> torch.Tensor:
    """The output gradient of the per-sample losses: the captured one times B for a mean loss."""
    return e if inv_scale == 1.0 else e * inv_scale


class Handler:
    """Base handler: serves the per-sample gradients of one module's trainable parameters.

    One instance per module, built when a cockpit attaches. ``names`` maps the module's local parameter
    names (``"weight"``) to full model names (``"encoder.0.weight"``); it holds only the parameters the
    optimizer trains. Per step the engine calls :meth:`check` and :meth:`capture` at each forward of the
    module, and :meth:`view` once the output gradients of all the step's calls have arrived.
    Subclasses implement :meth:`view` (and :meth:`capture` when the first positional input is not what
    they need); :class:`LayerHandler` asks for per-sample gradients only.
    """

    #: call index -> where the sample axis lies in that call's tensors, set by the engine around
    #: :meth:`view` for calls whose shapes alone do not tell it (see :class:`SampleAxes`)
    sample_axes: Mapping[int, SampleAxes] = MappingProxyType({})
    #: the module's own parameters (local names) this handler's view serves; None: every one it is given
    SERVES: frozenset[str] | None = None
    #: why the module cannot be served at all (the engine leaves it out at each call, saying this)
    refused: str | None = None

    def __init__(self, module: nn.Module, names: dict[str, str]):
        self.module = module
        self.names = names
        self.refused = _refusal(module, names, type(self).SERVES)

    def _input_axis(self, call: int) -> int | None:
        """The resolved sample axis of call ``call``'s first input, None if none was resolved.

        Raises:
            ValueError: the shape probe found that the input is shared by every example (no axis of it
                follows the batch) and the call was not split where its output meets the batch.
        """
        axes = self.sample_axes.get(call)
        if axes is None or not axes.inputs:
            return None
        if axes.inputs[0] is None:
            raise ValueError(
                f"the input of this {type(self.module).__name__} call is shared by every example (the shape probe "
                "found no axis of it that follows the batch) and its output was not split where it meets the "
                "batch; per-sample statistics are skipped for this layer"
            )
        return axes.inputs[0]

    def ambiguous(self, args: tuple, kwargs: dict, output, batch: int) -> bool:
        """Whether the shapes of this call do not tell where its sample axis is, so that the engine must
        resolve it (by its shape probe) before :meth:`view`: by default, some tensor argument or output
        has several axes of size ``batch``."""
        leaves = [t for t in tree_flatten((args, kwargs, output))[0] if torch.is_tensor(t)]
        return any(sum(1 for n in t.shape if n == batch) > 1 for t in leaves)

    def check(self) -> None:
        """Raise :class:`PerSampleUndefined` if per-sample gradients are undefined right now."""

    def take_checks(self) -> list[DeferredCheck]:
        """The conditions the last :meth:`view` holds under, to be decided on the host with the step's
        values (:mod:`cockpit_lite.persample.checks`); taken once, after each :meth:`view`."""
        return []

    def pre_forward(self, args: tuple, kwargs: dict) -> None:
        """Called just before each forward call of the module on a step with per-sample work, when a
        subclass overrides it (the engine then adds a forward pre-hook): keep what :meth:`capture` will
        need from before the call, e.g. the random state a fused dropout draws from."""

    def capture(self, args: tuple, kwargs: dict, output) -> object:
        """What to keep of one forward call until its output gradient arrives (default: the detached
        first positional input). Must not keep the graph: detach."""
        return args[0].detach()

    def view(self, captures: list, grads: list[Sequence[torch.Tensor | None]], batch: int, inv_scale: float) -> View:
        """The per-sample gradients of this step, over all the module's calls.

        Args:
            captures: what :meth:`capture` returned, one per forward call this step.
            grads: per call, the gradients of the call's tensor outputs that require grad (in the order
                ``compat.tree_flatten`` flattens the output); None for an output no gradient reached.
            batch: B, the loss's batch size.
            inv_scale: the factor that turns a captured output gradient into that of the per-sample
                losses l_i (B for a mean loss, 1 for a sum, divided by an AMP loss scale).
        """
        raise NotImplementedError

    def single_view(self, capture: object, grad: torch.Tensor, batch: int, inv_scale: float) -> View | None:
        """The view of a step's only call of the module, from its capture and the gradient of its single
        output, where the shapes are the plain case the engine's short path serves without a sample-axes
        probe, copies or replays (the same view :meth:`view` returns); None otherwise, and by default:
        the engine then takes :meth:`view`."""
        return None

    def weight_grad_node(self, outputs: list[torch.Tensor]):
        """The autograd node of this call that computes the weight's gradient (read by
        :meth:`weight_grad` from the node's input gradients), when the view would otherwise recompute
        the batch weight gradient sum_i g_i (None: nothing to save)."""
        return None

    def weight_grad(self, grad_inputs: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
        """The weight's gradient among the input gradients of :meth:`weight_grad_node`'s node."""
        return grad_inputs[1]


def _refusal(module: nn.Module, names: Mapping[str, str], serves: frozenset[str] | None) -> str | None:
    """Why a handler cannot serve ``module``'s parameters ``names`` (None if it can): parameters from
    which the module's forward computes the tensors it uses, which the engine does not follow."""
    from torch.nn.utils import parametrize

    if isinstance(module, parametrize.ParametrizationList):
        return (
            f"{', '.join(sorted(names.values()))} are parametrized (torch.nn.utils.parametrize: "
            "parametrizations.weight_norm, orthogonal, spectral_norm): the tensor the layer uses is computed "
            "from them at every call, which the per-sample engine does not follow"
        )
    extra = sorted(names[n] for n in names if serves is not None and n not in serves)
    if extra:
        return (
            f"{type(module).__name__} holds {', '.join(extra)} besides its own {' and '.join(sorted(serves))}: its "
            "forward uses a tensor computed from them (a forward pre-hook that recomputes the weight before each "
            "call), which the per-sample engine does not follow"
        )
    return None


def _leading_ambiguous(args: tuple, batch: int, n_feature: int) -> bool:
    """Whether the first argument has several leading axes (all but its last ``n_feature``) of size B."""
    x = args[0] if args and torch.is_tensor(args[0]) else None
    if x is None or x.dim() - n_feature < 2:  # (one leading axis at most: nothing to tell apart)
        return False
    return sum(1 for n in x.shape[: x.dim() - n_feature] if n == batch) > 1


#: the autograd nodes of the view that gives a Linear call at several positions its (..., T, o) shape
_UNFLATTEN = frozenset({"ViewBackward0", "UnsafeViewBackward0"})


class LinearHandler(Handler):
    SERVES = frozenset({"weight", "bias"})

    def ambiguous(self, args, kwargs, output, batch):
        return _leading_ambiguous(args, batch, 1)

    def single_view(self, capture, grad, batch, inv_scale):
        if type(self).view is not LinearHandler.view:  # a subclass's own view serves its calls
            return None
        return self._flat_view(capture, grad, batch, inv_scale)

    def _flat_view(self, x: torch.Tensor, g: torch.Tensor, batch: int, inv_scale: float) -> FactorView | None:
        """The usual single (B, i) call: the factors as views, no copies (None for other shapes)."""
        if x.dim() == 2 == g.dim() and x.shape[0] == batch == g.shape[0] and x.dtype == g.dtype:
            w, b, w_shape = self.names.get("weight"), self.names.get("bias"), (g.shape[1], x.shape[1])
            return FactorView(None, None, w, b, w_shape, e_scale=inv_scale, flat=(x, g))
        return None

    def view(self, captures, grads, batch, inv_scale):
        m, names = self.module, self.names
        if len(captures) == 1 and not self.sample_axes and grads[0][0] is not None:
            view = self._flat_view(captures[0], grads[0][0], batch, inv_scale)
            if view is not None:
                return view
        a_parts, e_parts = [], []
        for k, (x, (g,)) in enumerate(zip(captures, grads, strict=True)):
            if g is None:
                continue
            a, axis = _feature_first_samples(x, batch, 1, self._input_axis(k))
            # under autocast the input is float32 and the output gradient bfloat16/float16: one dtype
            dt = torch.promote_types(a.dtype, g.dtype)
            a_parts.append(a.to(dt))
            e_parts.append(_same_layout(g, batch, axis, 1).to(dt))
        # (B, 1, T, i) and (B, 1, T, o); no copy for the usual single call
        a = _cat(a_parts, 1).unsqueeze(1)
        e = _cat(e_parts, 1).unsqueeze(1)
        return FactorView(a, e, names.get("weight"), names.get("bias"), tuple(m.weight.shape), e_scale=inv_scale)

    def weight_grad_node(self, outputs):
        """For a (B, i) -> (B, o) call: its ``addmm`` (``mm`` without bias) node, whose input gradient
        for ``weight.T`` is the batch weight gradient, so that g_i . gbar costs one product
        (:meth:`FactorView.dot_mean`); for a call at several positions, (B, T, i) -> (B, T, o), the same node
        under the view that unflattens its rows (the node's output gradient is then the output's, flattened:
        g_i . gbar of the formed g_i takes gbar from it, no pass to average them)."""
        if len(outputs) != 1 or "weight" not in self.names or outputs[0].dim() < 2:
            return None
        node = outputs[0].grad_fn
        if outputs[0].dim() == 2:
            (bsz, o), i = outputs[0].shape, self.module.weight.shape[1]
            if factor_grams_cheaper(bsz, i, o):  # g_i . gbar by the factors' Grams: no use for it
                return None
        elif node is not None and node.name() in _UNFLATTEN and len(node.next_functions) == 1:
            node = node.next_functions[0][0]
        else:
            return None
        position = {"AddmmBackward0": 2, "MmBackward0": 1}.get(node.name() if node is not None else "")
        if position is None:  # another op (a view of the product, a Conv1D's addmm on the weight itself)
            return None
        nxt = node.next_functions
        if len(nxt) <= position or nxt[position][0] is None or nxt[position][0].name() != "TBackward0":
            return None
        leaf = nxt[position][0].next_functions
        if not leaf or getattr(leaf[0][0], "variable", None) is not self.module.weight:
            return None
        self._position = position
        return node

    def weight_grad(self, grad_inputs):
        g = grad_inputs[self._position]
        return None if g is None else g.T


class ConvHandler(Handler):
    """Conv1d/Conv2d with any stride, dilation, padding mode and ``groups``.

    Per-sample weight gradients g_i = E_i A_i^T (per group) come from one of three exact kernels, the
    fastest for the layer's shapes (timed once per shape on first use, since it depends on the
    hardware): unfolded patches with a batched matmul, the convolution weight-gradient kernel with
    the batch folded into the groups, or a forward convolution of the input with the output
    gradients as filters (:meth:`_grads_swapped`).
    """

    SERVES = frozenset({"weight", "bias"})

    def ambiguous(self, args, kwargs, output, batch):
        return False  # (B, C, *spatial): the sample axis is 0

    _choice: dict[tuple, str] = {}  # shared across instances: (shapes, params) -> kernel name

    def _padded(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """x with the module's padding applied explicitly when it is not plain zero padding."""
        m = self.module
        nd = x.dim() - 2
        pad = m.padding
        if m.padding_mode != "zeros":
            return pad_like_conv(m, x), (0,) * nd
        if isinstance(pad, str):
            if pad == "valid":
                return x, (0,) * nd
            total = [di * (ki - 1) for di, ki in zip(m.dilation, m.kernel_size, strict=True)]
            lr: list[int] = []
            for tot in reversed(total):
                lr += [tot // 2, tot - tot // 2]
            return F.pad(x, lr), (0,) * nd
        return x, tuple(pad)

    def _prepared(self, x: torch.Tensor):
        """x padded explicitly where needed and seen as 2-D, with the 2-D kernel, stride, dilation and
        padding for unfold / the convolution kernels."""
        m = self.module
        xp, pad = self._padded(x)
        return self._as_2d(xp, m.kernel_size, m.stride, m.dilation, pad)

    @staticmethod
    def _as_2d(x, k, s, d, pad):
        if x.dim() == 3:
            return x.unsqueeze(2), (1, k[0]), (1, s[0]), (1, d[0]), (0, pad[0])
        return x, tuple(k), tuple(s), tuple(d), tuple(pad)

    def _grads_unfold(self, x, e):
        m = self.module
        cols = self._unfold(x)  # (B, C_in*k, T)
        bsz, ck, t = cols.shape
        g = m.groups
        ee = e.reshape(bsz * g, m.out_channels // g, t)
        gw = torch.bmm(ee, cols.reshape(bsz * g, ck // g, t).transpose(1, 2))
        return gw.reshape(bsz, *m.weight.shape)

    def _grads_grouped(self, x, e):
        m = self.module
        x2, k, s, d, pad = self._prepared(x)
        bsz = x2.shape[0]
        e2 = e.reshape(bsz, m.out_channels, *([1] if e.dim() == 3 else []), *e.shape[2:])
        w_shape = (bsz * m.out_channels, m.in_channels // m.groups, *k)
        gw = conv_weight_grad(
            e2.reshape(1, -1, *e2.shape[2:]), x2.reshape(1, -1, *x2.shape[2:]), w_shape, s, pad, d, bsz * m.groups
        )
        return gw.reshape(bsz, *m.weight.shape)

    def _grads_swapped(self, x, e):
        """g_i as a forward convolution with roles swapped: the padded input channels are the batch,
        the samples are the groups, each sample's output gradients are its filters; the module's stride
        becomes the filters' dilation and its dilation the stride. For groups > 1 every (input, output)
        channel pair is formed and the diagonal blocks are kept (g times the work: the tuner decides).
        Fast where the input has few channels (a network's first layer)."""
        m = self.module
        x2, k, s, d, pad = self._prepared(x)
        bsz, c_in = x2.shape[:2]
        e2 = e.reshape(bsz, m.out_channels, *([1] if e.dim() == 3 else []), *e.shape[2:])
        if any(pad):
            x2 = F.pad(x2, (pad[1], pad[1], pad[0], pad[0]))
        out = F.conv2d(
            x2.transpose(0, 1), e2.reshape(bsz * m.out_channels, 1, *e2.shape[2:]), stride=d, dilation=s, groups=bsz
        )[..., : k[0], : k[1]]  # (C_in, B * C_out, k0, k1)
        g = m.groups
        out = out.reshape(g, c_in // g, bsz, g, m.out_channels // g, k[0], k[1])
        out = out.diagonal(dim1=0, dim2=3)  # (C_in/g, B, C_out/g, k0, k1, g): group j's inputs and outputs
        gw = out.permute(1, 5, 2, 0, 3, 4)  # (B, g, C_out/g, C_in/g, k0, k1)
        return gw.reshape(bsz, *m.weight.shape)

    def _weight_grads(self, x, e):
        key = (
            tuple(x.shape),
            tuple(e.shape),
            x.dtype,
            x.device.type,
            self.module.groups,
            id(type(self.module)),
            self.module.kernel_size,
            self.module.stride,
            self.module.dilation,
            str(self.module.padding),
        )
        choice = self._choice.get(key)
        if choice is None:
            choice = self._choice[key] = self._tune(x, e)
        return self._kernels()[choice](x, e)

    def _kernels(self):
        return {"grouped": self._grads_grouped, "unfold": self._grads_unfold, "swapped": self._grads_swapped}

    def _tune(self, x, e, repeats: int = 3) -> str:
        """The faster kernel for these shapes: best of ``repeats`` timings each (robust to a busy machine)."""
        import time

        def sync():
            if x.is_cuda:
                torch.cuda.synchronize(x.device)

        best, best_t = "grouped", float("inf")
        for name, fn in self._kernels().items():
            if name == "swapped" and self.module.groups > 1:  # g times the work and memory of g_i
                continue
            try:
                fn(x, e)  # warm-up
                times = []
                for _ in range(repeats):
                    sync()
                    t0 = time.perf_counter()
                    fn(x, e)
                    sync()
                    times.append(time.perf_counter() - t0)
            except RuntimeError:
                continue
            if min(times) < best_t:
                best, best_t = name, min(times)
        return best

    def view(self, captures, grads, batch, inv_scale):
        m = self.module
        inputs, out_grads = [], []
        for x, (go,) in zip(captures, grads, strict=True):
            if go is None:
                continue
            if x.dim() != m.weight.dim() or x.shape[0] != batch:
                raise ValueError(f"conv input of shape {tuple(x.shape)} has no batch axis of size {batch}")
            # under autocast the input is float32 and the output gradient bfloat16/float16: one dtype
            dt = torch.promote_types(x.dtype, go.dtype)
            inputs.append(x.to(dt))
            out_grads.append(_scaled(go.to(dt), inv_scale))
        if "weight" not in self.names:  # a frozen weight: the bias alone
            return MaterialisedView({self.names["bias"]: conv_bias_grads(out_grads)})

        def make_grads(rows: slice | None = None):
            """The per-sample gradients of the examples ``rows`` (default: all)."""
            xs = inputs if rows is None else [x[rows] for x in inputs]
            es = out_grads if rows is None else [e[rows] for e in out_grads]
            gw = sum(self._weight_grads(x, e) for x, e in zip(xs, es, strict=True))
            out = {self.names["weight"]: gw}
            if "bias" in self.names:
                out[self.names["bias"]] = conv_bias_grads(es)
            return out

        conv = lambda x, v: conv_forward(m, x, v)  # noqa: E731
        ghost = lambda: self._ghost_sq_norms(inputs, out_grads)  # noqa: E731
        return ConvView(
            make_grads,
            inputs,
            out_grads,
            conv,
            self.names["weight"],
            self.names.get("bias"),
            m.weight.numel(),
            ghost if self._ghost_is_cheaper(inputs[0], out_grads[0]) else None,
            lambda: self._batch_grad(inputs, out_grads),
        )

    def weight_grad_node(self, outputs):
        """The convolution's backward node, if the ghost path or the chunked one serves this call (their
        g_i . gbar needs sum_i g_i, which that node computes anyway) and the node convolves with the weight
        itself."""
        if len(outputs) != 1 or "weight" not in self.names:
            return None
        out = outputs[0]
        node = out.grad_fn
        if node is None or "Convolution" not in node.name():
            return None
        chunked = chunk_rows(out.shape[0], self.module.weight.numel(), out) is not None
        if not (self._ghost_is_cheaper(None, out) or chunked):
            return None
        nxt = node.next_functions
        if len(nxt) < 2 or nxt[1][0] is None or getattr(nxt[1][0], "variable", None) is not self.module.weight:
            return None
        return node

    def _ghost_is_cheaper(self, x, e) -> bool:
        """sum_{s,t} (a_s . a_t)(e_s . e_t) costs T^2 (i + o) per sample and group, forming g_i T i o."""
        m = self.module
        t = e[0, 0].numel()
        i = m.weight[0].numel()
        o = m.out_channels // m.groups
        return t * (i + o) < i * o

    def _ghost_sq_norms(self, inputs, out_grads) -> torch.Tensor:
        """||g_i||^2 = sum_{s,t} (a_s . a_t)(e_s . e_t) per group, over the unfolded patches, formed for a
        chunk of examples at a time when they exceed ``CONV_CHUNK_BYTES`` (:func:`chunk_rows`)."""
        m = self.module
        bsz = inputs[0].shape[0]
        per_row = sum((m.weight[0].numel() * m.groups + m.out_channels) * e[0, 0].numel() for e in out_grads)
        rows = chunk_rows(bsz, per_row, out_grads[0])
        if rows is None:
            return self._ghost_rows(inputs, out_grads)
        return torch.cat(
            [
                self._ghost_rows([x[s : s + rows] for x in inputs], [e[s : s + rows] for e in out_grads])
                for s in range(0, bsz, rows)
            ]
        )

    def _ghost_rows(self, inputs, out_grads) -> torch.Tensor:
        m = self.module
        g = m.groups
        cols = _cat([self._unfold(x) for x in inputs], 2)  # (B, C_in k, T)
        e = _cat([e.flatten(2) for e in out_grads], 2)  # (B, C_out, T)
        bsz, ck, t = cols.shape
        a = cols.reshape(bsz, g, ck // g, t)
        ee = e.reshape(bsz, g, -1, t)
        aa = torch.matmul(a.transpose(2, 3), a)  # (B, g, T, T)
        return (aa * torch.matmul(ee.transpose(2, 3), ee)).sum((1, 2, 3))

    def _unfold(self, x: torch.Tensor) -> torch.Tensor:
        x2, k, s, d, pad = self._prepared(x)
        return F.unfold(x2, k, dilation=d, padding=pad, stride=s)

    def _batch_grad(self, inputs, out_grads) -> torch.Tensor:
        """sum_i g_i by the convolution's own weight-gradient kernel."""
        m = self.module
        total = None
        for x, e in zip(inputs, out_grads, strict=True):
            x2, k, s, d, pad = self._prepared(x)
            e2 = e.unsqueeze(2) if e.dim() == 3 else e
            w_shape = (m.out_channels, m.in_channels // m.groups, *k)
            gw = conv_weight_grad(e2, x2, w_shape, s, pad, d, m.groups).reshape(m.weight.shape)
            total = gw if total is None else total + gw
        return total


class EmbeddingHandler(Handler):
    """nn.Embedding: g_i(W) rows are the output gradient rows of example i's tokens. A subclass with a
    forward of its own (Gemma's embedding scaled by sqrt(d), OPT's positions computed from the attention
    mask) is read at its lookup: the indices and the output gradient of the ``F.embedding`` of its weight
    that its forward makes (:meth:`lookup`), not at the module's input and output."""

    SERVES = frozenset({"weight"})

    def __init__(self, module: nn.Module, names: dict[str, str]):
        super().__init__(module, names)
        self.own_forward = type(module).forward is not nn.Embedding.forward

    def lookup(self, output: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """The autograd node of this call's one lookup of the weight (``EmbeddingBackward0``), found from
        the call's output within a few nodes, and its indices.

        Raises:
            PerSampleUndefined: no such node, or several (a forward that looks the weight up twice)."""
        weight = self.module.weight
        queue, seen, found = [output.grad_fn], set(), []
        while queue and len(seen) < 64:
            node = queue.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            nxt = [n for n, _ in node.next_functions if n is not None]
            if node.name() == "EmbeddingBackward0" and any(getattr(n, "variable", None) is weight for n in nxt):
                found.append(node)
                continue
            queue.extend(n for n in nxt if n.name() != "AccumulateGrad")
        if len(found) != 1:
            raise PerSampleUndefined(
                f"{type(self.module).__name__} (an nn.Embedding with a forward of its own) looks its weight up "
                f"{len(found)} times in a call, not once, as far as the engine can follow from its output: "
                "per-sample statistics leave it out"
            )
        return found[0], saved_attribute(found[0], "indices")

    def ambiguous(self, args, kwargs, output, batch):
        return _leading_ambiguous(args, batch, 0)

    def view(self, captures, grads, batch, inv_scale):
        m = self.module
        idx_parts, e_parts = [], []
        for k, (idx, (go,)) in enumerate(zip(captures, grads, strict=True)):
            if go is None:
                continue
            i, axis = _feature_first_samples(idx.unsqueeze(-1), batch, 1, self._input_axis(k))
            e = _scaled(_same_layout(go, batch, axis, 1), inv_scale)
            i = i.squeeze(-1)
            if m.padding_idx is not None:
                e = e * (i != m.padding_idx).unsqueeze(-1)
            if m.scale_grad_by_freq:  # the backward divides each row by its token's count over the whole call
                e = e / torch.bincount(idx.reshape(-1), minlength=m.num_embeddings)[i].unsqueeze(-1).to(e.dtype)
            idx_parts.append(i)
            e_parts.append(e)
        return EmbeddingView(_cat(idx_parts, 1), _cat(e_parts, 1), self.names["weight"], m.num_embeddings)


#: why a module replayed on each example's rows (FuncHandler._rows_view) is left out
ROWS_MIXED = (
    "it holds the rows of several examples along one axis and does not compute them example by example (one "
    "example's rows replayed alone did not give its rows of the call's output: a normalisation over all rows, "
    "a capacity over the batch, randomness); per-sample statistics leave out its parameters from then on"
)

#: why nn.EmbeddingBag(scale_grad_by_freq=True) is left out
BAG_FREQ = (
    "EmbeddingBag(scale_grad_by_freq=True): torch's backward divides rows by counts that are not "
    "their counts in the batch (for the bag [5, 4, 4, 7] and unit output gradients the rows of 4, 5 "
    "and 7 get 1, 1/2 and 1), which the engine cannot reproduce per sample. Per-sample statistics "
    "are skipped; nn.Embedding with scale_grad_by_freq followed by a sum or mean over the bag is served."
)


#: nn.EmbeddingBag's forward signature, read once (EmbeddingBagHandler.capture binds every call to it)
_BAG_FORWARD = inspect.signature(nn.EmbeddingBag.forward)


class EmbeddingBagHandler(Handler):
    """nn.EmbeddingBag: bag i is example i. Example i's gradient has, at the row of each element j of its
    bag, c_j e_i, with e_i the bag's output gradient and c_j the element's weight in the bag (its per-sample
    weight in a sum, 1/n_i in a mean over the bag's n_i elements other than padding_idx, 0 for padding_idx).
    In mode "max" the element's row gets e_i where it holds the bag's maximum (the argmax torch's backward
    uses, ``torch.embedding_bag``'s fourth output: ties go to one row, as there), once per row and bag.
    Bags as rows of a (B, n) input or as a flat input with offsets (``include_last_offset`` either way,
    empty bags too): :class:`BagView`."""

    SERVES = frozenset({"weight"})

    def check(self) -> None:
        if self.module.scale_grad_by_freq:
            raise PerSampleUndefined(BAG_FREQ)

    def capture(self, args, kwargs, output):
        bound = _BAG_FORWARD.bind(self.module, *args, **kwargs).arguments
        detach = lambda t: t.detach() if torch.is_tensor(t) else t  # noqa: E731
        return detach(bound["input"]), detach(bound.get("offsets")), detach(bound.get("per_sample_weights"))

    def ambiguous(self, args, kwargs, output, batch):
        return False  # (the bags are the rows of the output)

    def view(self, captures, grads, batch, inv_scale):
        m = self.module
        vs, bs, rows = [], [], []
        for (inp, offsets, weights), (go,) in zip(captures, grads, strict=True):
            if go is None:
                continue
            if go.shape[0] != batch:
                raise LayerLeftOut(
                    f"EmbeddingBag made {go.shape[0]} bags for a batch of {batch} examples: the engine takes bag i "
                    "to be example i's. Per-sample statistics leave out its weight."
                )
            if inp.dim() == 2:  # (B, n): bag i is row i
                v = inp.reshape(-1)
                b = torch.arange(inp.shape[0], device=inp.device).repeat_interleave(inp.shape[1])
            else:  # flat, with offsets: bag i holds input[offsets[i]:offsets[i + 1]]
                starts = offsets[: go.shape[0]]
                v = inp
                b = torch.searchsorted(starts, torch.arange(inp.numel(), device=inp.device), right=True) - 1
            vs.append(v)
            bs.append(b)
            if m.mode == "max":
                rows.append(self._max_rows(inp, offsets, v, b).to(go.dtype) * _scaled(go, inv_scale)[b])
                continue
            # the elements a bag counts (padding_idx is not), each with its weight in the bag
            kept = (v != m.padding_idx).to(go.dtype) if m.padding_idx is not None else go.new_ones(v.shape)
            c = kept if weights is None else kept * weights.reshape(-1).to(go.dtype)
            if m.mode == "mean":
                c = c / go.new_zeros(batch).index_add_(0, b, kept).clamp(min=1.0)[b]
            rows.append(c.unsqueeze(1) * _scaled(go, inv_scale)[b])
        if not vs:
            return MaterialisedView({})
        return BagView(torch.cat(vs), torch.cat(bs), torch.cat(rows), batch, self.names["weight"], m.num_embeddings)

    def _max_rows(
        self, inp: torch.Tensor, offsets: torch.Tensor | None, v: torch.Tensor, b: torch.Tensor
    ) -> torch.Tensor:
        """Mode "max": (N, d) masks, element j's true where its row v_j is the argmax of bag b_j in that
        dimension, for the first element of its bag that looks up that row (a row twice in a bag gets the
        gradient once) and never for padding_idx."""
        m = self.module
        if inp.dim() == 2:  # (B, n) bags: as the flat input torch makes of them
            offsets = torch.arange(0, inp.numel(), inp.shape[1], device=inp.device)
        argmax = torch.embedding_bag(
            m.weight.detach(), inp.reshape(-1), offsets, False, 2, False, None, m.include_last_offset, m.padding_idx
        )[3]
        hit = argmax[b] == v.unsqueeze(1)
        key = b * m.num_embeddings + v
        _, inverse = torch.unique(key, return_inverse=True)
        at = torch.arange(key.numel(), device=key.device)
        first = torch.full_like(key, key.numel()).scatter_reduce_(0, inverse, at, "amin")[inverse] == at
        if m.padding_idx is not None:
            first &= v != m.padding_idx
        return hit & first.unsqueeze(1)


class NormHandler(Handler):
    """Affine normalisations: per-sample grads of the gain and bias are (B, C) or (B, *shape): cheap."""

    SERVES = frozenset({"weight", "bias"})

    def ambiguous(self, args, kwargs, output, batch):
        m = self.module
        return isinstance(m, nn.LayerNorm) and _leading_ambiguous(args, batch, len(m.normalized_shape))

    def check(self) -> None:
        m = self.module
        if isinstance(m, BatchNormBase) and (m.training or m.running_mean is None):
            raise PerSampleUndefined(
                f"{type(m).__name__} normalises with statistics of the whole batch in train mode, which "
                "couples the samples: per-sample gradients have no single definition. Per-sample "
                "statistics are skipped while it is in train mode; use GroupNorm/LayerNorm, or freeze "
                "the BatchNorm (module.eval()) to get them.",
                couples=True,
            )

    def _normalised(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        m = self.module
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, None, None, m.eps), len(m.normalized_shape)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, None, None, m.eps), -1
        if isinstance(m, BatchNormBase):
            shape = (1, -1) + (1,) * (x.dim() - 2)
            xhat = (x - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps)
            return xhat, -1
        if isinstance(m, InstanceNormBase):
            use_input = m.training or not m.track_running_stats
            rm = None if use_input else m.running_mean
            rv = None if use_input else m.running_var
            return F.instance_norm(x, rm, rv, None, None, use_input, 0.0, m.eps), -1
        raise TypeError(type(m))

    def view(self, captures, grads, batch, inv_scale):
        out: dict[str, torch.Tensor] = {}
        for k, (x, (go,)) in enumerate(zip(captures, grads, strict=True)):
            if go is None:
                continue
            xhat, n_feat = self._normalised(x)
            e = go  # (unscaled: the factor goes on the (B, C) rows, not on a copy of e)
            if n_feat == -1:  # channel axis 1, sample axis 0 (B k rows: examples flattened with positions)
                rows = x.shape[0]
                if rows != batch and (rows % batch or self._input_axis(k) != 0):
                    raise ValueError(f"norm input has batch {rows}, loss has batch {batch}")
                gw = (e * xhat).reshape(batch, rows // batch, x.shape[1], -1).sum((1, 3))
                gb = e.reshape(batch, rows // batch, x.shape[1], -1).sum((1, 3))
            else:
                xs, axis = _feature_first_samples(xhat, batch, n_feat, self._input_axis(k))
                es = _same_layout(e, batch, axis, n_feat)
                gw, gb = (es * xs).sum(1), es.sum(1)
            for role, g in (("weight", gw), ("bias", gb)):
                if role in self.names:
                    n, g = self.names[role], _scaled(g, inv_scale)
                    out[n] = out[n] + g if n in out else g
        return MaterialisedView(out)


@contextlib.contextmanager
def _without_cudnn(module: nn.Module):
    """cuDNN off while an RNN on a CUDA device is replayed per sample: torch.func cannot differentiate
    cuDNN's fused RNN (it reads the weights' data pointers, which torch.func's wrapped tensors do not
    have: "Cannot access data pointer of Tensor that doesn't have storage"); PyTorch's own CUDA kernels
    compute the same function. Nothing changes for any other module or device."""
    backends = torch.backends.cudnn
    if not (isinstance(module, nn.RNNBase) and backends.enabled and any(p.is_cuda for p in module.parameters())):
        yield
        return
    backends.enabled = False
    try:
        yield
    finally:
        backends.enabled = True


@contextlib.contextmanager
def _own_hooks_off(module: nn.Module):
    """The module's own hooks off while it is replayed per sample: the engine pairs the module's own output
    (taken before the user's forward hooks, which may replace it: ``out * 2``) with its inputs as its forward
    received them (after the user's pre-hooks), so the replay is the bare forward; and a hook of the user's
    (logging, a gradient hook) must not run on torch.func's tensors. Kept: the older ``weight_norm`` and
    ``spectral_norm`` pre-hooks, which compute the weight the forward uses from the replayed originals.
    The hooks of the module's children stay: they are part of its forward."""
    from cockpit_lite.persample.parametrized import WEIGHT_HOOKS

    saved = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    if not any(saved):
        yield
        return
    module._forward_hooks = OrderedDict()
    module._forward_pre_hooks = OrderedDict((k, h) for k, h in saved[1].items() if isinstance(h, WEIGHT_HOOKS))
    module._backward_hooks, module._backward_pre_hooks = OrderedDict(), OrderedDict()
    try:
        yield
    finally:
        module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks = saved


def _rows_made_inside(present: list, arg_dims, kw_dims, batch: int) -> bool:
    """Whether a call's output gradients hold B k rows on their first axis (k > 1) while its tensor inputs
    carry the examples on an axis of their own: the module flattened its examples' positions itself, in
    example order if it reshaped a batch-first tensor (checked by the replay: :meth:`FuncHandler._rows_view`)."""
    dims = [d for d in tree_flatten((arg_dims, kw_dims))[0] if d is not None]
    return bool(dims) and all(g.dim() >= 1 and g.shape[0] > batch and g.shape[0] % batch == 0 for _, g in present)


class FuncHandler(Handler):
    """Any other module with parameters: per-sample gradients of this module alone by torch.func.

    The module's forward is recomputed per sample (vmap over grad of <output, output gradient>) inside
    a forked RNG, so the user's random stream is untouched. Its per-sample gradients (B x D_module) are
    materialised for this module only.
    """

    def check(self) -> None:
        m = self.module
        if isinstance(m, nn.EmbeddingBag) and m.scale_grad_by_freq:
            raise PerSampleUndefined(BAG_FREQ)
        if m.training and isinstance(m, nn.RNNBase) and m.dropout > 0 and m.num_layers > 1:
            raise PerSampleUndefined(
                f"{type(m).__name__} with dropout={m.dropout} between its {m.num_layers} layers in train mode draws "
                "its dropout masks inside one fused call, which cannot be redrawn per sample. Per-sample statistics "
                "leave out its parameters on such steps; set its dropout to 0 (an nn.Dropout module between "
                "single-layer RNNs is served) or track it in eval mode."
            )
        if m.training and isinstance(m, nn.MultiheadAttention) and m.dropout > 0:
            raise PerSampleUndefined(
                "MultiheadAttention with dropout > 0 in train mode draws its attention dropout mask inside "
                "one fused call, which cannot be replayed per sample. Per-sample statistics are skipped "
                "for such steps; set the attention's dropout to 0.0 (dropout modules elsewhere are fine)."
            )

    def capture(self, args, kwargs, output):
        if args and isinstance(args[0], nn.utils.rnn.PackedSequence):
            if not isinstance(self.module, nn.RNNBase) or any(
                isinstance(a, nn.utils.rnn.PackedSequence) for a in (*args[1:], *kwargs.values())
            ):
                raise PerSampleUndefined(
                    f"{type(self.module).__name__} called on a PackedSequence: the per-sample replay unpacks the "
                    "input of an RNN only. Per-sample statistics leave out its parameters."
                )
            packed, rest = args[0], tree_map(lambda t: t.detach() if torch.is_tensor(t) else t, (args[1:], kwargs))
            # (the packing's order tensors as they are: a PackedSequence is rebuilt from its four fields)
            return (nn.utils.rnn.PackedSequence(packed.data.detach(), *packed[1:]), *rest[0]), rest[1]
        if isinstance(self.module, nn.EmbeddingBag) and args and torch.is_tensor(args[0]) and args[0].dim() == 1:
            raise PerSampleUndefined(
                f"{type(self.module).__name__} (an EmbeddingBag with a forward of its own, replayed by torch.func) on "
                "a flat input with offsets: the per-sample replay takes one bag per row of a (B, n) input. Per-sample "
                "statistics leave out its weight; pass the bags as a (B, n) tensor (padding_idx for shorter bags) to "
                "have it counted (nn.EmbeddingBag itself is served either way)."
            )
        detach = lambda t: t.detach() if torch.is_tensor(t) else t  # noqa: E731
        return tree_map(detach, args), tree_map(detach, kwargs)

    def _warn_loop(self, error: Exception) -> None:
        if not getattr(self, "_looping", False):
            self._looping = True
            warnings.warn(
                f"cockpit-lite: torch.func.vmap cannot batch {type(self.module).__name__} ({error}); its "
                "per-sample gradients come from a loop over the samples (exact, slower)",
                CockpitWarning,
                stacklevel=2,
            )

    def _bdim(self, t, batch: int):
        if not torch.is_tensor(t) or t.dim() == 0:
            return None
        if getattr(self.module, "batch_first", True) is False and t.dim() >= 2 and t.shape[1] == batch:
            return 1
        if t.shape[0] == batch:
            return 0
        return None

    def _input_dims(self, args: tuple, kwargs: dict, batch: int, resolved: SampleAxes | None = None):
        """The batch axis of every tensor argument (None: shared by all samples), as pytrees like args
        and kwargs. Axes the engine's shape probe ``resolved`` come first; else RNNs and attention by
        their documented layouts: the input by ``batch_first``, an RNN's hidden state on axis 1,
        attention's key_padding_mask on axis 0, its attn_mask shared; any other module's tensors by the
        first axis of size B (axis 1 first where ``batch_first=False``)."""
        m = self.module
        if resolved is not None:
            leaves = iter(resolved.inputs)
            dims = tree_map(lambda _: next(leaves), (args, kwargs))
            return dims[0], dims[1]
        if not isinstance(m, (nn.RNNBase, nn.MultiheadAttention)):
            dims = lambda t: self._bdim(t, batch)  # noqa: E731
            return tree_map(dims, args), tree_map(dims, kwargs)
        first = 0 if m.batch_first else 1
        if isinstance(m, nn.RNNBase):
            axes = {"input": first, "hx": 1}
        else:
            axes = {"query": first, "key": first, "value": first, "key_padding_mask": 0}
        names = list(inspect.signature(m.forward).parameters)

        def dims(name: str):
            axis = axes.get(name)

            def dim(t):
                if axis is None or not torch.is_tensor(t) or t.dim() <= axis or t.shape[axis] != batch:
                    return None
                return axis

            return dim

        arg_dims = tuple(tree_map(dims(names[k] if k < len(names) else ""), a) for k, a in enumerate(args))
        return arg_dims, {k: tree_map(dims(k), v) for k, v in kwargs.items()}

    def _output_dim(self, position: int, g: torch.Tensor, batch: int, resolved: SampleAxes | None = None) -> int | None:
        """The batch axis of the gradient of the module's ``position``-th tensor output."""
        m = self.module
        if resolved is not None and position < len(resolved.outputs):
            axis = resolved.outputs[position]
            return axis if axis is not None and g.dim() > axis and g.shape[axis] == batch else None
        if not isinstance(m, (nn.RNNBase, nn.MultiheadAttention)):
            return self._bdim(g, batch)
        # RNN: output by batch_first, then h_n (and c_n) on axis 1; attention: output, then its weights on axis 0
        axis = (0 if m.batch_first else 1) if position == 0 else 1 if isinstance(m, nn.RNNBase) else 0
        return axis if g.dim() > axis and g.shape[axis] == batch else None

    def view(self, captures, grads, batch, inv_scale):
        m = self.module
        # tensors a forward pre-hook sets as plain attributes (the older weight_norm's and spectral_norm's
        # weight): the replay's (torch.func's wrapped tensors) must not outlive it, the user's forward's stay
        kept = [(k, v) for k, v in m.__dict__.items() if isinstance(v, torch.Tensor)]
        try:
            with _without_cudnn(m), _own_hooks_off(m):
                return self._view(captures, grads, batch, inv_scale)
        finally:
            m.__dict__.update(kept)

    def _view(self, captures, grads, batch, inv_scale):
        from torch.func import functional_call, grad, vmap

        m = self.module
        # copies: a forward that renormalises its weight in place (max_norm) must not touch the model's
        params = {n: p.detach().clone() for n, p in m.named_parameters() if n in self.names}
        frozen = {n: p.detach() for n, p in m.named_parameters() if n not in self.names}
        buffers = dict(m.named_buffers())
        total: dict[str, torch.Tensor] = {}

        def add(per: dict[str, torch.Tensor]) -> None:  # one call's (B, *shape) per parameter: calls add up
            for n, g in per.items():
                full = self.names[n]
                total[full] = total[full] + g if full in total else g

        for k, ((args, kwargs), gouts) in enumerate(zip(captures, grads, strict=True)):
            if args and isinstance(args[0], nn.utils.rnn.PackedSequence):
                add(_packed_grads(m, args, kwargs, gouts, batch, inv_scale, params, {**frozen, **buffers}))
                continue
            resolved = self.sample_axes.get(k)
            arg_dims, kw_dims = self._input_dims(args, kwargs, batch, resolved)
            leaves = zip(tree_flatten((args, kwargs))[0], tree_flatten((arg_dims, kw_dims))[0], strict=False)
            if any(d is not None and torch.is_tensor(t) and t.shape[d] != batch for t, d in leaves):
                # (B k rows, examples flattened with their positions: see _changed_axis)
                add(self._rows_view(args, kwargs, arg_dims, kw_dims, gouts, batch, inv_scale, resolved, params, frozen))
                continue
            present = [(i, g) for i, g in enumerate(gouts) if g is not None]
            g_dims = [self._output_dim(i, g, batch, resolved) for i, g in present]
            inside = resolved is None and any(d is None for d in g_dims)
            if inside and _rows_made_inside(present, arg_dims, kw_dims, batch):
                # (B, T, d) in, (B T, n) out: the module flattens its examples' positions itself (DeepSeek-V3's
                # router): each example's rows replayed alone, checked against the call's own
                add(self._rows_view(args, kwargs, arg_dims, kw_dims, gouts, batch, inv_scale, None, params, frozen))
                continue
            live = [(i, g * inv_scale) for i, g in present]  # (scaled once the route is known)
            g_tensors = [g for _, g in live]
            if any(d is None for d in g_dims):
                raise ValueError(f"cannot find the batch axis in the output gradient of {type(m).__name__}")
            positions = [i for i, _ in live]

            def inner(p, a, kw, gs, row, a_dims=arg_dims, k_dims=kw_dims, o_dims=g_dims, pos=positions):
                a = tuple(_expand(x, d) for x, d in zip(a, a_dims, strict=True))
                kw = {k: _expand(v, k_dims[k]) for k, v in kw.items()}
                out = functional_call(m, {**p, **frozen, **buffers}, a, kw)
                outs = [o for o in tree_flatten(out)[0] if torch.is_tensor(o)]
                s = 0.0
                for j, gj, dj in zip(pos, gs, o_dims, strict=True):
                    o = outs[j]
                    if o.shape[dj] == batch != 1:  # the batch axis made inside (param.expand(batch_size, ...)):
                        o = o.index_select(dj, row)  # the example's own row of it, not all B
                    s = s + (o * gj.unsqueeze(dj)).sum()
                return s

            devices = cuda_devices(params.values())
            with torch.random.fork_rng(devices=devices), torch.enable_grad(), warnings.catch_warnings():
                # vmap falls back to a loop for fused attention kernels: correct, only slower
                warnings.filterwarnings("ignore", message="There is a performance drop")
                try:
                    rows_of = torch.arange(batch, device=g_tensors[0].device).unsqueeze(1)  # (each example's row)
                    per = vmap(grad(inner), in_dims=(None, arg_dims, kw_dims, g_dims, 0))(
                        params, args, kwargs, g_tensors, rows_of
                    )
                except RuntimeError as e:  # an op vmap cannot batch (GRU's in-place state update): loop
                    if "setup_context" in str(e):  # (torch.func refuses such a Function in any form)
                        raise LayerLeftOut(
                            f"{type(m).__name__} calls a custom torch.autograd.Function without a setup_context "
                            "staticmethod, which torch.func cannot differentiate per sample (give the Function "
                            "setup_context, docs.pytorch.org 'Extending torch.func with autograd.Function'). "
                            "Per-sample statistics leave out its parameters."
                        ) from e
                    if "random operation" in str(e):  # a loop would draw other random numbers than the step did
                        raise LayerLeftOut(
                            f"{type(m).__name__} draws random numbers in its forward (stochastic depth / drop_path, "
                            "a functional dropout): a per-sample recomputation would draw others than the step "
                            "did. Per-sample statistics leave out its parameters on such steps (in eval mode, or "
                            "with that randomness off, they are served)."
                        ) from e
                    rows = [
                        grad(inner)(
                            params,
                            tuple(_select(x, d, i) for x, d in zip(args, arg_dims, strict=True)),
                            {k: _select(v, kw_dims[k], i) for k, v in kwargs.items()},
                            [_select(g, d, i) for g, d in zip(g_tensors, g_dims, strict=True)],
                            torch.tensor([i], device=g_tensors[0].device),
                        )
                        for i in range(batch)
                    ]
                    per = {n: torch.stack([r[n] for r in rows]) for n in rows[0]}
                    self._warn_loop(e)
            add(per)
        return MaterialisedView(total)

    def _rows_view(self, args, kwargs, arg_dims, kw_dims, gouts, batch, inv_scale, resolved, params, frozen):
        """A call whose examples are flattened with their positions along an axis of its tensors (B k rows, in
        example order: the engine's shape probe checked the first argument's): each example's k rows replayed
        alone, as the call had them (a router or the experts of a mixture of experts on (B T, d) tokens).
        Exact only for a module that computes its rows example by example, which is checked: the replays'
        outputs must be the call's rows (one more forward of the module on the whole call); a module that
        mixes rows of several examples (a normalisation over all of them, an expert capacity over the batch)
        is left out with that reason."""
        from torch.func import functional_call, grad, vmap

        m = self.module
        # (copies: a forward that updates its buffers in place must leave the model's)
        state = {**frozen, **{n: b.clone() for n, b in m.named_buffers()}}

        groups = resolved.groups if resolved is not None else 1

        def split(t, d):  # (..., B k, ...) -> (..., B, k, ...); grouped rows (G, B, k / G) -> each example's G k / G
            if d is None or not torch.is_tensor(t):
                return t
            if t.shape[d] % (batch * groups):
                raise LayerLeftOut(
                    f"{type(m).__name__}: an argument {tuple(t.shape)} does not hold {batch} examples' rows"
                )
            if groups == 1:
                return t.unflatten(d, (batch, t.shape[d] // batch))
            return t.unflatten(d, (groups, batch, -1)).movedim(d + 1, d).flatten(d + 1, d + 2)

        s_args = tuple(tree_map(split, a, d) for a, d in zip(args, arg_dims, strict=True))
        s_kwargs = {k: tree_map(split, v, kw_dims[k]) for k, v in kwargs.items()}
        live = [(i, g * inv_scale) for i, g in enumerate(gouts) if g is not None]
        if resolved is None:  # (rows made inside the module: :func:`_rows_made_inside`, on the first axis)
            g_dims = [0] * len(live)
        else:
            g_dims = [resolved.outputs[i] if i < len(resolved.outputs) else None for i, _ in live]
        if any(d is None or g.shape[d] % batch for (_, g), d in zip(live, g_dims, strict=True)):
            raise LayerLeftOut(f"cannot find the rows of the examples in the output gradient of {type(m).__name__}")
        g_split = [split(g, d) for (_, g), d in zip(live, g_dims, strict=True)]
        positions = [i for i, _ in live]

        def inner(p, a, kw, gs):
            outs = [o for o in tree_flatten(functional_call(m, {**p, **state}, a, kw))[0] if torch.is_tensor(o)]
            s = sum((outs[j] * g).sum() for j, g in zip(positions, gs, strict=True))
            return s, tuple(outs[j].detach() for j in positions)

        devices = cuda_devices(params.values())
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="There is a performance drop")
            try:
                if getattr(self, "_rows_loop", False):  # (vmap failed on an earlier step: straight to the loop)
                    raise RuntimeError("a loop")
                per, rows = vmap(grad(inner, has_aux=True), in_dims=(None, arg_dims, kw_dims, g_dims))(
                    params, s_args, s_kwargs, g_split
                )
                rows = [r.movedim(0, d) for r, d in zip(rows, g_dims, strict=True)]
            except RuntimeError as e:  # data-dependent control flow (experts picked by the router): a loop
                if "random operation" in str(e):
                    raise LayerLeftOut(
                        f"{type(m).__name__} draws random numbers in its forward (a router's jitter, dropout): a "
                        "replay of each example's rows would draw others than the step did. Per-sample statistics "
                        "leave out its parameters on such steps (in eval mode, or with that randomness off, they "
                        "are served)."
                    ) from e
                if "setup_context" in str(e):
                    raise LayerLeftOut(f"{type(m).__name__} cannot be replayed per example by torch.func ({e})") from e
                if not getattr(self, "_rows_loop", False):
                    self._rows_loop = True
                    self._warn_loop(e)
                each = [
                    grad(inner, has_aux=True)(
                        params,
                        tuple(_select(x, d, i) for x, d in zip(s_args, arg_dims, strict=True)),
                        {k: _select(v, kw_dims[k], i) for k, v in s_kwargs.items()},
                        [g.select(d, i) for g, d in zip(g_split, g_dims, strict=True)],
                    )
                    for i in range(batch)
                ]
                per = {n: torch.stack([g[n] for g, _ in each]) for n in each[0][0]}
                rows = [torch.stack([r[j] for _, r in each], d) for j, d in enumerate(g_dims)]
            with torch.no_grad():
                copies = {n: t.clone() for n, t in state.items()}
                whole = [
                    o
                    for o in tree_flatten(functional_call(m, {**params, **copies}, args, kwargs))[0]
                    if torch.is_tensor(o)
                ]
        # the replays' rows against the call's: decided on the host with the step's values (take_checks)
        checks = self.__dict__.setdefault("_rows_checks", [])
        for j, r, d in zip(positions, rows, g_dims, strict=True):
            if groups > 1:  # (each example's G k / G rows back to the call's (G, B, k / G) layout)
                r = r.unflatten(d + 1, (groups, -1)).movedim(d + 1, d).flatten(d + 1, d + 2)
            full, mine = whole[j].detach(), r.flatten(d, d + 1)
            if mine.shape != full.shape:
                raise LayerLeftOut(f"{type(m).__name__}: {ROWS_MIXED}")
            if full.numel():
                checks.append(torch.stack([(mine - full).abs().max(), full.abs().max()]).double())
        return per

    def take_checks(self) -> list[DeferredCheck]:
        """That the rows of several examples replayed one example at a time (:meth:`_rows_view`) gave the
        call's own rows; if not, the step's per-sample statistics are left out and, from the next step on,
        this module's parameters."""
        pairs, self._rows_checks = self.__dict__.get("_rows_checks", []), []
        if not pairs:
            return []
        name = type(self.module).__name__

        def verdict(host: np.ndarray) -> str | None:
            err, scale = host.reshape(-1, 2).T
            if (err <= 1e-4 * scale).all():
                return None
            names = ", ".join(self.names.values())
            return f"{name} ({names}): {ROWS_MIXED}; this step's per-sample statistics are skipped"

        def on_fail() -> None:
            self.refused = f"{name}: {ROWS_MIXED}"

        return [DeferredCheck(torch.cat([p.to(pairs[0].device) for p in pairs]), verdict, None, on_fail)]


def _packed_grads(
    m: nn.Module, args: tuple, kwargs: dict, gouts, batch: int, inv_scale: float, params: dict, fixed: dict
) -> dict[str, torch.Tensor]:
    """Per-sample gradients of an RNN called on a PackedSequence: each sequence unpacked to its own
    length and run alone (what packing means: no step of it sees padding), with its rows of the output
    gradients (the packed output's, unpacked in the batch's order, and h_n's / c_n's column), one
    ``torch.func.grad`` per sequence: exact, B calls."""
    from torch.func import functional_call, grad
    from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

    packed = args[0]
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    x, lengths = pad_packed_sequence(packed, batch_first=True)  # (B, T, d) in the batch's order
    if x.shape[0] != batch:
        raise ValueError(f"a PackedSequence of {x.shape[0]} sequences in a batch of {batch} examples")
    gs = [None if g is None else g * inv_scale for g in gouts]  # (packed output data, h_n[, c_n])
    g_seq = None
    if gs and gs[0] is not None:
        g_seq = pad_packed_sequence(PackedSequence(gs[0], *packed[1:]), batch_first=True)[0]
    g_state = gs[1:]

    def inner(p, xi, hxi, gi, gsi):
        out, state = functional_call(m, {**p, **fixed}, (xi,) if hxi is None else (xi, hxi))
        s = (out * gi).sum() if gi is not None else out.sum() * 0.0
        for st, g in zip(state if isinstance(state, tuple) else (state,), gsi, strict=False):
            if g is not None:
                s = s + (st * g).sum()
        return s

    def seq(t: torch.Tensor, i: int, n: int) -> torch.Tensor:  # sequence i's first n steps, in the RNN's layout
        return t[i : i + 1, :n] if m.batch_first else t[i : i + 1, :n].transpose(0, 1)

    rows = []
    for i, n in enumerate(lengths.tolist()):  # (the lengths are on the CPU, as PackedSequence keeps them)
        hxi = tree_map(lambda t, i=i: t[:, i : i + 1], hx) if hx is not None else None
        gsi = [None if g is None else g[:, i : i + 1] for g in g_state]
        rows.append(grad(inner)(params, seq(x, i, n), hxi, seq(g_seq, i, n) if g_seq is not None else None, gsi))
    return {n: torch.stack([r[n] for r in rows]) for n in rows[0]}


def _expand(x, d):
    """x (a tensor or a pytree of them, like an LSTM's (h, c)) with each batch axis d restored, size 1."""
    return tree_map(lambda t, a: t.unsqueeze(a) if a is not None and torch.is_tensor(t) else t, x, d)


def _select(x, d, i: int):
    """Sample i of x (a tensor or a pytree of them) along each batch axis d."""
    return tree_map(lambda t, a: t.select(a, i) if a is not None and torch.is_tensor(t) else t, x, d)


# --- nn.MultiheadAttention: its projections in factor form, exact with attention dropout -------------
def _same_values(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Whether ``a`` and ``b`` hold the same numbers, NaN at the same places (a 0-dim bool tensor)."""
    return ((a == b) | (a.isnan() & b.isnan())).all()


class _NotReplayable(Exception):
    """The attention call cannot be replayed with its projections made explicit."""


@dataclass(eq=False)
class _Snapshot:
    """What held just before an attention call: the random state its dropout draws from (kept only
    when it draws) and the autocast setting of the input's device."""

    device_type: str
    autocast: bool
    autocast_dtype: torch.dtype | None
    cpu_rng: torch.Tensor | None = None
    #: (device index, state) of the CUDA generator when the call runs on CUDA
    cuda_rng: tuple[int, torch.Tensor] | None = None
    #: the random state of this device type cannot be saved (an accelerator other than CUDA)
    unsupported: bool = False
    #: the scaled-dot-product-attention backends enabled, in priority order: the backend, and with it
    #: how many random numbers the dropout draws, must be the one of the call (``sdpa_kernel`` around
    #: the forward only, say)
    sdpa: list = field(default_factory=list)


@dataclass(eq=False)
class _AttentionCall:
    args: tuple
    kwargs: dict
    #: ids of the detached inputs whose originals required grad
    requires_grad: frozenset[int]
    #: the call's tensor outputs that required grad (detached; the engine's output gradients follow them)
    outputs: list[torch.Tensor]
    versions: list[int]
    snapshot: _Snapshot | None
    random: bool


@dataclass(eq=False)
class _Part:
    """One ``F.linear`` of a replay: the rows of a parameter it used (local name, first row, rows) for
    its weight and bias, its input a (B, T, i) and the output gradient e (B, T, o) of the losses."""

    weight: tuple[str, int, int] | None
    bias: tuple[str, int, int] | None
    a: torch.Tensor
    e: torch.Tensor


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    return next((t for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)), None)


def _snapshot(x: torch.Tensor | None, random: bool) -> _Snapshot:
    device = x.device if x is not None else torch.device("cpu")
    try:
        on = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if on else None
    except (TypeError, RuntimeError):  # a device type autocast does not know
        on, dtype = False, None
    snap = _Snapshot(device.type, on, dtype, sdpa=sdpa_backends())
    if random:
        snap.cpu_rng = torch.get_rng_state()
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            snap.cuda_rng = (index, torch.cuda.get_rng_state(index))
        elif device.type != "cpu":
            snap.unsupported = True
    return snap


def _locate(t: torch.Tensor | None, params: dict[str, torch.Tensor]) -> tuple[str, int, int] | None:
    """(local name, first row, rows) of the parameter whose rows ``t`` is (the packed in-projection
    is split into views of ``in_proj_weight``), or None."""
    if t is None:
        return None
    for name, p in params.items():
        if p.device != t.device or p.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
            continue
        if t.dim() != p.dim() or t.shape[1:] != p.shape[1:] or t.stride() != p.stride():
            continue
        offset = t.storage_offset() - p.storage_offset()
        step = p.stride(0) if p.dim() > 0 else 1
        if offset % step == 0 and 0 <= offset // step and offset // step + t.shape[0] <= p.shape[0]:
            return name, offset // step, t.shape[0]
    return None


class _ProjectionRecorder(TorchFunctionMode):
    """Active only during a replay: runs ``F.multi_head_attention_forward`` with its inner ops visible
    (:func:`~cockpit_lite.compat.unguarded`) and records every ``F.linear`` (input, weight, bias,
    output) and every ``Tensor.repeat`` of one of the module's parameters (``bias_k``, ``bias_v``)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.params = {id(p): n for n, p in module.named_parameters()}
        self.linears: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        self.repeats: list[tuple[str, torch.Tensor]] = []
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            self.calls += 1
            with self:
                return unguarded(func)(*args, **kwargs)
        out = func(*args, **kwargs)
        if func is F.linear:
            x = args[0] if args else kwargs["input"]
            w = args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            self.linears.append((x, w, b, out))
        elif func is torch.Tensor.repeat and args and id(args[0]) in self.params:
            self.repeats.append((self.params[id(args[0])], out))
        return out


def _per_sample(t: torch.Tensor, n: int) -> torch.Tensor:
    """(T, N, d) or (T N, d) (positions first, as inside ``F.multi_head_attention_forward``) -> (N, T, d)."""
    if (t.dim() == 3 and t.shape[1] != n) or t.dim() not in (2, 3) or t.shape[:-1].numel() % n:
        raise _NotReplayable(f"a projection of shape {tuple(t.shape)} has no batch axis of size {n}")
    return t.reshape(-1, n, t.shape[-1]).transpose(0, 1)


def _pad_positions(x: torch.Tensor, t: int) -> torch.Tensor:
    return x if x.shape[1] == t else F.pad(x, (0, 0, 0, t - x.shape[1]))


class AttentionHandler(FuncHandler):
    """``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer``/``DecoderLayer``), in any
    mode, attention dropout in train mode included.

    The module's forward is fused: its projections are ``F.linear`` calls on slices of its parameters
    that no module hook sees, and its attention-dropout mask is drawn inside. At backward the call is
    replayed once on the whole batch: the random state saved by a forward pre-hook (only when the
    dropout draws: train mode, ``dropout > 0``; CPU, and CUDA for a module on CUDA) is restored inside
    ``torch.random.fork_rng``, so the same mask is drawn and the user's stream is untouched, and a
    ``TorchFunctionMode`` active only during the replay records every projection ``z = W a + b``
    (packed or separate q/k/v, the out-projection). One ``autograd.grad`` of <replay output, captured
    output gradient> with respect to the projections' outputs gives each projection's output gradient
    e; (a, e) are Linear factor pairs, so

        g_i(W) = sum_t e_it a_it^T,   g_i(b) = sum_t e_it

    (the rows of ``in_proj_weight`` used by the q, k and v projections are the groups of one
    :class:`FactorView` when they see different inputs), and ``bias_k``/``bias_v`` get sample i's
    column of the gradient of their ``repeat`` over the batch. The replay must reproduce the captured
    output bit for bit (the same mask was drawn); a call that cannot be replayed is served by
    :class:`FuncHandler` when nothing in it is random, and gives no numbers for the step otherwise.
    """

    def __init__(self, module: nn.Module, names: dict[str, str]):
        super().__init__(module, names)
        self._pending: _Snapshot | None = None
        #: per replayed call of the last view: 1 where the replay reproduced the call bit for bit and its
        #: out-projection is laid out as read (decided on the host: :meth:`take_checks`)
        self._same: list[torch.Tensor] = []
        self._random_calls = False
        #: why replays stopped being taken (a replay that did not reproduce its call): calls without
        #: randomness are served by :class:`FuncHandler` from then on, random ones give no numbers
        self.no_replay: str | None = None

    def take_checks(self) -> list[DeferredCheck]:
        same, self._same = self._same, []
        if not same:
            return []
        random = self._random_calls

        def verdict(host: np.ndarray) -> str | None:
            if (host > 0.5).all():
                return None
            return (
                f"the replay of {type(self.module).__name__} ({', '.join(self.names.values())}) gave another output "
                "than its call"
                + (
                    " (something drew random numbers between the call's forward pre-hooks and its dropout, or a "
                    "forward hook changed its output)"
                    if random
                    else " (a forward hook changed its output, or a kernel is not deterministic)"
                )
                + ": per-sample statistics are skipped for this step; from the next step on its calls are "
                + ("served without a replay" if not random else "left out (their dropout mask cannot be redrawn)")
            )

        def on_fail() -> None:
            self.no_replay = (
                "an earlier replay gave another output than its call (a random draw between the call's forward "
                "pre-hooks and its dropout, a forward hook that changes its output, or a kernel that is not "
                "deterministic)"
            )

        return [DeferredCheck(torch.stack(same).float(), verdict, None, on_fail)]

    def _random(self) -> bool:
        m = self.module
        return bool(m.training and m.dropout > 0)

    def ambiguous(self, args, kwargs, output, batch):
        return False  # its layout is documented: the batch axis by ``batch_first``

    def check(self) -> None:
        return None

    def pre_forward(self, args, kwargs):
        self._pending = _snapshot(_first_tensor(args, kwargs), self._random())

    def capture(self, args, kwargs, output):
        snapshot, self._pending = self._pending, None
        detached: dict[int, torch.Tensor] = {}
        grad_ids: set[int] = set()

        def detach(t):  # once per tensor: self-attention passes one tensor as query, key and value
            if not torch.is_tensor(t):
                return t
            d = detached.get(id(t))
            if d is None:
                d = detached[id(t)] = t.detach()
                if t.requires_grad:
                    grad_ids.add(id(d))
            return d

        outs = [t.detach() for t in tree_flatten(output)[0] if torch.is_tensor(t) and t.requires_grad]
        return _AttentionCall(
            tree_map(detach, args),
            tree_map(detach, kwargs),
            frozenset(grad_ids),
            outs,
            [tensor_version(t) for t in outs],
            snapshot,
            self._random(),
        )

    def view(self, captures, grads, batch, inv_scale):
        self._same, self._random_calls = [], any(c.random for c in captures)
        try:
            if self.no_replay is not None:
                raise _NotReplayable(self.no_replay)
            return self._replayed_view(captures, grads, batch, inv_scale)
        except _NotReplayable as e:
            self._same = []
            if any(c.random for c in captures):
                raise ValueError(
                    f"{e}; the attention dropout mask of this step cannot be redrawn, so per-sample statistics "
                    "are skipped for it"
                ) from None
        return super().view([(c.args, c.kwargs) for c in captures], grads, batch, inv_scale)

    # --- the replay -----------------------------------------------------------------------------------
    def _batch_size(self, call: _AttentionCall) -> int:
        query = call.args[0] if call.args else call.kwargs["query"]
        if query.dim() == 2:
            return 1
        return query.shape[0] if self.module.batch_first else query.shape[1]

    def _replay(self, call: _AttentionCall, live: list[tuple[int, torch.Tensor]], inv_scale: float):
        """Replay one call; its projections' factor pairs and the per-sample gradients of repeated
        parameters ({local name: (B, *shape)})."""
        m = self.module
        snap = call.snapshot
        if call.random and (snap is None or snap.cpu_rng is None):
            raise _NotReplayable("no random state was saved before the call (was the cockpit attached mid-forward?)")
        if call.random and snap.unsupported:
            raise _NotReplayable(f"the random state of a {snap.device_type} device cannot be saved and restored")
        if any(tensor_version(o) != v for o, v in zip(call.outputs, call.versions, strict=True)):
            raise _NotReplayable("its output was modified in place after the call, so a replay cannot be checked")
        n = self._batch_size(call)
        fresh: dict[int, torch.Tensor] = {}

        def prepare(t):  # the call's own tensors, requiring grad as they did
            if not torch.is_tensor(t):
                return t
            r = fresh.get(id(t))
            if r is None:
                r = fresh[id(t)] = t.detach().requires_grad_() if id(t) in call.requires_grad else t
            return r

        args, kwargs = tree_map(prepare, call.args), tree_map(prepare, call.kwargs)
        rec = _ProjectionRecorder(m)
        devices = [snap.cuda_rng[0]] if snap is not None and snap.cuda_rng is not None else []
        autocast = (
            torch.autocast(snap.device_type, dtype=snap.autocast_dtype)
            if snap is not None and snap.autocast
            else contextlib.nullcontext()
        )
        backends = sdpa_kernel(snap.sdpa, set_priority=True) if snap is not None else contextlib.nullcontext()
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), autocast, backends:
            if call.random:
                torch.set_rng_state(snap.cpu_rng)
                if snap.cuda_rng is not None:
                    torch.cuda.set_rng_state(snap.cuda_rng[1], snap.cuda_rng[0])
            with rec:
                out = m.forward(*args, **kwargs)
            flat = [t for t in tree_flatten(out)[0] if torch.is_tensor(t)]
            outs = [t for t in flat if t.requires_grad]
            if rec.calls != 1 or not rec.linears or len(outs) != len(call.outputs):
                raise _NotReplayable(f"{type(m).__name__}.forward did not run F.multi_head_attention_forward once")
            for r, o in zip(outs, call.outputs, strict=True):
                self._same.append(self._same_output(r.detach(), o))
            self._same.append(self._check_layout(rec, flat[0], n))
            params = dict(m.named_parameters())
            located = [(_locate(w, params), _locate(b, params), x, z) for x, w, b, z in rec.linears]
            wanted = [
                (wl, bl, x, z)
                for wl, bl, x, z in located
                if (wl is not None and wl[0] in self.names) or (bl is not None and bl[0] in self.names)
            ]
            repeats = [(name, r) for name, r in rec.repeats if name in self.names]
            targets = [z for *_, z in wanted] + [r for _, r in repeats]
            if not targets:
                return [], {}
            if not all(t.requires_grad for t in targets):
                raise _NotReplayable("a projection of a trainable parameter does not require grad in the replay")
            gouts = torch.autograd.grad(
                [outs[k] for k, _ in live],
                targets,
                grad_outputs=[g.to(outs[k].dtype) for k, g in live],
                allow_unused=True,
            )
        parts = []
        for (wl, bl, x, z), gz in zip(wanted, gouts, strict=False):
            gz = torch.zeros_like(z) if gz is None else gz
            parts.append(_Part(wl, bl, _per_sample(x.detach(), n), _scaled(_per_sample(gz, n), inv_scale)))
        extra: dict[str, torch.Tensor] = {}
        for (name, r), gr in zip(repeats, gouts[len(wanted) :], strict=True):
            shape = params[name].shape
            if r.dim() != 3 or r.shape[0] != 1 or r.shape[1] != n or r.shape[2:].numel() != shape.numel():
                raise _NotReplayable(f"{name} is repeated over the batch as {tuple(r.shape)}")
            gr = torch.zeros_like(r) if gr is None else gr
            g = _scaled(gr.detach().transpose(0, 1).reshape(n, *shape), inv_scale)
            extra[name] = extra[name] + g if name in extra else g
        return parts, extra

    @staticmethod
    def _same_output(replayed: torch.Tensor, captured: torch.Tensor) -> torch.Tensor:
        """Bit for bit: the same kernels on the same inputs with the same mask give the same numbers, NaN
        where the call had NaN (an overflowing step replays as itself) (a 0-dim bool on the device,
        decided on the host with the step's values)."""
        if replayed.shape != captured.shape or replayed.dtype != captured.dtype:
            raise _NotReplayable("its replay gave an output of another shape or dtype than the call")
        return _same_values(replayed, captured)

    def _check_layout(self, rec: _ProjectionRecorder, output: torch.Tensor, n: int) -> torch.Tensor:
        """The out-projection's rows are (position, sample) pairs as :func:`_per_sample` reads them: its
        output, so read, must be the call's output (a 0-dim bool on the device, as :meth:`_same_output`)."""
        m = self.module
        out = output.detach()
        if out.dim() == 2:
            out = out.unsqueeze(1)
        elif m.batch_first:
            out = out.transpose(0, 1)
        z = rec.linears[-1][3].detach()
        read = _per_sample(z, n)
        if z.shape[-1] != out.shape[-1] or read.shape != out.transpose(0, 1).shape:
            raise _NotReplayable("its last projection is not the output projection laid out as expected")
        return _same_values(read, out.transpose(0, 1))

    def _replayed_view(self, captures, grads, batch, inv_scale) -> View:
        parts: list[_Part] = []
        extra: dict[str, torch.Tensor] = {}
        for call, gouts in zip(captures, grads, strict=True):
            live = [(k, g) for k, g in enumerate(gouts) if g is not None]
            if not live:
                continue
            if self._batch_size(call) != batch:
                raise _NotReplayable(f"its batch axis has size {self._batch_size(call)}, the loss's batch is {batch}")
            p, x = self._replay(call, live, inv_scale)
            parts += p
            for name, g in x.items():
                extra[name] = extra[name] + g if name in extra else g
        return self._assemble(parts, extra, batch)

    def _assemble(self, parts: list[_Part], extra: dict[str, torch.Tensor], batch: int) -> View:
        """One FactorView per trainable projection weight (with its bias when the bias follows the
        weight's rows call by call), the other biases and repeated parameters materialised."""
        params = dict(self.module.named_parameters())
        views: list[View] = []
        factored: set[str] = set()
        weights = list(dict.fromkeys(p.weight[0] for p in parts if p.weight is not None and p.weight[0] in self.names))
        for w in weights:
            mine = [p for p in parts if p.weight is not None and p.weight[0] == w]
            bias = mine[0].bias[0] if mine[0].bias is not None else None
            follows = (
                bias in self.names
                and all(p.bias is not None and p.bias == (bias, *p.weight[1:]) for p in mine)
                and not any(p.bias is not None and p.bias[0] == bias for p in parts if p not in mine)
            )
            views.append(self._factor_view(w, bias if follows else None, mine, params[w]))
            factored.update([w, bias] if follows else [w])
        loose: dict[str, torch.Tensor] = dict(extra)  # bias_k, bias_v; biases not following their weight
        for p in parts:
            if p.bias is None or p.bias[0] not in self.names or p.bias[0] in factored:
                continue
            name, row0, rows = p.bias
            dt = torch.promote_types(p.a.dtype, p.e.dtype)  # float32 sums of autocast's half gradients
            if name not in loose:
                loose[name] = p.e.new_zeros(batch, params[name].numel(), dtype=dt)
            loose[name][:, row0 : row0 + rows] += p.e.to(loose[name].dtype).sum(1)
        missing = sorted(set(self.names) - factored - set(loose))
        if missing:
            raise _NotReplayable(f"the replay did not see the parameters {missing} used")
        if loose:
            grads = {self.names[n]: g.reshape(batch, *params[n].shape) for n, g in loose.items()}
            views.append(MaterialisedView(grads))
        return views[0] if len(views) == 1 else ViewGroup(views)

    def _factor_view(self, weight: str, bias: str | None, mine: list[_Part], p: torch.Tensor) -> FactorView:
        rows = p.shape[0]
        dt = functools.reduce(torch.promote_types, [t.dtype for q in mine for t in (q.a, q.e)])
        if all(q.weight[1] == 0 and q.weight[2] == rows for q in mine):
            a = _cat([q.a for q in mine], 1).unsqueeze(1)
            e = _cat([q.e for q in mine], 1).unsqueeze(1)
        else:  # slices of the rows (q, k, v of a packed in-projection with different inputs): groups
            blk = functools.reduce(math.gcd, [rows] + [v for q in mine for v in q.weight[1:]])
            groups: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(rows // blk)]
            for q in mine:
                r0, nr = q.weight[1:]
                for j in range(r0 // blk, (r0 + nr) // blk):
                    lo = j * blk - r0
                    groups[j].append((q.a, q.e[..., lo : lo + blk]))
            t = max(sum(x.shape[1] for x, _ in grp) for grp in groups)
            bsz, i = mine[0].a.shape[0], mine[0].a.shape[-1]
            empty_a, empty_e = mine[0].a.new_zeros(bsz, 0, i), mine[0].e.new_zeros(bsz, 0, blk)
            a = torch.stack([_pad_positions(_cat([x for x, _ in g] or [empty_a], 1), t) for g in groups], 1)
            e = torch.stack([_pad_positions(_cat([y for _, y in g] or [empty_e], 1), t) for g in groups], 1)
        full_bias = self.names[bias] if bias is not None else None
        return FactorView(a.to(dt), e.to(dt), self.names[weight], full_bias, tuple(p.shape))


class BareParamsHandler(FuncHandler):
    """Parameters that a module with children holds itself and uses functionally, not through a child
    (bare ``nn.Parameter`` s: ViT's ``cls_token`` expanded over the batch, its ``position_embeddings``
    added to every example).

    Their per-sample gradients come from where each meets the batch (the engine's
    :class:`~cockpit_lite.persample.broadcast.BroadcastTracker`: the first op that broadcasts it over
    the batch, seen by a pre-hook on that autograd node), processed at the end of backward. A parameter
    used otherwise falls back, with a warning, to torch.func over this module's forward (the
    :class:`FuncHandler` way: exact for a deterministic forward; refused while a dropout module inside
    is active, since a recomputation would draw other masks).
    """

    def bare_view(self, tracker, captures, grads, batch: int, inv_scale: float) -> View | None:
        """The view of this step's parameters: resolved ones from ``tracker``, the others by torch.func
        over this module's calls (``captures``/``grads``); None if none of them got gradient."""
        out: dict[str, torch.Tensor] = {}
        failed: dict[str, str] = {}
        for local, full in self.names.items():
            if full in tracker.params:
                out[full] = _scaled(tracker.params[full], inv_scale)
            elif full in tracker.param_failures:
                failed[local] = tracker.param_failures[full]
        if failed:
            reasons = "; ".join(sorted(set(failed.values())))
            if not captures or all(g is None for gs in grads for g in gs):
                raise ValueError(f"{reasons}, and its module {type(self.module).__name__} was not called")
            if dropout_active(self.module):
                raise PerSampleUndefined(
                    f"{reasons}; a recomputation of {type(self.module).__name__} by torch.func would draw other "
                    "dropout masks than the step did, so per-sample statistics are skipped while its dropout is active"
                )
            sub = FuncHandler(self.module, {local: self.names[local] for local in failed})
            sub.sample_axes = self.sample_axes  # (what the engine's shape probe resolved for these calls)
            sub._rows_checks = self.__dict__.setdefault("_rows_checks", [])  # (decided by this handler's checks)
            sub._rows_loop = getattr(self, "_rows_loop", False)
            try:
                out.update(sub.view(captures, grads, batch, inv_scale).grads())
            except (ValueError, RuntimeError, LayerLeftOut) as e:
                if not out:
                    raise
                # the parameters split where they meet the batch stay served; the replay's are left out
                self.partial = ({self.names[local] for local in failed}, f"{type(e).__name__}: {e}")
            else:
                self._rows_loop = getattr(sub, "_rows_loop", False)
                self._warn_fallback(reasons)  # (once the replay served them: a refused one says why instead)
        return MaterialisedView(out) if out else None

    def take_partial(self) -> tuple[set[str], str] | None:
        """(full names, why) of the parameters the last :meth:`bare_view` left out while it served the
        others; taken once."""
        return self.__dict__.pop("partial", None)

    def _warn_fallback(self, reasons: str) -> None:
        if reasons not in getattr(self, "_fallbacks", set()):
            self._fallbacks = getattr(self, "_fallbacks", set()) | {reasons}
            warnings.warn(
                f"cockpit-lite: {reasons}; its per-sample gradients come from torch.func over the forward of "
                f"{type(self.module).__name__} (exact for a deterministic forward)",
                CockpitWarning,
                stacklevel=2,
            )


class LayerHandler(Handler):
    """A handler in one method: write :meth:`per_sample_grads`, everything else is derived.

    The engine calls ``per_sample_grads(inputs, output_grad, **kwargs)`` once per forward call of the
    module in a step, with ``inputs`` the call's positional arguments (tensors detached), ``kwargs`` its
    keyword arguments, and ``output_grad`` the gradient of the per-sample losses l_i with respect to
    the call's output (one tensor; a tuple, with None where no gradient arrived, for a module with
    several tensor outputs). It is already scaled: for a mean loss the engine multiplied the captured
    gradient by B, so that a sample's gradient is sum over positions of output_grad times d output /
    d parameter, with no factor to apply. It returns {local parameter name: (B, *param.shape)}.
    Several calls per step add up. Squared norms, Gram entries, dot products with the mean gradient,
    projections and TracIn cross products all come from these gradients (a
    :class:`~cockpit_lite.persample.views.MaterialisedView`: B x the module's parameters in memory).
    Parameters that are frozen or not held by the optimizer are dropped from the result.
    """

    def capture(self, args, kwargs, output):
        detach = lambda t: t.detach() if torch.is_tensor(t) else t  # noqa: E731
        return tree_map(detach, args), tree_map(detach, kwargs)

    def per_sample_grads(self, inputs: tuple, output_grad, **kwargs) -> dict[str, torch.Tensor]:
        """{local parameter name: g_i stacked over the batch, shape (B, *param.shape)}."""
        raise NotImplementedError

    def view(self, captures, grads, batch, inv_scale):
        kind = type(self).__name__
        params = dict(self.module.named_parameters())
        total: dict[str, torch.Tensor] = {}
        for (args, kwargs), gouts in zip(captures, grads, strict=True):
            if all(g is None for g in gouts):
                continue
            scaled = tuple(None if g is None else _scaled(g, inv_scale) for g in gouts)
            out = self.per_sample_grads(args, scaled[0] if len(scaled) == 1 else scaled, **kwargs)
            if not isinstance(out, Mapping):
                raise TypeError(f"{kind}.per_sample_grads must return a dict {{parameter name: tensor}}, got {out!r}")
            for local, g in out.items():
                if local not in params:
                    raise KeyError(
                        f"{kind}.per_sample_grads returned {local!r}, which is no parameter of "
                        f"{type(self.module).__name__} (its parameters: {sorted(params)})"
                    )
                want = (batch, *params[local].shape)
                if not torch.is_tensor(g) or tuple(g.shape) != want:
                    got = tuple(g.shape) if torch.is_tensor(g) else type(g).__name__
                    raise ValueError(
                        f"{kind}.per_sample_grads returned {local!r} of shape {got}; expected {want} "
                        "(the batch size, then the parameter's shape)"
                    )
                if local in self.names:
                    full = self.names[local]
                    total[full] = total[full] + g if full in total else g
        missing = sorted(local for local, full in self.names.items() if full not in total)
        if missing:
            raise ValueError(f"{kind}.per_sample_grads returned no gradient for the trainable parameter(s) {missing}")
        return MaterialisedView({self.names[local]: total[self.names[local]] for local in self.names})


#: module type -> handler; looked up along the MRO, so subclasses are served too
HANDLERS: dict[type, type[Handler]] = {
    nn.Linear: LinearHandler,
    nn.Conv1d: ConvHandler,
    nn.Conv2d: ConvHandler,
    nn.Embedding: EmbeddingHandler,
    nn.EmbeddingBag: EmbeddingBagHandler,
    nn.MultiheadAttention: AttentionHandler,
    nn.LayerNorm: NormHandler,
    nn.GroupNorm: NormHandler,
    BatchNormBase: NormHandler,
    InstanceNormBase: NormHandler,
}

#: modules whose forward does not call their child modules (their children's hooks never fire):
#: one handler serves all their parameters
WHOLE_MODULES: tuple[type, ...] = (nn.MultiheadAttention, nn.RNNBase)


#: layer classes whose factor forms assume their own forward: a subclass with a forward of its own is
#: replayed by torch.func instead (exact); an nn.Embedding subclass is read at its lookup (EmbeddingHandler)
OWN_FORWARD_REPLAYED: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm, nn.GroupNorm, nn.EmbeddingBag)


def handler_for(module: nn.Module) -> type[Handler]:
    """The handler class registered for the nearest class in the module's MRO; :class:`FuncHandler`
    (torch.func on that module alone) if none is, or if the module's class replaces the forward of one of
    :data:`OWN_FORWARD_REPLAYED`."""
    for cls in type(module).__mro__:
        if cls in HANDLERS:
            if cls in OWN_FORWARD_REPLAYED and type(module).forward is not cls.forward:
                return FuncHandler
            return HANDLERS[cls]
    return FuncHandler


def register_handler(module_class: type[nn.Module], handler_class: type[Handler]) -> type[Handler] | None:
    """Serve ``module_class`` (and its subclasses without a handler of their own) by ``handler_class``.

    The simple form is a :class:`LayerHandler` subclass that writes ``per_sample_grads``; a full
    :class:`Handler` returns a view of its own (a factor form, say). Registering for a class that
    already has a handler, a built-in one included (``nn.Linear``), replaces it; the replaced handler
    is returned (None if there was none) so that it can be registered back. Cockpits attached from
    then on use the registration; attached ones keep the handlers they built. See
    docs/recipes/layer_handler.md.

    Raises:
        TypeError: ``module_class`` is not a subclass of ``torch.nn.Module`` (or is ``nn.Module``
            itself, which would serve every module), or ``handler_class`` is not a subclass of
            :class:`Handler` that implements ``view`` (or, for a :class:`LayerHandler`,
            ``per_sample_grads``).
    """
    if not isinstance(module_class, type) or not issubclass(module_class, nn.Module):
        raise TypeError(f"register_handler: module_class must be a torch.nn.Module subclass, got {module_class!r}")
    if module_class is nn.Module:
        raise TypeError("register_handler: a handler for nn.Module itself would serve every module; name a layer")
    if not isinstance(handler_class, type) or not issubclass(handler_class, Handler):
        raise TypeError(
            f"register_handler: handler_class must be a subclass of cockpit_lite.persample.LayerHandler (write "
            f"per_sample_grads) or Handler (write view), got {handler_class!r}"
        )
    if issubclass(handler_class, LayerHandler):
        if handler_class.per_sample_grads is LayerHandler.per_sample_grads:
            raise TypeError(f"register_handler: {handler_class.__name__} does not implement per_sample_grads")
    elif handler_class.view is Handler.view:
        raise TypeError(f"register_handler: {handler_class.__name__} does not implement view")
    previous = HANDLERS.get(module_class)
    HANDLERS[module_class] = handler_class
    return previous


def build_handlers(model: nn.Module, params: Collection[int] | None = None) -> dict[nn.Module, Handler]:
    """One handler per module that holds trainable parameters (those with ``requires_grad``, and with
    ``params`` given only those whose ``id`` is in it: the optimizer's). Modules in
    :data:`WHOLE_MODULES` get one torch.func handler for all their parameters (their children's hooks
    never fire), unless a handler is registered for their class. Parameters that a module with children
    holds itself get a :class:`BareParamsHandler`."""
    from cockpit_lite.persample import parametrized

    _register_optional_handlers()
    handlers: dict[nn.Module, Handler] = {}
    claimed: list[str] = []
    # a parameter shared by several modules (tied weights) goes by its first name, as in named_parameters()
    canonical = {id(p): n for n, p in model.named_parameters()}
    for mname, module in model.named_modules():
        if any(mname.startswith(c + ".") for c in claimed):
            continue
        whole = isinstance(module, WHOLE_MODULES)
        cls = handler_for(module)
        found = list(module.named_parameters(recurse=whole))
        # a parametrized layer (torch.nn.utils.parametrize) of a class with a layer rule: its originals too
        reparametrized = not whole and parametrized.serves(module, cls)
        if reparametrized and hasattr(module, "parametrizations"):
            found += list(module.parametrizations.named_parameters(prefix="parametrizations"))
        names = {
            local: canonical.get(id(p), f"{mname}.{local}" if mname else local)
            for local, p in found
            if p.requires_grad and (params is None or id(p) in params)
        }
        if reparametrized and hasattr(module, "parametrizations"):
            claimed.append(f"{mname}.parametrizations" if mname else "parametrizations")
        if not names:
            continue
        if whole:
            claimed.append(mname)
        if reparametrized:
            handlers[module] = parametrized.ParametrizedHandler(module, names, cls)
        else:
            handlers[module] = cls(module, names)
    return _bare_parameters(handlers)


def _bare_parameters(handlers: dict[nn.Module, Handler]) -> dict[nn.Module, Handler]:
    """Modules with children (other than :data:`WHOLE_MODULES`) served by the default
    :class:`FuncHandler` hold bare parameters: give
    them a :class:`BareParamsHandler` for the parameters no other handler serves (a bias that is also
    a child layer's, as in BERT's MLM head, is that layer's), none if nothing is left."""
    out: dict[nn.Module, Handler] = {}
    for module, handler in handlers.items():
        whole = isinstance(module, WHOLE_MODULES)
        if type(handler) is not FuncHandler or whole or next(module.children(), None) is None:
            out[module] = handler
            continue
        elsewhere = {full for m, h in handlers.items() if m is not module for full in h.names.values()}
        names = {local: full for local, full in handler.names.items() if full not in elsewhere}
        if names:
            out[module] = BareParamsHandler(module, names)
    return out


def _register_optional_handlers() -> None:
    """Handlers for layers of optional libraries, registered once their module is imported (a model
    that uses the layer has imported it): transformers' ``Conv1D``."""
    if "transformers.pytorch_utils" in sys.modules:
        from cockpit_lite.persample import hf

        hf.register()


def tied_groups(handlers: dict[nn.Module, Handler]) -> dict[nn.Module, int]:
    """Modules that share a parameter (tied weights), transitively, numbered by group; others absent."""
    users: dict[int, list[nn.Module]] = {}
    for module, handler in handlers.items():
        for local in handler.names:
            users.setdefault(id(module.get_parameter(local)), []).append(module)
    group: dict[nn.Module, int] = {}
    n = 0
    for mods in users.values():
        if len(mods) < 2:
            continue
        known = {group[m] for m in mods if m in group}
        gid = min(known) if known else n
        n += not known
        for m in list(group):  # merge groups joined by this parameter
            if group[m] in known:
                group[m] = gid
        for m in mods:
            group[m] = gid
    return group
