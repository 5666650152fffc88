"""Where records go: the JSON lines (always, with a logdir), TensorBoard, the dashboard."""

from cockpit_lite.sinks.base import Sink
from cockpit_lite.sinks.jsonl import JsonLines

__all__ = ["Sink", "JsonLines"]
