"""The vocabulary in which instruments say what they need from a step.

The core computes each need at most once per step, whatever the number of instruments asking, and
hands the results over in a :class:`~cockpit_lite.step.StepRecord`.
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
    PER_SAMPLE_SQ_NORMS = "per_sample_sq_norms"  #: ||g_i||^2, total and per tensor
    PER_SAMPLE_DOT_MEAN = "per_sample_dot_mean"  #: g_i . gbar with gbar = mean_j g_j, and ||gbar||^2
    PER_SAMPLE_GRAM = "per_sample_gram"  #: G_ij = g_i . g_j (B x B), summed over tensors
    PER_SAMPLE_GRAM_BY_PARAM = "per_sample_gram_by_param"  #: the same per tensor
    PER_SAMPLE_GRADS = "per_sample_grads"  #: materialised g_i (B x D): only if really needed
    INDICES = "indices"  #: dataset indices of the batch (needs ``cockpit.track(loader)``)
    #: the per-layer views of this step's per-sample gradients in ``record.views`` (from the end of
    #: backward until the step), to cross-multiply with other per-sample gradients (TracIn probes)
    PER_SAMPLE_CROSS = "per_sample_cross"


#: A direction to project per-sample gradients onto: called after the optimizer step with the
#: step record; returns one tensor per parameter name (missing names count as zero), or None to skip.
DirectionFn = Callable[["object"], Mapping[str, torch.Tensor] | None]


@dataclass
class Needs:
    """Everything one instrument asks of one step."""

    flags: set[Need] = field(default_factory=set)
    #: key -> direction; the projections g_i . v arrive in ``record.projections[key]``
    directions: dict[str, DirectionFn] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.flags or self.directions)

    def merge(self, other: Needs) -> None:
        self.flags |= other.flags
        for key, fn in other.directions.items():
            if key in self.directions and self.directions[key] is not fn:
                raise ValueError(f"two instruments ask for a projection under the same key {key!r}")
            self.directions[key] = fn

    @property
    def per_sample(self) -> bool:
        """Whether the per-layer engine has to run for this step."""
        return bool(
            self.directions
            or self.flags
            & {
                Need.PER_SAMPLE_SQ_NORMS,
                Need.PER_SAMPLE_DOT_MEAN,
                Need.PER_SAMPLE_GRAM,
                Need.PER_SAMPLE_GRAM_BY_PARAM,
                Need.PER_SAMPLE_GRADS,
                Need.PER_SAMPLE_CROSS,
            }
        )
