"""GradNorm: the norm of the mini-batch gradient the optimizer receives."""

from __future__ import annotations

from cockpit_lite import Instrument, Need
from cockpit_lite.panels import LinePanel

#: one panel for GradNorm and UpdateSize (both declare it; it is drawn once)
GRAD_AND_UPDATE = LinePanel(
    "Gradient norm and update size",
    ["grad_norm", "update_size"],
    ylabel="Euclidean norm",
    labels=["gradient norm ||grad L||", "update size ||θ(t+1) − θ(t)||"],
    log_ratio=10.0,
    missing="not tracked: add GradNorm (`grad_norm`) and UpdateSize (`update_size`)",
    key="grad_norm_update",
)


class GradNorm(Instrument):
    """||p.grad|| per parameter tensor and globally, sqrt(sum_l ||grad_l||^2) (Cockpit's GradNorm).

    Read in the optimizer's step pre-hook, so clipping done by the loop between backward and step is
    included. Tags: ``grad_norm``, and with ``per_param=True`` ``grad_norm/<parameter name>``.
    Cost: one fused norm over the gradients.
    """

    TAGS = {"grad_norm": "global gradient norm", "grad_norm/.+": "per parameter tensor"}
    PANELS = (GRAD_AND_UPDATE,)
    CHARTS = {"Step size": {"gradient norm and update size": ["Multiline", ["^grad_norm$", "^update_size$"]]}}
    SUMMARY = (("grad_norm", "gradient norm"),)
    ORDER = 20.0

    NEEDS = frozenset({Need.GRAD_NORMS})

    def __init__(self, per_param: bool = True, **kw):
        super().__init__(**kw)
        self.per_param = per_param

    def compute(self, record):
        if record.grad_norms is None:
            return {}
        tag = self.tag("grad_norm")
        out = {tag: record.global_norm(record.grad_norms)}
        if self.per_param:
            out.update({f"{tag}/{n}": v for n, v in record.grad_norms.items()})
        return out
