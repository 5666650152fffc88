"""Hook callables that survive ``copy.deepcopy`` of the module they are registered on, and the
gradient hook the cockpit puts on tensors of the forward.

``deepcopy(model)`` copies a module's hook dictionaries; a bound method there would drag a deep copy of
the whole cockpit along (and fail on its open log files). A :class:`SharedHook` copies as itself, so a
copy of the model calls the original cockpit, whose identity checks then ignore it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch


def on_gradient(t: torch.Tensor, fn: Callable[[torch.Tensor], Any]) -> None:
    """Call ``fn(grad)`` when backward has the gradient of the non-leaf tensor ``t`` (what flows
    on: the gradient after the tensor hooks of ``t``, e.g. a user's rescaling hook); ``fn``'s return
    value is ignored. An in-place op on ``t`` later in the forward leaves it the gradient of ``t``
    before that op, as :meth:`torch.Tensor.register_hook` does.

    A pre-hook on the node that made ``t`` (``t.grad_fn.register_prehook``: the node's hook dict and
    handle) rather than ``t.register_hook`` (the same plus the tensor's own hook dict and checks, about
    twice the Python calls; a plain tensor's hooks are pre-hooks of that node too). Leaves and tensor
    subclasses (``__torch_function__`` may redirect hooks) take ``register_hook``. Not for a tensor
    that is an ``inputs`` of ``torch.autograd.grad``: backward stops there and its node never runs."""
    node = t.grad_fn if type(t) is torch.Tensor else None
    if node is None:
        t.register_hook(fn)
        return
    nr = t.output_nr

    def hook(grads: tuple) -> None:
        g = grads[nr]
        if g is not None:  # (an output of a multi-output node that got no gradient)
            fn(g)

    node.register_prehook(hook)


class SharedHook(functools.partial):
    """``SharedHook(fn)`` calls ``fn`` (a ``functools.partial`` without arguments: called from C, no
    Python frame of its own); a deep or shallow copy is the hook itself, a pickle a no-op."""

    __slots__ = ()

    def __deepcopy__(self, memo: dict) -> SharedHook:
        return self

    def __copy__(self) -> SharedHook:
        return self

    def __reduce__(self):  # a pickled model with hooks attached loads with no-op hooks in their place
        return (_noop_hook, ())


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _noop_hook() -> Callable[..., None]:
    """What a pickled :class:`SharedHook` loads as: a hook that does nothing."""
    return _noop
