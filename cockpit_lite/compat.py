"""Every private PyTorch API the cockpit uses, in one place, each with a test (tests/test_compat.py).

PyTorch does not promise these names across releases. When one moves, this module is the one place to
mend, and its test says which call broke. Public APIs are used directly everywhere else.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree
from torch.utils.weak import WeakIdKeyDictionary

#: ``torch.utils._pytree``: flatten/map nested outputs (tuples, dicts, ModelOutput-like containers)
tree_flatten = _pytree.tree_flatten
tree_map = _pytree.tree_map


def tree_leaves(tree: Any) -> list[Any]:
    """``tree_flatten(tree)[0]``, without the pytree walk for what the hooks see on most calls: a
    tensor, or a tuple/list of tensors, tuples/lists of tensors and empty dicts (``(args, kwargs)``)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if type(tree) in (tuple, list):
        out: list[Any] = []
        for x in tree:
            if isinstance(x, torch.Tensor):
                out.append(x)
            elif type(x) in (tuple, list) and all(isinstance(y, torch.Tensor) for y in x):
                out.extend(x)
            elif not (type(x) is dict and not x):
                return _pytree.tree_leaves(tree)
        return out
    return _pytree.tree_leaves(tree)


#: module classes with private names that the per-sample engine dispatches on
BatchNormBase: type[nn.Module] = nn.modules.batchnorm._BatchNorm
InstanceNormBase: type[nn.Module] = nn.modules.instancenorm._InstanceNorm


