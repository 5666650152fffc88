"""Need.LOSS and Need.PER_SAMPLE_LOSS: the batch loss, batch size and reduction from the loss module's
call, and the per-sample losses derived from it (:func:`cockpit_lite.losses.per_sample_losses`)."""

from __future__ import annotations

import math

from cockpit_lite.losses import per_sample_losses
from cockpit_lite.needs import Need, Needs
from cockpit_lite.providers import register_provider
from cockpit_lite.providers.base import LossCall, Provider
from cockpit_lite.step import StepRecord


@register_provider
class LossProvider(Provider):
    """L (``record.loss``), B (``record.batch_size``), the reduction, and l_i with L = mean_i l_i
    ("mean") or sum_i l_i ("sum") in ``record.per_sample_loss``."""

    PROVIDES = frozenset({Need.LOSS, Need.PER_SAMPLE_LOSS})
    ORDER = 0
    ALWAYS = True  # the loss of every tracked step is recorded; per-sample losses only when asked

    def begin_step(self, record: StepRecord, needs: Needs) -> None:
        self.per_sample = Need.PER_SAMPLE_LOSS in needs.flags
        self.calls = 0

    def on_loss(self, record: StepRecord, call: LossCall) -> None:
        self.calls += 1
        out, args, kwargs = call.output, call.args, call.kwargs
        pred = args[0] if args else next(iter(kwargs.values()))
        record.batch_size = int(pred.shape[0]) if pred.dim() > 0 else 1
        record.reduction = call.module.reduction
        record.loss = float(out.detach())
        if not math.isfinite(record.loss):
            record.add_note(f"non-finite loss {record.loss}", self.PROVIDES)
        if self.per_sample:
            record.per_sample_loss = per_sample_losses(call.module, args, kwargs).double().cpu().numpy()
