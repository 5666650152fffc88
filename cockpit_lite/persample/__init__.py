"""The per-sample engine. Public here: serving your own layer types (docs/recipes/layer_handler.md)."""

from cockpit_lite.persample.layers import Handler, LayerHandler, PerSampleUndefined, register_handler
from cockpit_lite.persample.views import FactorView, MaterialisedView, View, ViewGroup

__all__ = [
    "register_handler",
    "Handler",
    "LayerHandler",
    "PerSampleUndefined",
    "View",
    "FactorView",
    "MaterialisedView",
    "ViewGroup",
]
