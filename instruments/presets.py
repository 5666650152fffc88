"""Named instrument sets, registered under the entry-point group ``cockpit_lite.presets``.

- ``minimal``: Loss, GradNorm. Nothing per-sample.
- ``economy``: Cockpit's economy set (Loss, GradNorm, UpdateSize, Distance, norm/inner/ortho tests,
  Alpha) plus per-sample gradient norms, which the tests compute anyway.
- ``full``: economy plus Clipping. TracIn and Checkpoints are in no preset: TracIn needs
  ``cockpit.track(loader)``, Checkpoints writes files.

Measured average overhead, every step tracked: the time of a training step with the cockpit over a plain
one (docs/performance.md; 1 CPU thread, medians of interleaved blocks, ranges over runs and optimizers):

- economy minus Alpha: MLP 784-512-256-10 1.6-1.8x, 3C3D CNN 1.55x, small GPT 1.6-1.7x, ResNet-18
  (train-mode BatchNorm) 5.0-5.4x;
- ``economy``: MLP 2.5-2.9x, CNN 1.7x, small GPT 2.3-2.5x, ResNet-18 6.5-6.9x;
- ``full``: economy plus 1-6.5% (Clipping);
- ``minimal``: no per-sample work (the loss and one norm per parameter tensor).

To hold any preset to a share of wall time instead, pass ``Cockpit(..., budget=0.05)`` (docs/budget.md):
the costly instruments then run on some steps only.
"""

from __future__ import annotations

from cockpit_lite.instruments.alpha import Alpha
from cockpit_lite.instruments.clipping import Clipping
from cockpit_lite.instruments.gradient_tests import GradientTests
from cockpit_lite.instruments.gradnorm import GradNorm
from cockpit_lite.instruments.loss import Loss
from cockpit_lite.instruments.persample_norms import PerSampleGradNorms
from cockpit_lite.instruments.update import Distance, UpdateSize


def minimal():
    """Loss (batch loss only) and GradNorm: no per-sample work. 1.04-1.18x a plain step (MLP 1.18x, CNN,
    small GPT and ResNet-18 1.04-1.05x; docs/instruments/index.md)."""
    return [Loss(per_sample=False), GradNorm()]


def economy():
    """Cockpit's economy set plus per-sample gradient norms: 2.8x a plain step on an MLP, 1.8x on a CNN,
    2.4x on a small GPT, 5.1x on ResNet-18 with train-mode BatchNorm; 1.02-1.13x with ``budget=0.05``
    (docs/instruments/index.md)."""
    return [Loss(), GradNorm(), UpdateSize(), Distance(), PerSampleGradNorms(), GradientTests(), Alpha()]


def full():
    """economy plus Clipping (all three kinds): economy's cost plus 0-12% (MLP 3.2x, CNN 1.8x, small GPT
    2.5x, ResNet-18 5.0x; docs/instruments/index.md)."""
    return economy() + [Clipping()]
