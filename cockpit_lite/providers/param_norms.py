"""``"param_norms"``: ||theta_t|| per parameter tensor, before the optimizer steps.

The worked example of docs/design.md ("Adding a need"): this file and tests/test_provider_param_norms.py
are the whole change. An instrument asks with ``NEEDS = frozenset({PARAM_NORMS})`` and reads
``record.get(PARAM_NORMS)``; e.g. the update-to-parameter ratio ||theta_{t+1} - theta_t|| / ||theta_t||.
"""

from __future__ import annotations

from cockpit_lite import distributed
from cockpit_lite.providers import register_provider
from cockpit_lite.providers.base import Provider
from cockpit_lite.step import StepRecord

PARAM_NORMS = "param_norms"


@register_provider
class ParamNormsProvider(Provider):
    """{name: ||theta_t||} in the step pre-hook (one fused norm, one transfer)."""

    PROVIDES = frozenset({PARAM_NORMS})

    def on_before_step(self, record: StepRecord) -> None:
        names = list(self.context.params)
        with self.context.costs.region(PARAM_NORMS):
            values = distributed.norms([self.context.params[n].detach() for n in names])  # FSDP2: by shards
        record.provided[PARAM_NORMS] = dict(zip(names, values, strict=True))
