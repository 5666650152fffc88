"""Need.UPDATE: d = theta_{t+1} - theta_t per tensor, from a snapshot taken in the step pre-hook.

Under FSDP2 (parameters are DTensors) each rank snapshots and differences its own shards: ``record.update``
holds DTensors over those shards (parameter-sized only as the parameters are: one shard per rank), and
``record.update_norms`` is filled here from the shards' squared norms by one all-reduce
(:func:`cockpit_lite.distributed.norms`)."""

from __future__ import annotations

import torch

from cockpit_lite import distributed, host
from cockpit_lite.compat import foreach_copy_, foreach_difference_from_, same_place, without_grad
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
        self.sharded = context.sharded

    @without_grad
    def on_before_step(self, record: StepRecord) -> None:
        params = list(self.context.params.values())
        if self.sharded:
            params = [distributed.local(p) for p in params]
        with self.context.costs.region("snapshot"):
            first = params[0] if params else None
            if self.buffers is None or (first is not None and not same_place(self.buffers[0], first)):
                # (allocated once; again if the model moved to another device or dtype, or the trained
                # parameters changed: params_changed)
                self.buffers = [torch.empty_like(p) for p in params]
            foreach_copy_(self.buffers, params)
        self.taken = True

    @without_grad
    def on_after_step(self, record: StepRecord) -> None:
        if not self.taken:
            return
        self.taken = False
        params = self.context.params
        now = [distributed.local(p) for p in params.values()] if self.sharded else list(params.values())
        foreach_difference_from_(self.buffers, now)  # the buffers now hold the update
        if not self.sharded:
            record.update = dict(zip(params, self.buffers, strict=True))
            # ||d|| per tensor (every instrument that asks for the update reads them): fused now, its
            # values with the step's other numbers
            record._update_norms = host.norms(record.host, list(params), self.buffers)
            return
        from torch.distributed.tensor import DTensor

        update = {
            n: DTensor.from_local(buf, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
            if distributed.is_sharded(p)
            else buf
            for (n, p), buf in zip(params.items(), self.buffers, strict=True)
        }
        # the norms first: a DTensor's own norm would start a collective (a rank without a cockpit never joins)
        norms = distributed.norms(list(update.values()))
        record.update, record._update_norms = update, dict(zip(update, norms, strict=True))

    def params_changed(self) -> None:
        self.buffers = None

    def close(self) -> None:
        self.buffers = None
