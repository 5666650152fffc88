"""Loss: the batch loss and the distribution of per-sample losses."""

from __future__ import annotations

from cockpit_lite.instruments._util import quantile_records

from cockpit_lite import Instrument, Need
from cockpit_lite.panels import QuantilePanel


class Loss(Instrument):
    """Batch loss L and per-sample losses l_i (derived from the loss module, L = mean_i l_i for
    reduction="mean", sum_i l_i for "sum").

    Tags: ``loss``; with ``per_sample=True`` also ``loss/per_sample`` (the B values) and its quantiles
    ``loss/per_sample/{p5,p25,p50,p75,p95,max,mean}``.
    Cost: one extra evaluation of the loss module with reduction="none" (negligible).
    """

    TAGS = {
        "loss": "batch loss L",
        "loss/per_sample": "per-sample losses l_i (B values)",
        "loss/per_sample/(p5|p25|p50|p75|p95|max|mean)": "quantiles of the per-sample losses",
    }
    PANELS = (
        QuantilePanel(
            "loss/per_sample",
            "loss",
            title="Training loss",
            ylabel="loss",
            scalar_label="batch loss",
            what="per-sample loss",
            missing="not tracked: add the Loss instrument (tag `loss`)",
            key="loss",
        ),
    )
    CHARTS = {
        "Loss": {
            "batch loss": ["Multiline", ["^loss$"]],
            "per-sample loss: median, 5% and 95% quantiles": [
                "Margin",
                ["loss/per_sample/p50", "loss/per_sample/p5", "loss/per_sample/p95"],
            ],
        },
    }
    SUMMARY = (("loss", "batch loss"), ("loss/per_sample/p95", "per-sample loss, 95% quantile"))
    ORDER = 10.0

    def __init__(self, per_sample: bool = True, **kw):
        super().__init__(**kw)
        self.per_sample = per_sample
        self.NEEDS = frozenset({Need.LOSS, Need.PER_SAMPLE_LOSS} if per_sample else {Need.LOSS})

    def compute(self, record):
        if record.loss is None:
            return {}
        out = {self.tag("loss"): record.loss}
        if self.per_sample and record.per_sample_loss is not None:
            tag = self.tag("loss/per_sample")
            out[tag] = record.per_sample_loss
            out.update(quantile_records(tag, record.per_sample_loss))
        return out
