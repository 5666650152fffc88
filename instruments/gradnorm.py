"""GradNorm: the norm of the mini-batch gradient the optimizer receives."""

from __future__ import annotations

from cockpit_lite import Instrument, Need


class GradNorm(Instrument):
    """||p.grad|| per parameter tensor and globally, sqrt(sum_l ||grad_l||^2) (Cockpit's GradNorm).

    Read in the optimizer's step pre-hook, so clipping done by the loop between backward and step is
    included. Tags: ``grad_norm``, and with ``per_param=True`` ``grad_norm/<parameter name>``.
    Cost: one fused norm over the gradients.
    """

    NEEDS = frozenset({Need.GRAD_NORMS})

    def __init__(self, per_param: bool = True, **kw):
        super().__init__(**kw)
        self.per_param = per_param

    def compute(self, record):
        if record.grad_norms is None:
            return {}
        out = {self.tag("grad_norm"): record.global_norm(record.grad_norms)}
        if self.per_param:
            out.update({self.tag(f"grad_norm/{n}"): v for n, v in record.grad_norms.items()})
        return out
