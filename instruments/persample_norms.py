"""PerSampleGradNorms: the distribution of per-sample gradient norms."""

from __future__ import annotations

import numpy as np
from cockpit_lite.instruments._util import quantile_records

from cockpit_lite import Instrument, Need


class PerSampleGradNorms(Instrument):
    """||g_i|| for each sample i of the batch, g_i the gradient of the per-sample loss l_i.

    Computed from per-layer factors without materialising g_i (REFERENCE.md section 2): for a linear
    layer with input a_i and output gradient e_i, ||g_i||^2 = ||a_i||^2 ||e_i||^2.
    Tags: ``persample/grad_norm`` (B values), ``persample/grad_norm/{p5,p25,p50,p75,p95,max,mean}``;
    with ``per_param=True`` also ``persample/grad_norm/<parameter name>`` (B values each).
    Reading: a long upper tail means a few samples dominate the step (outliers, mislabels).
    """

    NEEDS = frozenset({Need.PER_SAMPLE_SQ_NORMS})

    def __init__(self, per_param: bool = False, **kw):
        super().__init__(**kw)
        self.per_param = per_param

    def compute(self, record):
        if record.per_sample_sq_norms is None:
            return {}
        norms = np.sqrt(np.maximum(record.per_sample_sq_norms, 0.0))
        out = {self.tag("persample/grad_norm"): norms}
        out.update({self.tag(k): v for k, v in quantile_records("persample/grad_norm", norms).items()})
        if self.per_param:
            for n, sq in record.per_sample_sq_norms_by_param.items():
                out[self.tag(f"persample/grad_norm/{n}")] = np.sqrt(np.maximum(sq, 0.0))
        return out
