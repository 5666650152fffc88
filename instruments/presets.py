"""Named instrument sets, registered under the entry-point group ``cockpit_lite.presets``.

- ``minimal``: Loss, GradNorm. Nothing per-sample.
- ``economy``: Cockpit's economy set (Loss, GradNorm, UpdateSize, Distance, norm/inner/ortho tests,
  Alpha) plus per-sample gradient norms, which the tests compute anyway.
- ``full``: economy plus Clipping. TracIn and Checkpoints are in no preset: TracIn needs
  ``cockpit.track(loader)``, Checkpoints writes files.
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
    return [Loss(per_sample=False), GradNorm()]


def economy():
    return [Loss(), GradNorm(), UpdateSize(), Distance(), PerSampleGradNorms(), GradientTests(), Alpha()]


def full():
    return economy() + [Clipping()]