def without_grad(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``@torch.no_grad()`` for functions called every step: grad mode switched by the C setter
    (``torch._C._set_grad_enabled``) instead of a context object (six Python calls a call)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        torch._C._set_grad_enabled(False)
        try:
            return fn(*args, **kwargs)
        finally:
            torch._C._set_grad_enabled(True)

    return wrapper


#: dtypes whose norms are accumulated and returned in float32 (a float16 norm above 65504 is inf; a
#: bfloat16 one keeps 8 bits of mantissa)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def foreach_norm(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """2-norm of each tensor in one fused call (``torch._foreach_norm``); float16 and bfloat16 tensors
    in float32 (their own dtype would overflow or round the norm), the others in their dtype."""
    tensors = list(tensors)
    half = [i for i, t in enumerate(tensors) if t.dtype in HALF_DTYPES]
    if not half:
        return list(torch._foreach_norm(tensors))
    out: list[torch.Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    rest = [i for i, t in enumerate(tensors) if t.dtype not in HALF_DTYPES]
    try:
        low = torch._foreach_norm([tensors[i] for i in half], 2, dtype=torch.float32)
    except TypeError:  # (a torch without the dtype argument)
        low = [tensors[i].float().norm() for i in half]
    for i, n in zip(half, low, strict=True):
        out[i] = n
    if rest:
        for i, n in zip(rest, torch._foreach_norm([tensors[i] for i in rest]), strict=True):
            out[i] = n
    return out


def cpu_value(t: torch.Tensor) -> float:
    """The value of a 0-dim tensor that is on the CPU (reading it waits for no device). For the CPU
    branches that save tiny ops (a handful of microseconds each, more with cold caches); a tensor on a
    GPU takes the device branch beside it. ``tests/syncs.py`` does not count these reads."""
    if not t.is_cpu:
        raise ValueError(f"cpu_value of a tensor on {t.device}: reading it would wait for the device")
    return float(t)


def stacked_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`foreach_norm` of ``tensors`` as one vector, on the first tensor's device (a model spread
    over several GPUs: the other norms are copied there, device to device)."""
    norms = foreach_norm(tensors)
    if len(set(map(torch.Tensor.get_device, norms))) > 1:  # (ints: no device object, no Python frame per norm)
        norms = [n.to(norms[0].device) for n in norms]
    return torch.stack(norms)


def same_place(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` have the same dtype and device, without making device objects (the hot
    path): the same ``get_device()`` index (-1 on the CPU) on the same kind of device."""
    if a.dtype != b.dtype or a.get_device() != b.get_device():
        return False
    return a.is_cpu == b.is_cpu and a.is_cuda == b.is_cuda and a.is_meta == b.is_meta


def foreach_copy_(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    """dst[i].copy_(src[i]) for all i in one fused call (``torch._foreach_copy_``)."""
    torch._foreach_copy_(list(dst), list(src))


def foreach_difference(
    out: Sequence[torch.Tensor], a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], fused: bool | None = None
) -> None:
    """out[i] = a[i] - b[i] for all i. ``fused`` (None: on a CUDA device): by two fused calls, a copy and an
    in-place subtraction (the same rounding as ``torch.sub``; two multi-tensor kernels instead of one
    launch per tensor, which a GPU's step bound by the host pays for); else one ``torch.sub`` per tensor,
    one pass over the memory (on the CPU the fused pair's second pass costs more than the calls it saves)."""
    out, a, b = list(out), list(a), list(b)
    if _fuse(fused, out) and _plain(out, a, b):
        torch._foreach_copy_(out, a)
        torch._foreach_sub_(out, b)
        return
    for o, x, y in zip(out, a, b, strict=True):  # (and FSDP2's DTensors, as their sharding rules allow)
        torch.sub(x, y, out=o)


def foreach_difference_from_(
    buffers: Sequence[torch.Tensor], a: Sequence[torch.Tensor], fused: bool | None = None
) -> None:
    """buffers[i] = a[i] - buffers[i] in place for all i; ``fused`` as in :func:`foreach_difference`: buffers - a,
    then its sign flipped (exact: x - y is -(y - x) in IEEE arithmetic, so the values are
    ``torch.sub(a, buffers)``'s bit for bit)."""
    buffers, a = list(buffers), list(a)
    if _fuse(fused, buffers) and _plain(buffers, a):
        torch._foreach_sub_(buffers, a)
        torch._foreach_neg_(buffers)
        return
    for buf, x in zip(buffers, a, strict=True):
        torch.sub(x, buf, out=buf)


def _fuse(fused: bool | None, tensors: list[torch.Tensor]) -> bool:
    return fused if fused is not None else bool(tensors) and tensors[0].is_cuda


def _plain(*lists: list[torch.Tensor]) -> bool:
    """Every tensor a plain tensor or parameter (no subclass such as a DTensor), the lists of equal length."""
    return len({len(x) for x in lists}) == 1 and all(type(t) in _PLAIN for x in lists for t in x)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def weight_norm(v: torch.Tensor, g: torch.Tensor, dim: int) -> torch.Tensor:
    """g v / ||v|| (the norm over every axis but ``dim``): the weight of the older
    ``torch.nn.utils.weight_norm`` and of ``parametrizations.weight_norm`` (``torch._weight_norm``)."""
    return torch._weight_norm(v, g, dim)


def queue_backward_callback(fn: Callable[[], None]) -> None:
    """Run ``fn`` once the current backward pass has finished (autograd engine's ``queue_callback``).
    Valid only while a backward pass runs (from a tensor or node hook)."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)


def default_store() -> Any | None:
    """The key-value store of ``torch.distributed``'s default process group (``_get_default_store``),
    or None without one: the ranks agree on things there without a collective."""
    try:
        return torch.distributed.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def saved_attribute(node: Any, name: str) -> Any:
    """What an autograd node saved for its backward under ``name`` (``node._saved_<name>``: the other
    operand of a product, the ``alpha`` of an addition, the dims of a permute)."""
    return getattr(node, f"_saved_{name}")


#: () -> bool: whether a ``torch.profiler`` is recording right now (the C function itself: asked by
#: every timed region of a step)
profiler_enabled: Callable[[], bool] = torch._C._autograd._profiler_enabled


def compiled_inner(model: nn.Module) -> nn.Module | None:
    """The module inside ``torch.compile``'s OptimizedModule (``_orig_mod``), else None."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else None


def conv_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The convolution of ``module`` (its stride, padding mode, dilation, groups) with another weight
    and no bias (``_ConvNd._conv_forward``)."""
    return module._conv_forward(x, weight, None)


def conv_reversed_padding(module: nn.Module) -> Sequence[int]:
    """The padding of a conv module in ``F.pad`` order (``_reversed_padding_repeated_twice``)."""
    return module._reversed_padding_repeated_twice


def pad_like_conv(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x padded as the module pads it for a non-zero ``padding_mode``."""
    return F.pad(x, conv_reversed_padding(module), mode=module.padding_mode)


def conv_weight_grad(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """The weight gradient of a 2-D convolution (``aten.convolution_backward``, weight output only)."""
    w = torch.empty(tuple(weight_shape), dtype=x.dtype, device=x.device)
    return torch.ops.aten.convolution_backward(
        grad_out, x, w, None, tuple(stride), tuple(padding), tuple(dilation), False, (0, 0), groups,
        (False, True, False),
    )[1]  # fmt: skip


@contextlib.contextmanager
def dynamo_hook_guards() -> Iterator[None]:
    """While inside, torch.compile guards on module hooks, so compiled code sees the cockpit's layer
    hooks; compiled code is dropped on entry and exit so that the model recompiles with (and then
    without) the hooks. The global setting is restored on exit."""
    config = torch._dynamo.config
    before = config.skip_nnmodule_hook_guards
    config.skip_nnmodule_hook_guards = False
    torch._dynamo.reset()
    try:
        yield
    finally:
        config.skip_nnmodule_hook_guards = before
        torch._dynamo.reset()


def dataloader_iterator(loader: Any) -> Any:
    """The persistent-workers iterator a DataLoader keeps between epochs (``_iterator``), or None."""
    return getattr(loader, "_iterator", None)


def set_index_sampler(iterator: Any, sampler: Any) -> None:
    """Replace the index sampler a DataLoader iterator draws from (``_index_sampler``)."""
    iterator._index_sampler = sampler


# --- backward roots -----------------------------------------------------------------------------------
_backward_listeners: list[Callable[[Any, Any], None]] = []
_original_backward: Callable[..., Any] | None = None
_original_scale: Callable[..., Any] | None = None
#: tensors returned by GradScaler.scale -> the scale they were multiplied by (while a watch is attached);
#: by identity (a tensor's == is elementwise: a lookup by equality would read a value on the host)
_scaled_outputs: WeakIdKeyDictionary = WeakIdKeyDictionary()
#: the GradScaler that scaled the last loss, and its scale as read at the start of a step
#: (:func:`read_loss_scale`): (the scale tensor, its version counter then, its value)
_last_scaler: weakref.ref | None = None
_known_scale: tuple[torch.Tensor, int, float] | None = None


def _watched_scale(self: Any, outputs: Any) -> Any:
    global _last_scaler
    out = _original_scale(self, outputs)
    if torch.is_tensor(out) and getattr(self, "_scale", None) is not None:
        _scaled_outputs[out] = self._scale
        _last_scaler = weakref.ref(self)
    return out


def read_loss_scale() -> None:
    """At the start of a step (the model's forward pre-hook, before its forward is launched): read the
    loss scale of the GradScaler seen last, while the device holds no work of the step (the previous
    step's values were brought to the host; only the scaler's update is queued). :func:`grad_scaler_factor`
    then needs no read at backward, where one would wait for the whole forward, as long as the scale
    tensor's version counter says it is unchanged."""
    global _known_scale
    scaler = _last_scaler() if _last_scaler is not None else None
    scale = getattr(scaler, "_scale", None)
    if not torch.is_tensor(scale):
        _known_scale = None
    elif _known_value(scale) is None:
        _known_scale = (scale, scale._version, _read_idle(scale))


def _known_value(scale: torch.Tensor) -> float | None:
    """The value :func:`read_loss_scale` read of ``scale``, if the tensor is unchanged since (its version
    counter: ``scaler.update()`` writes it in place); else None."""
    known = _known_scale
    return known[2] if known is not None and known[0] is scale and known[1] == scale._version else None


def _read_idle(t: torch.Tensor) -> float:
    """The value of ``t`` read where the device has no work of the step queued (``tests/syncs.py`` does
    not count these reads: :func:`read_loss_scale`)."""
    return float(t)


def inside_backward() -> bool:
    """Whether the autograd engine is running a backward on this thread now (a backward called inside it:
    reentrant checkpointing's recomputed block, a backward in a gradient hook)."""
    try:
        return torch._C._current_graph_task_id() != -1
    except AttributeError:  # (a torch without it: every backward is taken for the loop's)
        return False


def _watched_backward(tensors: Any, grad_tensors: Any = None, *args: Any, **kwargs: Any) -> Any:
    if inside_backward():  # (a backward inside the loop's: part of that pass, not one of its own)
        return _original_backward(tensors, grad_tensors, *args, **kwargs)
    for listener in list(_backward_listeners):
        try:
            listener(tensors, grad_tensors)
        except Exception:  # a listener never breaks the user's backward
            pass
    return _original_backward(tensors, grad_tensors, *args, **kwargs)


class BackwardWatch:
    """Calls ``listener(tensors, grad_tensors)`` at every ``torch.autograd.backward`` (which
    ``Tensor.backward`` calls) until :meth:`remove`: the roots backward starts from (the loss the loop
    optimizes, whatever computed it). Not for a backward called while one runs (reentrant checkpointing
    recomputes its block and calls backward on it inside the loop's backward): that is part of the pass.
    ``torch.autograd.backward`` and ``torch.amp.GradScaler.scale`` (to recognise a scaled loss,
    :func:`grad_scaler_factor`) are wrapped while any watch is attached and restored when the last one is
    removed."""

    def __init__(self, listener: Callable[[Any, Any], None]):
        global _original_backward, _original_scale
        if not _backward_listeners:
            _original_backward = torch.autograd.backward
            torch.autograd.backward = _watched_backward
            _original_scale = torch.amp.GradScaler.scale
            torch.amp.GradScaler.scale = _watched_scale
        _backward_listeners.append(listener)
        self.listener = listener

    def remove(self) -> None:
        global _original_backward, _original_scale
        if self.listener in _backward_listeners:
            _backward_listeners.remove(self.listener)
            if not _backward_listeners and _original_backward is not None:
                torch.autograd.backward = _original_backward
                torch.amp.GradScaler.scale = _original_scale
                _original_backward = _original_scale = None


def cut_second_derivative(tensors: Sequence[Any]) -> bool:
    """Whether the autograd graph of ``tensors`` (gradients taken with ``create_graph=True``) passes an op
    whose backward has no graph of its own: a custom Function marked ``once_differentiable`` leaves a
    ``DelayedError`` node (named ``torch::autograd::Error``) whose input is a detached copy, so a further
    derivative through it is silently partial (it reaches that copy, not the parameters)."""
    return any(node.name() == "torch::autograd::Error" for node in graph_nodes(tensors))


def graph_nodes(tensors: Sequence[Any]) -> Iterator[Any]:
    """Every autograd node of the graph behind ``tensors``, each once (depth first; stop early by
    leaving the loop)."""
    stack = [t.grad_fn for t in tensors if torch.is_tensor(t) and t.grad_fn is not None]
    seen: dict[int, Any] = {}  # (the nodes themselves held: an id is not reused during the walk)
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        yield node
        stack.extend(n for n, _ in node.next_functions)


def grad_scaler_factor(root: torch.Tensor) -> float | None:
    """The loss scale s if ``root`` is the output of ``torch.amp.GradScaler.scale(loss)`` (recorded by
    the wrapper :class:`BackwardWatch` puts around ``GradScaler.scale``), else None. ``scaler.step()``
    divides s out of ``p.grad`` before the optimizer sees it."""
    scale = _scaled_outputs.get(root) if _scaled_outputs and torch.is_tensor(root) else None
    if scale is None:
        return None
    known = _known_value(scale)  # (read at the step's start, unchanged since)
    return known if known is not None else float(scale)


_UNGUARDED: dict[Callable, Callable] = {}


def unguarded(fn: Callable) -> Callable:
    """A copy of a ``torch.nn.functional`` function without its ``__torch_function__`` gate.

    Python-level functionals such as ``F.multi_head_attention_forward`` start with
    ``if has_torch_function(...): return handle_torch_function(...)``, so a ``TorchFunctionMode`` sees
    them as one call and none of the ops inside. The copy runs the same code with that gate answering
    False (its globals are a copy of the module's, with ``has_torch_function`` replaced), so a mode
    pushed around the call sees every overridable op inside it (``F.linear``, ``Tensor.repeat``)."""
    copy = _UNGUARDED.get(fn)
    if copy is None:
        import types

        env = dict(fn.__globals__)
        env["has_torch_function"] = lambda *args: False
        copy = types.FunctionType(fn.__code__, env, fn.__name__, fn.__defaults__, fn.__closure__)
        copy.__kwdefaults__ = fn.__kwdefaults__
        _UNGUARDED[fn] = copy
    return copy


def tensor_version(t: torch.Tensor) -> int:
    """The in-place version counter of a tensor (``Tensor._version``), shared with its detached views:
    it changes when any of them is modified in place."""
    return t._version


def sdpa_backends() -> list:
    """The scaled-dot-product-attention backends enabled now, in priority order (what
    ``torch.nn.attention.sdpa_kernel(backends, set_priority=True)`` restores), from
    ``torch.nn.attention._cur_sdpa_kernel_backends``."""
    from torch.nn import attention

    return attention._cur_sdpa_kernel_backends(with_priority=True)


#: backward nodes a loss passes through on its way to backward(): a scalar factor, GradScaler's scale
_SCALINGS = ("MulBackward0", "MulBackward1", "DivBackward0", "DivBackward1")


def _nll_node(root_fn: Any) -> Any:
    """The negative log-likelihood's backward node a root of backward comes from (``F.cross_entropy``,
    ``F.nll_loss``, through scalar factors), or None."""
    fn = root_fn
    for _ in range(4):
        if fn is None:
            return None
        if type(fn).__name__ in ("NllLossBackward0", "NllLoss2DBackward0"):
            return fn
        if type(fn).__name__ not in _SCALINGS or not fn.next_functions:
            return None
        fn = fn.next_functions[0][0]
    return None


def nll_prediction(root_fn: Any) -> Any:
    """The node that made what the negative log-likelihood a root of backward comes from took its
    log-probabilities of (``F.cross_entropy(pred, y)``: ``pred``'s node, past the log-softmax), or None."""
    fn = _nll_node(root_fn)
    fn = fn.next_functions[0][0] if fn is not None and fn.next_functions else None
    if fn is not None and type(fn).__name__ == "LogSoftmaxBackward0":
        fn = fn.next_functions[0][0] if fn.next_functions else None
    return fn


def nll_terms(root_fn: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int, int] | None:
    """The saved inputs of the negative log-likelihood a root of backward comes from (``F.cross_entropy``,
    ``F.nll_loss``, through scalar factors): (log-probabilities, targets, class weights or None,
    ignore_index, reduction: 1 mean, 2 sum), read from its backward node's ``_saved_*``; else None."""
    fn = _nll_node(root_fn)
    if fn is None:
        return None
    try:
        return (
            fn._saved_self,
            fn._saved_target,
            fn._saved_weight,
            _signed64(int(fn._saved_ignore_index)),
            int(fn._saved_reduction),
        )
    except (AttributeError, RuntimeError):
        return None


def nll_total_weight(loss: torch.Tensor) -> torch.Tensor | None:
    """The normaliser torch divided a mean NLL / cross-entropy loss by (without label smoothing): the
    summed class weights of the targets it counted (their count without weights, ignore_index left
    out), read from the loss's backward node (``_saved_total_weight``, a 0-dim tensor); else None."""
    fn = loss.grad_fn
    if fn is None or type(fn).__name__ not in ("NllLossBackward0", "NllLoss2DBackward0"):
        return None
    try:
        return fn._saved_total_weight
    except (AttributeError, RuntimeError):
        return None


def _signed64(value: int) -> int:
    """A 64-bit integer saved unsigned (``ignore_index=-100`` reads 2^64 - 100) as the signed value."""
    return value - (1 << 64) if value >= (1 << 63) else value
