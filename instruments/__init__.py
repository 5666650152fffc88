"""The built-in instruments of cockpit-lite, plugins of the core (registered as entry points)."""

from instruments import agc
from instruments.alpha import Alpha
from instruments.clipping import Clipping
from instruments.gradient_tests import GradientTests
from instruments.gradnorm import GradNorm
from instruments.loss import Loss
from instruments.persample_norms import PerSampleGradNorms
from instruments.tracin import TracIn
from instruments.tracin_cp import Checkpoints, TracInCP
from instruments.update import Distance, UpdateSize

__all__ = [
    "Loss",
    "GradNorm",
    "UpdateSize",
    "Distance",
    "PerSampleGradNorms",
    "GradientTests",
    "Alpha",
    "TracIn",
    "TracInCP",
    "Checkpoints",
    "Clipping",
    "agc",
]
