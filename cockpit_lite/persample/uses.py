"""Parameters the model's forward uses outside the calls of the layers that serve them.

The per-sample engine sees a parameter through the calls of the layer that serves it (its hooks). A
forward that also uses the parameter some other way — a method that skips the layer's hooks (ProphetNet's
``position_embeddings._forward``), a functional use of its weight (``F.linear(h, layer.weight)``, logits by
``h @ embed.weight.T``) — gives ``p.grad`` a term no view holds: per-sample gradients of that layer would
miss it. Such a use is found in the graph of the forward, before any gradient exists: a node of the graph
behind the model's outputs that takes the parameter as input and lies inside none of the serving layer's
calls. A term added outside the model's forward (a regulariser in the training loop) is not behind the
model's outputs and is not a use here (the gradient-sum check says that one; its numbers describe the loss
module's term exactly).

A call's inside is the graph from its outputs back to its inputs (the nodes of its tensor arguments stop the
walk). A call that reads a tensor from outside without taking it as an argument (a cached bias) lets the
walk through: the nodes beyond then count as inside, which only makes the test lenient (the gradient-sum
check still runs).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from cockpit_lite.compat import graph_nodes, tree_leaves
from cockpit_lite.persample.broadcast import LAYOUT_OPS


def call_nodes(outs: Sequence[torch.Tensor], args: tuple, kwargs: dict) -> tuple[tuple[Any, ...], frozenset[Any]]:
    """(the nodes of a layer call's outputs, the nodes of its tensor arguments that require grad): what
    :func:`outside_uses` walks between."""
    heads = tuple(t.grad_fn for t in outs if t.grad_fn is not None)
    edge = torch.autograd.graph.get_gradient_edge
    bounds = frozenset(edge(t).node for t in tree_leaves((args, kwargs)) if torch.is_tensor(t) and t.requires_grad)
    return heads, bounds


#: autograd nodes of ops that only re-view or re-type a tensor: an argument of a call made of a parameter by these
#: alone is the parameter itself, handed in (DBRX's experts get their slices of the weights as arguments): the
#: broadcast tracker's layout ops but a clone, and the other views
VIEW_NODES = (LAYOUT_OPS - {"CloneBackward0"}) | {
    "AsStridedBackward0", "ExpandBackward0", "NarrowBackward0", "SplitBackward0", "SplitWithSizesBackward0",
    "UnbindBackward0",
}  # fmt: skip


def _inside(heads: Iterable[Any], bounds: frozenset[Any], wanted: set[Any]) -> set[Any]:
    """The nodes of ``wanted`` found walking from a call's ``heads`` towards its inputs: up to its arguments'
    nodes ``bounds``, and past them through views of a parameter handed in as an argument (stops once all are
    found)."""
    found: set[Any] = set()
    stack: list[tuple[Any, bool]] = [(h, False) for h in heads]
    seen: set[tuple[Any, bool]] = set()
    while stack and len(found) < len(wanted):
        node, argument = stack.pop()
        if node is None:
            continue
        argument = argument or node in bounds  # (from here on: an argument's own graph)
        if (node, argument) in seen or (argument and node.name() not in VIEW_NODES):
            continue
        seen.add((node, argument))
        if node in wanted:
            found.add(node)
        stack.extend((n, argument) for n, _ in node.next_functions)
    return found


def outside_uses(
    output: Any,
    calls: Sequence[tuple[Any, tuple[Any, ...], frozenset[Any]]],
    served: Mapping[Any, Sequence[tuple[torch.nn.Parameter, str]]],
) -> dict[Any, list[str]]:
    """{layer: names of its parameters used outside its calls} for the layers ``served`` maps to their
    parameters (full names), from the graph behind the model's ``output`` and the layers' ``calls`` of this
    forward ((layer, :func:`call_nodes`) each). A parameter served by several layers (tied weights) is used
    inside where it is inside a call of any of them."""
    owners: dict[int, list[Any]] = {}
    names: dict[int, str] = {}
    for layer, params in served.items():
        for p, name in params:
            owners.setdefault(id(p), []).append(layer)
            names[id(p)] = name
    consumers: dict[int, set[Any]] = {}
    for node in graph_nodes(tree_leaves(output)):
        for nxt, _ in node.next_functions:
            var = getattr(nxt, "variable", None)  # (an AccumulateGrad node: its parameter)
            if var is not None and id(var) in owners:
                consumers.setdefault(id(var), set()).add(node)
    by_layer: dict[Any, list[tuple[Any, frozenset[Any]]]] = {}
    for layer, heads, bounds in calls:
        by_layer.setdefault(layer, []).append((heads, bounds))
    out: dict[Any, list[str]] = {}
    for pid, nodes in consumers.items():
        left = set(nodes)
        for layer in owners[pid]:
            for heads, bounds in by_layer.get(layer, ()):
                left -= _inside(heads, bounds, left)
                if not left:
                    break
            if not left:
                break
        if left:
            for layer in owners[pid]:
                out.setdefault(layer, []).append(names[pid])
    return out
