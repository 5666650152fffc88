"""What the Cockpit reads of the user's model and loop: the examples of a model call, the tensors of
its output, whether gradients are there, and the step of ``optimizer.step(closure)``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from cockpit_lite.compat import saved_attribute, stacked_norms, tree_leaves
from cockpit_lite.pause import paused


def batch_of(args: tuple, kwargs: Mapping[str, Any]) -> int | None:
    """Examples in a model call: axis 0 of its first tensor input with a batch axis."""
    for t in (*args, *kwargs.values()):
        if torch.is_tensor(t) and t.dim() > 0:
            return int(t.shape[0])
    return None


def tensors_of(output: Any) -> list[torch.Tensor]:
    """The tensors in a model's output: a tensor, a tuple or list, a dict or a Hugging Face ModelOutput."""
    if type(output) is torch.Tensor:
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    return [t for t in tree_leaves(output) if torch.is_tensor(t)]


#: the key under which a model output's autograd node holds (its model call's position, its rows) (``Node.metadata``)
OUTPUT_OF = "cockpit_lite.output_of"

#: reshapes that keep an example's elements together and the examples in order (no permutation of axes)
_RESHAPES = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"})


def mark_output(t: torch.Tensor, index: int) -> None:
    """Mark the node that made model output ``t`` (of the step's model call ``index``): a loss over a selection
    of its rows is told by it (:func:`selected_rows`), however the output tensor itself was dropped."""
    node = t.grad_fn
    if node is not None and t.dim() > 0:
        node.metadata[OUTPUT_OF] = (index, t.shape[0])


def _through_reshapes(node: Any) -> Any:
    for _ in range(8):
        if node is None or type(node).__name__ not in _RESHAPES or not node.next_functions:
            return node
        node = node.next_functions[0][0]
    return node


def selected_rows(node: Any, call: int | None) -> torch.Tensor | None:
    """Where ``node`` made ``out[index]`` from an output of model call ``call`` (marked by :func:`mark_output`),
    one index on the leading axis, the example (row of the output) each selected row belongs to, in order;
    else None. ``node``: a loss's prediction's ``grad_fn``. Reshapes that keep the examples in order are looked
    through on either side: ``out[mask]``, ``out[idx]``, ``out.view(B, T, V)[mask].reshape(-1, V)`` (the selected
    examples' tokens follow in order) and ``out.view(B T, V)[token_mask]`` (each token row is its example's:
    B T rows of B examples)."""
    node = _through_reshapes(node)
    if call is None or node is None or type(node).__name__ != "IndexBackward0":
        return None
    try:
        (index,) = saved_attribute(node, "indices")
        rows = saved_attribute(node, "self_sym_sizes")[0]
    except (ValueError, RuntimeError, AttributeError, IndexError):  # several indices, or the graph already freed
        return None
    source = _through_reshapes(node.next_functions[0][0])
    marked = source.metadata.get(OUTPUT_OF) if source is not None else None
    if not torch.is_tensor(index) or index.dim() != 1 or marked is None or marked[0] != call:
        return None
    examples = marked[1]
    if examples <= 0 or rows % examples or (index.dtype == torch.bool and len(index) != rows):
        return None
    picked = index.detach().nonzero().squeeze(1) if index.dtype == torch.bool else index.detach().long()
    return picked // (rows // examples)  # (the leading axis holds each example's rows // examples rows in turn)


def any_grad(params: Mapping[str, nn.Parameter]) -> bool:
    """Whether any parameter holds a gradient other than None or zeros (one fused reduction, read on the
    host: on CUDA a synchronisation)."""
    grads = [p.grad for p in params.values() if p.grad is not None]
    return bool(grads) and bool(stacked_norms(grads).any())


def grad_marks(params: Mapping[str, nn.Parameter]) -> tuple:
    """(parameter, its gradient, that tensor's version counter, the parameter's) for every parameter with a
    gradient."""
    return tuple([(p, p.grad, p.grad._version, p._version) for p in params.values() if p.grad is not None])


def moved_since(marks: tuple) -> bool:
    """Whether a parameter :func:`grad_marks` saw was changed in place since (SAM's ascent step, ``p.add_(e)``,
    between a backward and the next forward without an optimizer step)."""
    return any(p._version != v for p, _, _, v in marks)


def zeroed_since(params: Mapping[str, nn.Parameter], marks: tuple) -> bool:
    """Whether every gradient is None or zero, knowing what :func:`grad_marks` saw at the end of the
    last backward: the same tensors at the same versions were not touched (no zeroing: the loop
    accumulates); all None were zeroed (``zero_grad()``, ``set_to_none``); only otherwise (zeroed or
    changed in place) are the values read (:func:`any_grad`)."""
    if marks and all(p.grad is g and g._version == v for p, g, v, _ in marks):
        return False
    if all(p.grad is None for p in params.values()):
        return True
    return not any_grad(params)


def step_closure(closure: Callable[[], Any], gradients_final: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap the closure of ``optimizer.step(closure)`` (Lightning's automatic optimization, LBFGS): its
    first call is the step's forward and backward, after which ``gradients_final()`` runs (p.grad is
    what the optimizer gets); later calls (LBFGS' line search, at other parameters) are no part of the
    step and run unseen (``paused()``)."""
    calls = []

    def wrapped() -> Any:
        calls.append(1)
        if len(calls) > 1:
            with paused():
                return closure()
        out = closure()
        gradients_final()
        return out

    return wrapped
