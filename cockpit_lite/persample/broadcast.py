"""Parameters broadcast over the batch: per-sample gradients found one autograd node later.

A position embedding looked up with positions shared by the batch (``wpe(arange(T))``, position ids of
shape (1, T)), or a bare ``nn.Parameter`` used functionally (ViT's ``cls_token`` expanded over the
batch, its ``position_embeddings`` added to every example), produces a tensor u without the batch
axis. Autograd sums over the examples where u meets the batch, so the gradient that arrives at u
(or at the parameter) is already the batch's sum. Example i's share exists one node later: at the
first op whose output y carries the batch axis. A pre-hook on that node sees dL/dy unsummed, and

    d l_i / d u = reduce_to_shape(u)( [dL/dy]_i * c )

where [.]_i keeps the rows of example i along y's batch axis (the one axis of size B that u is
broadcast along) and c is the op's local derivative with respect to u: 1 for ``u + x`` and
``x.expand``, alpha or -alpha for ``x + alpha u`` and ``x - alpha u``, x for ``u * x``. Between u and
that op there may be ops that change only u's layout (view, reshape, (un)squeeze, permute, transpose,
a cast, a clone); their backward is applied to each example's share. A selection by a condition with a
constant beside it (``torch.where(c, u, -inf)``: a causal mask put on T5's position bias) is followed the
same way, each share masked by c; where c carries the batch, the selection is where u meets it
(derivative c). A repeat that tiles u B times along one axis (``u.repeat(B, 1, 1)``, DeBERTa's relative
position projections beside its (B h, T, d) queries) meets the batch too: copy i is example i's share.
The shares are stacked as
(B, *u.shape) (memory B x |u|, no more), handed to the module's handler as the call's output gradient
(with its inputs expanded over the batch) or, for a bare parameter, taken as its per-sample gradients.

Finding the nodes: autograd can only be walked from outputs towards inputs. At the end of the model's
forward the graph is walked once from the model's outputs; every node that takes u (or the
parameter's gradient accumulator, or a layout op on them) as an input is a consumer and gets a
pre-hook. Whether u is broadcast is decided by what the consumers see in backward, so a candidate
whose shape is ambiguous (an embedding looked up with indices of shape (T,) when T == B) is served
correctly: a consumer that broadcasts it along the batch axis says so.

Never silently wrong: the shares of every call are checked to add up to the gradient autograd summed
at u (a consumer the walk missed, e.g. a use outside the model, would break the sum); a broadcast
tensor used by an op this module does not know (a matrix product, say), or broadcast along several
axes of size B, or used both broadcast and not, makes the engine skip the step with a note that says
which op and tensor; a bare parameter it cannot resolve falls back to ``torch.func`` over its owning
module (the previous behaviour, exact for a deterministic module; refused when dropout is active in it).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from cockpit_lite.compat import saved_attribute, tree_flatten, tree_map
from cockpit_lite.persample.checks import DeferredCheck

#: ops whose output may carry the batch axis while one input does not (the broadcasting op)
BROADCAST_OPS = frozenset({"AddBackward0", "SubBackward0", "MulBackward0", "ExpandBackward0"})
#: ops that change only the layout of their single input: followed, their backward applied per example
RESHAPE_OPS = frozenset(
    {
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "UnsqueezeBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
        "AliasBackward0",
        "CloneBackward0",
        "ToCopyBackward0",
    }
)
PERMUTE_OPS = frozenset({"PermuteBackward0", "TransposeBackward0", "TBackward0"})
#: basic indexing (``pos[:, :T]``, ``pos[0]``): the backward places the gradient back into zeros
INDEX_OPS = frozenset({"SliceBackward0", "SelectBackward0"})
LAYOUT_OPS = RESHAPE_OPS | PERMUTE_OPS | INDEX_OPS
#: a selection by a condition with a constant beside it (``torch.where(c, u, -inf)``, as a causal mask put on a
#: position bias): followed as a layout op (each example's share masked by c) while its output lacks the batch
#: axis; where c brings the batch (a padding mask), the op itself is where u meets the batch
MASK_OPS = frozenset({"WhereBackward0"})
#: ops on one input whose backward is taken from their node itself, called on each example's share in its
#: pre-hook (while it holds what it saved): an in-place op on a view of the tensor (``pos /= scale`` on a
#: view of DeBERTa's position projection) leaves a ``CopySlices`` node and an ``as_strided`` view after it
NODE_OPS = frozenset({"torch::autograd::CopySlices", "AsStridedBackward0"})
#: the ops a slot is followed through (a slot of their own, the shares passed on in their pre-hook)
FOLLOWED_OPS = LAYOUT_OPS | MASK_OPS | NODE_OPS

#: relative tolerance of the check that the shares add up to the summed gradient (float32, half)
SUM_RTOL = (1e-3, 3e-2)


def per_example(t: torch.Tensor, shape: tuple[int, ...], batch: int) -> torch.Tensor | str:
    """The shares of the B examples of a gradient ``t`` (shape of an op's output y) with respect to an
    input of shape ``shape`` that the op broadcast to y's shape: (B, *shape), or a string saying why
    there is no such split.

    Example i's share is ``t`` restricted to index i along y's batch axis, summed over the other
    broadcast axes: the batch axis is the one axis where y has size B and the input (aligned to y's
    trailing axes) has size 1.
    """
    y = tuple(t.shape)
    if len(shape) > len(y):
        return f"its gradient has shape {y}, fewer axes than the tensor {tuple(shape)}"
    s = (1,) * (len(y) - len(shape)) + tuple(shape)
    if any(sd != 1 and sd != yd for sd, yd in zip(s, y, strict=True)):
        return f"shape {tuple(shape)} does not broadcast to {y}"
    if batch == 1:
        return t.sum_to_size(s).reshape(1, *shape)
    axes = [d for d in range(len(y)) if y[d] == batch and s[d] == 1]
    if len(axes) != 1:
        what = "no axis" if not axes else f"{len(axes)} axes"
        return f"it is broadcast from {tuple(shape)} to {y}, along {what} of the batch size {batch}"
    ba = axes[0]
    dims = [d for d in range(len(y)) if d != ba and s[d] == 1 and y[d] != 1]
    if dims:
        t = t.sum(dims, keepdim=True)
    return t.movedim(ba, 0).reshape(batch, *shape)


def per_copy(
    t: torch.Tensor, shape: tuple[int, ...], repeats: tuple[int, ...], batch: int | None
) -> torch.Tensor | str | None:
    """The shares of the B examples of a gradient ``t`` of ``u.repeat(*repeats)`` (u of shape ``shape``),
    where u is tiled B times along one axis to meet a batch laid out example-major along it (DeBERTa's
    relative position projections, (h, P, d) tiled to (B h, P, d) beside the (B h, T, d) queries): copy i
    is example i's, (B, *shape). None where nothing is repeated (u used as it is); a string where the
    repeats are not one axis of B copies."""
    if all(r == 1 for r in repeats):
        return None
    if batch is None:
        return "no batch size known"
    s = (1,) * (len(repeats) - len(shape)) + tuple(shape)
    axes = [d for d, r in enumerate(repeats) if r != 1]
    if len(axes) != 1 or repeats[axes[0]] != batch:
        return f"repeated {tuple(repeats)} times, not along one axis as often as the batch size {batch}"
    d = axes[0]
    return t.unflatten(d, (batch, s[d])).movedim(d, 0).reshape(batch, *shape)


def _signed(v: int | None) -> int | None:
    """An index the node saved as an unsigned 64-bit integer (-3 as 2**64 - 3), as Python's."""
    return v - (1 << 64) if v is not None and v >= 1 << 63 else v


def _layout_back(
    op: str, node: Any, p: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Per-example gradients ``p`` (B, *out) of a layout op's output mapped to its input: (B, *shape)
    in the input's dtype and device (the op's backward, applied to each example)."""
    if op in ("SliceBackward0", "SelectBackward0"):
        out = p.new_zeros(p.shape[0], *shape)
        dim = 1 + saved_attribute(node, "dim") % len(shape)
        if op == "SelectBackward0":
            out.select(dim, _signed(saved_attribute(node, "index"))).copy_(p)
        else:
            where = [slice(None)] * out.dim()
            start, end = _signed(saved_attribute(node, "start")), _signed(saved_attribute(node, "end"))
            where[dim] = slice(start, end, saved_attribute(node, "step"))
            out[tuple(where)] = p
        return out.to(dtype=dtype, device=device)
    if op == "PermuteBackward0":
        dims = [d % (p.dim() - 1) for d in saved_attribute(node, "dims")]
        inverse = [0] * len(dims)
        for j, d in enumerate(dims):
            inverse[d] = j
        p = p.permute(0, *[1 + i for i in inverse])
    elif op == "TransposeBackward0":
        n = p.dim() - 1
        p = p.transpose(1 + saved_attribute(node, "dim0") % n, 1 + saved_attribute(node, "dim1") % n)
    elif op == "TBackward0" and p.dim() == 3:
        p = p.transpose(1, 2)
    return p.reshape(p.shape[0], *shape).to(dtype=dtype, device=device)


@dataclass(eq=False)
class Slot:
    """A tensor without the batch axis (a module call's output, a bare parameter, or a layout op on
    either) and what its consumers said about it during backward."""

    kind: str  #: "call", "param" or "layout"
    shape: tuple[int, ...] | None  #: known up front for calls and parameters; a layout op's at its pre-hook
    like: tuple[torch.dtype, torch.device] | None  #: dtype and device of its gradient (as shape)
    label: str  #: for messages
    parent: Slot | None = None  #: layout: the slot its input is
    op: str = ""  #: layout: its op name
    node: Any = None  #: layout: its node (saved dims)
    arg: int = 0  #: layout: which input of its node the parent is (a mask op's: its condition's side)
    owner: Any = None  #: call: (module, call index); param: full parameter name
    pending: list = field(default_factory=list)  #: layout, before its shape is known
    parts: list[torch.Tensor] = field(default_factory=list)  #: shares (B, *shape)
    plain: list[str] = field(default_factory=list)  #: consumers that used it without broadcasting
    unknown: list[str] = field(default_factory=list)  #: consumers that are no known op, with why


def _input(grads: Any, index: int) -> torch.Tensor:
    """A node's gradient for its input ``index`` (a node called from Python returns a tensor or a tuple)."""
    return grads if torch.is_tensor(grads) else grads[index]


def through_node(node: Any, shares: torch.Tensor, index: int = 0) -> torch.Tensor:
    """Each example's share (B, *its output) through ``node``'s backward, to its input ``index``: (B, *that
    input). A backward is linear in its output gradient, so the shares of the input add up to its gradient.
    One ``torch.vmap`` over the node's call (a few batched kernels, not B calls); a loop over the examples where
    vmap cannot batch it (an op without a batching rule warns and falls back: taken as a failure here)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return torch.vmap(lambda g: _input(node(g), index))(shares)
    except Exception:
        return torch.stack([_input(node(part), index) for part in shares])


#: products whose first operand's gradient is the output gradient times the saved second operand, transposed
#: (the input of a Linear call: ``addmm(bias, x, W.T)``, ``mm(x, W.T)``): by that product, not the whole node,
#: which would form each example's weight gradient too
_FIRST_OPERAND = {"AddmmBackward0": 1, "MmBackward0": 0}


def _placed(share: torch.Tensor, slot: Slot) -> torch.Tensor:
    """Shares (B, ...) already in the slot's terms, as (B, *its shape) in its gradient's dtype and device."""
    return share.reshape(share.shape[0], *slot.shape).to(dtype=slot.like[0], device=slot.like[1])


def _short(op: str) -> str:
    return op[: -len("Backward0")] if op.endswith("Backward0") else op


class BroadcastTracker:
    """Finds, per step, the per-example gradients of tensors broadcast over the batch (module docstring).

    ``engine`` is the per-sample engine that owns it: its ``batch`` and ``active`` are read when
    gradients arrive. ``bare``: full name -> parameter held by a module with children and used by no
    handled module.
    """

    def __init__(self, engine: Any, bare: dict[str, nn.Parameter]):
        self.engine = engine
        self.bare = dict(bare)
        self.input_batch: int | None = None
        self._handles: list = []
        self.reset()

    # --- per step -------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Drop the step's state and remove the hooks it registered."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._new: list[tuple[tuple[Any, int], Slot]] = []  #: call slots not walked yet
        self._calls: dict[tuple[nn.Module, int], Slot] = {}  #: (module, call index) -> slot
        self._param_slots: dict[str, Slot] = {}
        #: resolved bare parameters: full name -> shares (B, *shape), still to be scaled like output grads
        self.params: dict[str, torch.Tensor] = {}
        #: bare parameters that got gradient but could not be split into examples: full name -> why
        self.param_failures: dict[str, str] = {}
        self._sums: list[tuple[str, torch.Tensor, torch.Tensor]] = []  #: (label, sum_i share_i, summed)
        self.low_precision = False
        #: the node that makes a call slot's output (its layer's last op), with that slot and the layout nodes
        #: between: a shared tensor this node takes gets its shares back through it (a chain of layers on a
        #: shared input, SEW-D's relative table through a LayerNorm and the position projections)
        self._producers: dict[Any, tuple[Slot, list[Any]]] = {}

    @property
    def wanted(self) -> bool:
        """Whether this forward has anything to walk the graph for."""
        return bool(self._new) or bool(self.bare)

    def on_model_input(self, rows: int | None) -> None:
        """The model's leading input size (of its first tensor input with an axis): a hint for which
        calls may lack the batch axis."""
        self.input_batch = rows

    def is_candidate(self, module: nn.Module, out: torch.Tensor) -> bool:
        """Whether a module call's single output may lack the batch axis: an embedding lookup (its
        indices may be positions shared by the batch), or an output with no axis of the batch size
        (the engine's, else the model input's leading size)."""
        if isinstance(module, nn.Embedding):
            return out.grad_fn is not None
        batch = self.engine.batch if self.engine.batch is not None else self.input_batch
        return batch is not None and batch not in out.shape and out.grad_fn is not None

    def has_call(self, module: nn.Module, idx: int) -> bool:
        """Whether this call of ``module`` is a candidate of the current forward."""
        return (module, idx) in self._calls

    def add_call(self, module: nn.Module, idx: int, out: torch.Tensor, label: str) -> None:
        slot = Slot("call", tuple(out.shape), (out.dtype, out.device), label, owner=(module, idx))
        self._calls[(module, idx)] = slot
        self._new.append(((out.grad_fn, out.output_nr), slot))

    # --- the walk (end of the model's forward) --------------------------------------------------------
    def walk(self, outputs: Any) -> None:
        """Find every consumer of the step's candidate tensors in the graph behind ``outputs`` and hook
        it (see the module docstring). One visit per node of the graph."""
        roots = [t.grad_fn for t in tree_flatten(outputs)[0] if torch.is_tensor(t) and t.grad_fn is not None]
        targets: dict[tuple[Any, int], Slot] = dict(self._new)
        self._new = []
        for name, p in self.bare.items():
            slot = self._param_slots.get(name)
            if slot is None:
                if not p.requires_grad:
                    continue
                node = torch.autograd.graph.get_gradient_edge(p).node
                slot = Slot("param", tuple(p.shape), (p.dtype, p.device), f"parameter {name}", node=node, owner=name)
                self._param_slots[name] = slot
                hook = lambda gs, s=slot: self._guarded(self._complete_param, s, gs)  # noqa: E731
                self._handles.append(node.register_prehook(hook))
            targets[(slot.node, 0)] = slot
        if not roots or not targets:
            return
        for (node, nr), slot in targets.items():
            if slot.kind != "call" or nr != 0:
                continue
            path, made = [], node
            while made is not None and made.name() in RESHAPE_OPS and len(made.next_functions) == 1:
                path.append(made)
                made = made.next_functions[0][0]
            if made is not None:
                self._producers[made] = (slot, path)
        layouts: dict[Any, Slot | None] = {}

        def slot_of(node, nr: int) -> Slot | None:
            """The slot that the edge (node, nr) reaches: a target, or a layout op on one (made here)."""
            hit = targets.get((node, nr))
            name = node.name()
            if hit is not None or nr != 0 or name not in FOLLOWED_OPS:
                return hit
            if node not in layouts:
                nxt = node.next_functions
                live = [k for k, (y, _) in enumerate(nxt) if y is not None]  # (a mask op's constant: no edge)
                single = len(nxt) == 1 or name in MASK_OPS or (name in NODE_OPS and live == [0])
                arg = live[0] if len(live) == 1 and single else None
                parent = slot_of(*nxt[arg]) if arg is not None else None
                slot = None
                if parent is not None:
                    slot = Slot("layout", None, None, parent.label, parent=parent, op=name, node=node, arg=arg)
                    hook = lambda gs, s=slot: self._guarded(self._flush_layout, s, gs)  # noqa: E731
                    self._handles.append(node.register_prehook(hook))
                layouts[node] = slot
            return layouts[node]

        seen: set = set()
        stack = list(roots)
        while stack:
            x = stack.pop()
            if x in seen:
                continue
            seen.add(x)
            # a layout op on a slot passes its input's shares on in its own pre-hook (_flush_layout)
            relay = layouts.get(x) is not None
            edges = []
            for k, (y, nr) in enumerate(x.next_functions):
                if y is None:
                    continue
                stack.append(y)
                if not relay:
                    slot = slot_of(y, nr)
                    if slot is not None:
                        edges.append((k, slot))
            if edges:
                hook = lambda gs, n=x, e=edges: self._guarded(self._consume, n, e, gs)  # noqa: E731
                self._handles.append(x.register_prehook(hook))

    # --- backward -------------------------------------------------------------------------------------
    def _guarded(self, fn, *args) -> None:
        """Run a hook's work; a failure disables the step's per-sample statistics, never the backward."""
        if not self.engine.active:
            return
        try:
            fn(*args)
        except Exception as e:
            self.engine.fail(f"per-sample engine disabled for this step (broadcast over the batch: {e})")

    def _consume(self, node, edges: list[tuple[int, Slot]], grads: tuple) -> None:
        """Pre-hook of a consumer: what it does with each candidate input, seen from its output gradient."""
        name = node.name()
        g = grads[0] if len(grads) == 1 else None
        made = self._producers.get(node)
        for k, slot in edges:
            if len(grads) != 1:
                self._note(slot, ("unknown", f"{_short(name)} (several outputs)"))
            elif g is None:
                continue
            elif made is not None:  # a layer's op on a shared tensor, whose output the batch shares too
                self._note(slot, ("relay", name, self._relayed(node, k, *made)))
            elif name in BROADCAST_OPS:
                if slot.shape is not None and tuple(g.shape) == slot.shape:
                    slot.plain.append(_short(name))
                else:  # the operand now: the node frees what it saved once it has run
                    self._note(slot, ("bcast", name, self._operand_grad(name, node, k, g)))
            elif name == "RepeatBackward0":
                self._note(slot, ("repeat", name, g, tuple(saved_attribute(node, "repeats"))))
            else:
                self._note(slot, ("other", name, tuple(g.shape)))

    def _note(self, slot: Slot, item: tuple) -> None:
        if slot.shape is None:
            slot.pending.append(item)
        else:
            self._resolve(slot, item)

    def _resolve(self, slot: Slot, item: tuple) -> None:
        kind = item[0]
        if kind == "unknown":
            slot.unknown.append(item[1])
        elif kind == "other":
            _, name, shape = item
            (slot.plain if shape == slot.shape else slot.unknown).append(_short(name))
        elif kind == "bcast":
            _, name, t = item
            if tuple(t.shape) == slot.shape:
                slot.plain.append(_short(name))
                return
            batch = self.engine.batch
            if batch is None:
                slot.unknown.append(f"{_short(name)} (no batch size known)")
                return
            share = per_example(t, slot.shape, batch)
            if isinstance(share, str):
                slot.unknown.append(f"{_short(name)} ({share})")
            else:
                slot.parts.append(share)
        elif kind == "relay":
            _, name, share = item
            if isinstance(share, str):
                slot.unknown.append(f"{_short(name)} ({share})")
            elif share is not None and share[0].numel() == math.prod(slot.shape):
                slot.parts.append(_placed(share, slot))
            elif share is not None:
                slot.unknown.append(f"{_short(name)} (its shares have {share[0].numel()} values, not {slot.shape})")
        elif kind == "repeat":
            _, name, t, repeats = item
            root = slot
            while root.parent is not None:
                root = root.parent
            if self.engine.batch in root.shape:  # (a tensor with an axis of the batch size: copies are not examples)
                self._resolve(slot, ("other", name, tuple(t.shape)))
                return
            share = per_copy(t, slot.shape, repeats, self.engine.batch)
            if isinstance(share, str):
                slot.unknown.append(f"{_short(name)} ({share})")
            elif share is None:
                slot.plain.append(_short(name))
            else:
                slot.parts.append(share)
        elif kind == "mask":
            _, child, share, g = item
            if child.shape != slot.shape and share is None:
                # the op broadcast the tensor (its condition brought the batch): split here, whatever uses its output
                self._resolve(slot, ("bcast", child.op, g))
                return
            if share is not None:  # (B, *its output) to (B, *this shape): summed over what it broadcast
                b, extra = share.shape[0], share.dim() - 1 - len(slot.shape)
                share = share.sum_to_size(b, *(1,) * extra, *slot.shape).reshape(b, *slot.shape)
            self._resolve(slot, ("layout", child, share))
        elif kind == "layout":
            _, child, share = item
            then = f"{_short(child.op)} then "
            slot.plain.extend(then + n for n in child.plain)
            slot.unknown.extend(then + n for n in child.unknown)
            if share is not None and (child.op in MASK_OPS or child.op in NODE_OPS):
                slot.parts.append(_placed(share, slot))  # (masked and summed, or through the node: _flush_layout)
            elif share is not None:
                slot.parts.append(_layout_back(child.op, child.node, share, slot.shape, *slot.like))

    @staticmethod
    def _relayed(node: Any, k: int, made: Slot, path: list[Any]) -> torch.Tensor | str | None:
        """The shares of input ``k`` of ``node``, the op that makes call slot ``made``'s output (through the layout
        nodes ``path``): ``made``'s shares back through them, in ``node``'s pre-hook (``made``'s consumers have all
        run: its shares are whole); None if nothing reached ``made``; why not, where ``made`` is not split."""
        if made.plain or made.unknown:
            return f"it makes {made.label}, which is not split into examples"
        if not made.parts:
            return None
        shares = sum(made.parts)
        for x in path:
            shares = through_node(x, shares)
        if _FIRST_OPERAND.get(node.name()) == k:
            return shares @ saved_attribute(node, "mat2").transpose(-1, -2)
        return through_node(node, shares, k)

    @staticmethod
    def _operand_grad(name: str, node, k: int, g: torch.Tensor) -> torch.Tensor:
        """dL/dy times the op's derivative with respect to its input k (still in y's shape)."""
        if name == "AddBackward0" and k == 1:
            alpha = saved_attribute(node, "alpha")
            return g if alpha == 1 else g * alpha
        if name == "SubBackward0" and k == 1:
            return g * -saved_attribute(node, "alpha")
        if name == "MulBackward0":
            return g * saved_attribute(node, "other" if k == 0 else "self")
        return g

    def _flush_layout(self, slot: Slot, grads: tuple) -> None:
        """Pre-hook of a layout op on a slot: its consumers have all run; pass their shares on."""
        g = grads[0] if len(grads) == 1 else None
        if g is None:
            return
        slot.shape, slot.like = tuple(g.shape), (g.dtype, g.device)
        for item in slot.pending:
            self._resolve(slot, item)
        slot.pending = []
        share = sum(slot.parts) if slot.parts else None
        if slot.op in MASK_OPS:  # (its condition now: the node frees what it saved once it has run)
            cond = saved_attribute(slot.node, "condition")
            zero = g.new_zeros(())
            g = torch.where(cond, g, zero) if slot.arg == 0 else torch.where(cond, zero, g)
            if share is not None:
                share = torch.where(cond, share, zero) if slot.arg == 0 else torch.where(cond, zero, share)
            self._note(slot.parent, ("mask", slot, share, g))
            return
        if share is not None and slot.op in NODE_OPS:  # (now: once the node has run, it may have freed what it saved)
            share = through_node(slot.node, share)
        self._note(slot.parent, ("layout", slot, share))

    def _shares(self, slot: Slot, summed: torch.Tensor) -> torch.Tensor | str | None:
        """The slot's shares (B, *shape); None if no consumer broadcast it over the batch; or why it
        cannot be split."""
        batch = self.engine.batch
        if batch == 1:  # the sum over one example is that example's share
            broadcast = slot.kind == "param" or all(size != 1 for size in slot.shape)
            return summed.reshape(1, *slot.shape) if broadcast else None
        if not slot.parts:
            return None
        if slot.plain or slot.unknown:
            other = ", ".join(sorted(set(slot.plain + slot.unknown)))
            return (
                f"{slot.label} is broadcast over the batch but also used by {other}, which the per-sample "
                "engine cannot split into examples"
            )
        shares = sum(slot.parts)
        if summed.dtype in (torch.float16, torch.bfloat16):
            self.low_precision = True
        self._sums.append((slot.label, shares.sum(0), summed))
        return shares

    def complete_call(self, module: nn.Module, idx: int, summed: torch.Tensor) -> torch.Tensor | str | None:
        """At the call's output gradient (all its consumers have run): the call's per-example output
        gradients (B, *out.shape); None to serve it as an ordinary call; or why it cannot be served."""
        slot = self._calls.pop((module, idx), None)
        if slot is None:
            return None
        shares = self._shares(slot, summed)
        if shares is not None and getattr(module, "scale_grad_by_freq", False):
            return (
                f"{slot.label} is broadcast over the batch and its Embedding has scale_grad_by_freq=True, whose "
                "backward divides by counts over the shared indices: per-sample statistics are skipped"
            )
        return shares

    def has_results(self, names: Any) -> bool:
        """Whether any of these bare parameters was resolved or failed this step."""
        return any(n in self.params or n in self.param_failures for n in names)

    def _complete_param(self, slot: Slot, grads: tuple) -> None:
        g = grads[0] if grads else None
        if g is None or slot.owner in self.params or slot.owner in self.param_failures:
            return
        got = self._shares(slot, g)
        if isinstance(got, torch.Tensor):
            self.params[slot.owner] = got
            return
        if got is None:
            found = sorted(set(slot.plain + slot.unknown))
            got = f"{slot.label} is used by {', '.join(found)}" if found else f"{slot.label} was not found"
            got += " (the per-sample engine splits a bare parameter into examples where it is broadcast over the batch)"
        self.param_failures[slot.owner] = got

    def check(self) -> DeferredCheck | None:
        """After backward: the condition that every broadcast tensor's shares add up to the gradient
        autograd summed for it, decided with the step's values on the host (None: nothing broadcast)."""
        sums, self._sums = self._sums, []
        if not sums:
            return None
        rtol = SUM_RTOL[1] if self.low_precision else SUM_RTOL[0]
        errs = torch.stack([(a.double() - b.double()).norm() for _, a, b in sums])
        scales = torch.stack([b.double().norm() + a.double().norm() for _, a, b in sums])
        labels = [label for label, _, _ in sums]

        def verdict(host: np.ndarray) -> str | None:
            errs, scales = host[: len(labels)], host[len(labels) :]
            bad = [label for label, e, s in zip(labels, errs, scales, strict=True) if not e <= rtol * s]
            if not bad:
                return None
            return (
                f"the per-example shares of {', '.join(bad)} (broadcast over the batch) do not add up to the "
                "gradient autograd summed for it: it is also used outside the model's forward or by an op the "
                "per-sample engine did not see. Per-sample statistics are skipped for this step"
            )

        return DeferredCheck(torch.cat([errs, scales]), verdict)


def expand_over_batch(capture: Any, batch: int) -> Any:
    """A call's capture with every tensor expanded over a new leading batch axis (no copy): the inputs
    of a call whose output is broadcast over the batch, as each example saw them."""
    return tree_map(lambda t: t.expand(batch, *t.shape) if torch.is_tensor(t) else t, capture)


def dropout_active(module: nn.Module) -> bool:
    """Whether a dropout module in train mode with p > 0 sits inside ``module`` (a recomputation by
    torch.func would draw other masks than the step did)."""
    kinds = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
    return any(isinstance(m, kinds) and m.training and m.p > 0 for m in module.modules())
