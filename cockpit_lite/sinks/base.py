"""The sink interface: where records go. Sinks only write; they compute nothing instruments should."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class Sink:
    """Receives the records of each tracked step, in step order of arrival."""

    def open(self, cockpit: Any) -> None:
        """Called once when the cockpit attaches."""

    def write(self, step: int, records: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Make everything written so far durable."""

    def close(self) -> None:
        self.flush()
