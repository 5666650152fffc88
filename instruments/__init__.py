"""The built-in instruments of cockpit-lite, plugins of the core (registered as entry points)."""

from cockpit_lite.instruments import agc
from cockpit_lite.instruments.alpha import Alpha
from cockpit_lite.instruments.clipping import Clipping
from cockpit_lite.instruments.gradient_tests import GradientTests
from cockpit_lite.instruments.gradnorm import GradNorm
from cockpit_lite.instruments.loss import Loss
from cockpit_lite.instruments.noise_scale import GradientNoiseScale
from cockpit_lite.instruments.persample_norms import PerSampleGradNorms
from cockpit_lite.instruments.sharpness import Sharpness
from cockpit_lite.instruments.stability import StabilityMonitor
from cockpit_lite.instruments.tracin import TracIn
from cockpit_lite.instruments.tracin_cp import Checkpoints, TracInCP
from cockpit_lite.instruments.update import Distance, UpdateSize
from cockpit_lite.instruments.update_ratio import UpdateRatio

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
    "GradientNoiseScale",
    "UpdateRatio",
    "StabilityMonitor",
    "Sharpness",
    "agc",
]
