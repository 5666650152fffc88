"""Need.LEARNING_RATES: the learning rate of each optimizer parameter group at this step."""

from __future__ import annotations

from cockpit_lite.providers import register_provider
from cockpit_lite.providers.base import Provider
from cockpit_lite.step import StepRecord

LEARNING_RATES = "learning_rates"


@register_provider
class LearningRatesProvider(Provider):
    """``record.lrs``: ``group["lr"]`` of every parameter group, read in the step pre-hook (after the
    scheduler of the previous step, as the optimizer uses them). Always active: it costs nothing."""

    PROVIDES = frozenset({LEARNING_RATES})
    ALWAYS = True

    def on_before_step(self, record: StepRecord) -> None:
        record.lrs = [float(g["lr"]) for g in self.context.optimizer.param_groups if "lr" in g]
