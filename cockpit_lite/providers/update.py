"""Need.UPDATE: d = theta_{t+1} - theta_t per tensor, from a snapshot taken in the step pre-hook."""

from __future__ import annotations

import torch

from cockpit_lite.compat import foreach_copy_
from cockpit_lite.needs import Need
from cockpit_lite.providers import register_provider
from cockpit_lite.providers.base import Context, Provider
from cockpit_lite.step import StepRecord


@register_provider
class UpdateProvider(Provider):
    """``record.update``: buffers allocated once (no page faults per step) hold theta_t, then d."""

    PROVIDES = frozenset({Need.UPDATE})

    def __init__(self, context: Context):
        super().__init__(context)
        self.buffers: list[torch.Tensor] | None = None
        self.taken = False

    def on_before_step(self, record: StepRecord) -> None:
        params = list(self.context.params.values())
        with self.context.costs.region("snapshot"):
            if self.buffers is None:
                self.buffers = [torch.empty_like(p) for p in params]
            foreach_copy_(self.buffers, [p.detach() for p in params])
        self.taken = True

    @torch.no_grad()
    def on_after_step(self, record: StepRecord) -> None:
        if not self.taken:
            return
        self.taken = False
        for p, buf in zip(self.context.params.values(), self.buffers, strict=True):
            torch.sub(p.detach(), buf, out=buf)  # the snapshot buffer now holds the update
        record.update = dict(zip(self.context.params, self.buffers, strict=True))

    def close(self) -> None:
        self.buffers = None
