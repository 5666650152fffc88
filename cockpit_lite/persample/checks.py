"""Conditions of a step's per-sample statistics that are decided on the host with the step's other
values (cockpit_lite/host.py: one transfer a step), so that nothing in backward waits for the device: the
broadcast shares adding up to the gradient autograd summed, an attention replay reproducing its call bit
for bit, gbar of an accumulated step being the mean of the g_i. A condition that fails leaves the
statistics it concerns out of the step, with a note."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DeferredCheck:
    """A condition of a step's per-sample statistics decided on the host, with the step's other values
    (one transfer: nothing waits for the device in backward). ``verdict(host values of values)`` is None
    if it holds, else the note; then the statistics named by ``drops`` (None: every one of the step) are
    left out, and ``on_fail`` runs (a handler that stops taking a route that failed)."""

    values: torch.Tensor  #: 1-dim, on the device
    verdict: Callable[[np.ndarray], str | None]
    drops: frozenset[str] | None = None
    on_fail: Callable[[], None] | None = None

    def decide(self, host: np.ndarray) -> str | None:
        """The note if the condition does not hold (and ``on_fail`` run), else None."""
        note = self.verdict(host)
        if note is not None and self.on_fail is not None:
            self.on_fail()
        return note
