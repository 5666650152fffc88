"""The vocabulary in which instruments say what they need from a step.

Each need is computed by one provider (:mod:`cockpit_lite.providers`) at most once per step, whatever
the number of instruments asking, and handed over in a :class:`~cockpit_lite.step.StepRecord`. The
built-in needs are the members of :class:`Need`; a third-party provider may serve further needs,
named by plain strings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

import torch


class Need(str, Enum):
    """What an instrument can ask the core for."""

    LOSS = "loss"  #: batch loss L (always cheap)
    PER_SAMPLE_LOSS = "per_sample_loss"  #: l_i, with L = mean_i l_i (mean) or sum_i l_i (sum)
    GRAD_NORMS = "grad_norms"  #: ||p.grad|| per tensor, as the optimizer receives it
    BACKWARD_GRAD_NORMS = "backward_grad_norms"  #: ||p.grad|| per tensor right after backward
    UPDATE = "update"  #: d = theta_{t+1} - theta_t per tensor
    PER_SAMPLE_SQ_NORMS = "per_sample_sq_norms"  #: ||g_i||^2 summed over tensors
    PER_SAMPLE_SQ_NORMS_BY_PARAM = "per_sample_sq_norms_by_param"  #: the same per tensor, and the total
    PER_SAMPLE_DOT_MEAN = "per_sample_dot_mean"  #: g_i . gbar with gbar = mean_j g_j, and ||gbar||^2
    PER_SAMPLE_GRAM = "per_sample_gram"  #: G_ij = g_i . g_j (B x B), summed over tensors
    PER_SAMPLE_GRAM_BY_PARAM = "per_sample_gram_by_param"  #: the same per tensor
    PER_SAMPLE_GRADS = "per_sample_grads"  #: materialised g_i (B x D): only if really needed
    INDICES = "indices"  #: dataset indices of the batch (needs ``cockpit.track(loader)``)
    #: the per-layer views of this step's per-sample gradients in ``record.views`` (from the end of
    #: backward until the step), to cross-multiply with other per-sample gradients (TracIn probes)
    PER_SAMPLE_CROSS = "per_sample_cross"
    #: projections g_i . v onto the directions of ``Needs.directions`` (implied by asking for one)
    PER_SAMPLE_PROJECTIONS = "per_sample_projections"


#: A direction to project per-sample gradients onto: called after the optimizer step with the
#: step record; returns one tensor per parameter name (missing names count as zero), or None to skip.
DirectionFn = Callable[["object"], Mapping[str, torch.Tensor] | None]


@dataclass
class Needs:
    """Everything one instrument asks of one step: need names, and directions to project onto."""

    flags: set[str] = field(default_factory=set)
    #: key -> direction; the projections g_i . v arrive in ``record.projections[key]``
    directions: dict[str, DirectionFn] = field(default_factory=dict)
    #: keys of ``directions`` known before the optimizer step (the previous step's update): their function
    #: may also be called as the step's backward begins, and must then return the same direction it returns
    #: after the step. Those are projected layer by layer during backward, from per-sample gradients that
    #: other statistics formed (B o i multiply-adds a layer where the kept factors cost B T o i).
    early: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.flags or self.directions)

    def names(self) -> set[str]:
        """The need names, with the projections need when a direction is asked for."""
        return set(self.flags) | ({Need.PER_SAMPLE_PROJECTIONS} if self.directions else set())

    def merge(self, other: Needs) -> list[str]:
        """Add ``other``'s needs; returns the direction keys it shares with different functions (those
        keep the first function: the caller reports the clash)."""
        self.flags |= other.flags
        clashes = []
        for key, fn in other.directions.items():
            if key in self.directions and self.directions[key] is not fn:
                clashes.append(key)
                continue
            self.directions[key] = fn
            if key in other.early:
                self.early.add(key)
        return clashes
