"""Named instrument sets, registered under the entry-point group ``cockpit_lite.presets``.

- ``minimal``: Loss, GradNorm. Nothing per-sample.
- ``economy``: Cockpit's economy set (Loss, GradNorm, UpdateSize, Distance, norm/inner/ortho tests,
  Alpha) plus per-sample gradient norms, which the tests compute anyway.
- ``full``: economy plus Clipping. TracIn and Checkpoints are in no preset: TracIn needs
  ``cockpit.track(loader)``, Checkpoints writes files.
"""

from __future__ import annotations

from instruments.alpha import Alpha
from instruments.clipping import Clipping
from instruments.gradient_tests import GradientTests
from instruments.gradnorm import GradNorm
from instruments.loss import Loss
from instruments.persample_norms import PerSampleGradNorms
from instruments.update import Distance, UpdateSize


def minimal():
    return [Loss(per_sample=False), GradNorm()]


def economy():
    return [Loss(), GradNorm(), UpdateSize(), Distance(), PerSampleGradNorms(), GradientTests(), Alpha()]


def full():
    return economy() + [Clipping()]
