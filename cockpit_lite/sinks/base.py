"""The sink interface: where records go. Sinks only write; they compute nothing instruments should.

A sink learns about the run through a :class:`RunContext` at :meth:`Sink.open`, never through the
Cockpit: the log directory, the history (read it, never write it), the instruments of the run (for
their declared presentation) and a shared slot for the latest dashboard picture, so that two sinks
that show it draw it once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cockpit_lite.records import History


@dataclass
class Picture:
    """The latest dashboard PNG drawn by any sink of the run: ``(step, png bytes)`` or None."""

    latest: tuple[int, bytes] | None = None


@dataclass
class RunContext:
    """What a sink may know of the run it writes (handed to :meth:`Sink.open`)."""

    logdir: str | None = None
    #: every record of the run so far; sinks read it and never add to it
    history: History = field(default_factory=History)
    #: the run's instruments, for the tags, panels, charts and summary lines they declare
    instruments: Sequence[Any] = ()
    #: the latest dashboard picture, shared by the sinks that draw or show it
    picture: Picture = field(default_factory=Picture)


class Sink:
    """Receives the records of each tracked step, in step order of arrival."""

    def open(self, context: RunContext) -> None:
        """Called once when the cockpit attaches."""

    def write(self, step: int, records: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Make everything written so far durable."""

    def close(self) -> None:
        self.flush()


class HistorySink(Sink):
    """A sink that draws from the whole run so far: it reads the run's history, or keeps one of its
    own when used without a cockpit."""

    history: History | None = None
    _own_history: bool = False
    context: RunContext | None = None

    def _use_history(self, context: RunContext | None) -> None:
        self.context = context if context is not None else RunContext()
        self._own_history = context is None
        self.history = self.context.history

    def _remember(self, step: int, records: Mapping[str, Any]) -> None:
        if self._own_history:
            self.history.add(step, records)
