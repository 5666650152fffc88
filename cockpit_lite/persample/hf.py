"""Handlers for Hugging Face transformers layers, registered only where transformers is in use.

transformers is not a dependency of cockpit-lite: this module is imported (and :func:`register` called)
when handlers are built and ``transformers.pytorch_utils`` has already been imported, i.e. when a model
may hold its layers. LayerNorm, Embedding and Linear (with tied input and output embeddings) are the
built-in handlers'.
"""

from __future__ import annotations

from transformers.pytorch_utils import Conv1D

from cockpit_lite.persample.layers import HANDLERS, LinearHandler, register_handler
from cockpit_lite.persample.views import FactorView, TransposedFactorView


class Conv1DHandler(LinearHandler):
    """GPT-2's ``Conv1D``: y = x W + b with W of shape (in, out), at T positions. The factor pair is the
    Linear one (inputs a (B, T, in), output gradients e (B, T, out)), with g_i(W) = sum_t a_it e_it^T
    (:class:`~cockpit_lite.persample.views.TransposedFactorView`): no B x in x out unless it is cheaper."""

    def _transposed(self, linear: FactorView) -> TransposedFactorView:
        return TransposedFactorView(linear.a, linear.e, linear.w, linear.b, tuple(self.module.weight.shape))

    def single_view(self, capture, grad, batch, inv_scale):
        linear = self._flat_view(capture, grad, batch, inv_scale)
        return None if linear is None else self._transposed(linear)

    def view(self, captures, grads, batch, inv_scale):
        return self._transposed(super().view(captures, grads, batch, inv_scale))


def register() -> None:
    """Serve ``Conv1D`` by :class:`Conv1DHandler`, unless a handler is registered for it already."""
    if Conv1D not in HANDLERS:
        register_handler(Conv1D, Conv1DHandler)
