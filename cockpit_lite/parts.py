"""A model whose own forward the loop never calls: it calls the model's parts (``model.encoder(x)``, then
``model.head(h)``). The Cockpit begins a step at its model's forward; :class:`PartCalls` hands it, instead, each
step's first grad-enabled call of a part holding trained parameters as the model's call (its input's axis 0 is
the batch; backward is seen where it reaches that call's outputs). Armed once per step and again after each
backward (a loop with several forward/backward passes per step: gradient accumulation).

The Cockpit switches to it on its own where the optimizer steps with no step begun (``Cockpit._no_forward``), and
Lightning's callback uses it for ``training_step`` calling parts of the LightningModule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cockpit_lite.errors import warn
from cockpit_lite.hooks import SharedHook
from cockpit_lite.pause import is_paused


class PartCalls:
    """Forward hooks on every submodule of ``root`` holding a parameter whose id is in ``trained``; while armed,
    the first grad-enabled call among them is handed to ``cockpit`` (``model_called``, then ``model_returned``
    when that call returns). A part called inside itself is followed to its outermost return."""

    def __init__(self, root: nn.Module, trained: set[int], cockpit: Any = None):
        self.root, self.trained, self.cockpit = root, trained, cockpit
        self.armed, self.call, self.depth = False, None, 0
        self.warned: set[str] = set()
        self.handles = [root.register_forward_pre_hook(SharedHook(self._pre), with_kwargs=True)]
        for m in root.modules():
            if m is not root and any(id(p) in trained for p in m.parameters()):
                self.handles.append(m.register_forward_pre_hook(SharedHook(self._pre), with_kwargs=True))
                self.handles.append(m.register_forward_hook(SharedHook(self._post), with_kwargs=True))

    def arm(self) -> None:
        self.armed, self.call, self.depth = bool(self.handles), None, 0

    def disarm(self) -> None:
        self.armed = False

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.armed = [], False

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module is self.call:
            self.depth += 1  # the same module called inside itself
        if not self.armed or is_paused() or not torch.is_grad_enabled():
            return
        self.armed = False
        try:
            self._take(module, args, kwargs)
        except Exception as e:
            self._failed(e)

    def _take(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The first call since :meth:`arm`: hand it over (the root's own call the Cockpit's hooks see)."""
        if module is self.root:
            return
        self.call, self.depth = module, 0
        self.cockpit.model_called(args, kwargs)

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if module is not self.call:
            return
        if self.depth:
            self.depth -= 1
            return
        self.call = None
        try:
            self.cockpit.model_returned(args, kwargs, output)
        except Exception as e:
            self._failed(e)

    def _failed(self, e: Exception) -> None:
        msg = f"handing the module's call to the Cockpit failed ({type(e).__name__}: {e}); training is unaffected"
        if msg not in self.warned:
            self.warned.add(msg)
            warn(msg, stacklevel=4)
