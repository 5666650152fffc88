"""PerSampleGradNorms: the distribution of per-sample gradient norms."""

from __future__ import annotations

import numpy as np
from cockpit_lite.instruments._util import quantile_records
from cockpit_lite.instruments.panels import PerSampleHistPanel

from cockpit_lite import Instrument, Need
from cockpit_lite.panels import QuantilePanel


class PerSampleGradNorms(Instrument):
    """||g_i|| for each sample i of the batch, g_i the gradient of the per-sample loss l_i.

    Computed from per-layer factors without materialising g_i (REFERENCE.md section 2): for a linear
    layer with input a_i and output gradient e_i, ||g_i||^2 = ||a_i||^2 ||e_i||^2.
    Tags: ``persample/grad_norm`` (B values), ``persample/grad_norm/{p5,p25,p50,p75,p95,max,mean}``;
    with ``per_param=True`` also ``persample/grad_norm/<parameter name>`` (B values each).
    Reading: a long upper tail means a few samples dominate the step (outliers, mislabels).
    """

    TAGS = {
        "persample/grad_norm": "||g_i|| (B values)",
        "persample/grad_norm/(p5|p25|p50|p75|p95|max|mean)": "quantiles of ||g_i||",
        "persample/grad_norm/.+": "||g_i|| per parameter tensor (per_param=True)",
        "persample/coverage": "share of sum_p ||p.grad||^2 in parameters with per-sample statistics (1: all)",
    }
    PANELS = (
        QuantilePanel(
            "persample/grad_norm",
            title="Per-sample gradient norms ||g_i|| over time",
            ylabel="||g_i||",
            what="per-sample",
            missing="not tracked: add the PerSampleGradNorms instrument (`persample/grad_norm`)",
            key="persample_norms",
        ),
        PerSampleHistPanel(),
    )
    CHARTS = {
        "Per-sample gradients": {
            "per-sample gradient norm: median, 5% and 95%": [
                "Margin",
                ["persample/grad_norm/p50", "persample/grad_norm/p5", "persample/grad_norm/p95"],
            ],
            "per-sample gradient norm: max and mean": [
                "Multiline",
                ["^persample/grad_norm/max$", "^persample/grad_norm/mean$"],
            ],
        },
    }
    SUMMARY = (
        ("persample/grad_norm/p50", "per-sample gradient norm, median"),
        ("persample/grad_norm/max", "per-sample gradient norm, max"),
    )
    ORDER = 60.0

    NEEDS = frozenset({Need.PER_SAMPLE_SQ_NORMS})

    def __init__(self, per_param: bool = False, **kw):
        super().__init__(**kw)
        self.per_param = per_param
        if per_param:  # rows per tensor only where they are shown (the total is one row summed on the device)
            self.NEEDS = frozenset({Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_SQ_NORMS_BY_PARAM})

    def compute(self, record):
        if record.per_sample_sq_norms is None:
            return {}
        norms = np.sqrt(np.maximum(record.per_sample_sq_norms, 0.0))
        out = {self.tag("persample/grad_norm"): norms}
        if record.per_sample_uncovered is not None:
            out[self.tag("persample/coverage")] = 1.0 - sum(record.per_sample_uncovered.values())
        out.update(quantile_records(self.tag("persample/grad_norm"), norms))
        if self.per_param:
            for n, sq in record.per_sample_sq_norms_by_param.items():
                out[self.tag(f"persample/grad_norm/{n}")] = np.sqrt(np.maximum(sq, 0.0))
        return out
