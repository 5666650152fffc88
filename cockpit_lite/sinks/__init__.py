"""Where records go: the JSON lines (always, with a logdir), TensorBoard, the dashboard."""

from cockpit_lite.sinks.base import Sink
from cockpit_lite.sinks.dashboard import Dashboard
from cockpit_lite.sinks.jsonl import JsonLines
from cockpit_lite.sinks.tensorboard import TensorBoard

__all__ = ["Sink", "JsonLines", "TensorBoard", "Dashboard"]
