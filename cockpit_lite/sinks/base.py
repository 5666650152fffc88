"""The sink interface: where records go. Sinks only write; they compute nothing instruments should."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cockpit_lite.records import History


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


class HistorySink(Sink):
    """A sink that draws from the whole run so far: it reads the cockpit's history, or keeps one of
    its own when used without a cockpit."""

    history: History | None = None
    _own_history: bool = False

    def _use_history(self, cockpit: Any) -> None:
        history = getattr(cockpit, "history", None)
        self._own_history = history is None
        self.history = History() if history is None else history

    def _remember(self, step: int, records: Mapping[str, Any]) -> None:
        if self._own_history:
            self.history.add(step, records)
