"""cockpit-lite: training diagnostics for PyTorch, attached by hooks alone."""

from cockpit_lite.cockpit import Cockpit
from cockpit_lite.errors import CockpitWarning
from cockpit_lite.instrument import Instrument
from cockpit_lite.io import RunReadError, load
from cockpit_lite.needs import Need, Needs
from cockpit_lite.pause import paused
from cockpit_lite.persample import LayerHandler, register_handler
from cockpit_lite.records import History
from cockpit_lite.step import StepRecord

__all__ = [
    "Cockpit",
    "CockpitWarning",
    "paused",
    "Instrument",
    "Need",
    "Needs",
    "History",
    "StepRecord",
    "load",
    "RunReadError",
    "register_handler",
    "LayerHandler",
]
__version__ = "0.1.0"
