"""JSON lines: one line per (step, records) written, handed to the OS at once."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cockpit_lite.records import to_json
from cockpit_lite.sinks.appendfile import MAX_PENDING, AppendFile
from cockpit_lite.sinks.base import Sink

FILENAME = "cockpit.jsonl"


class JsonLines(Sink):
    """Append ``{"step": t, "records": {...}}`` per write to ``logdir/cockpit.jsonl``.

    Each line is handed to the OS when written (a ``write`` call on an unbuffered file), so a killed
    or crashed training process loses at most the step in flight. ``fsync=True`` also survives a crash
    of the machine, at a cost per step. A full or failing disk never stops training: one warning names
    the file and the cause, lines wait (at most ``max_pending`` bytes) for the disk to recover, and
    those beyond are dropped and counted in :attr:`dropped` (see
    :class:`~cockpit_lite.sinks.appendfile.AppendFile`).
    """

    def __init__(self, logdir: str | os.PathLike, fsync: bool = False, max_pending: int = MAX_PENDING):
        self.logdir = os.fspath(logdir)
        self.fsync, self.max_pending = fsync, max_pending
        self._f: AppendFile | None = None
        self._dropped_at_close = 0

    @property
    def path(self) -> Path:
        return Path(self.logdir) / FILENAME

    @property
    def dropped(self) -> int:
        """Lines dropped because the disk failed and the bounded queue was full."""
        return self._f.dropped if self._f is not None else self._dropped_at_close

    def open(self, context: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = AppendFile(self.path, max_pending=self.max_pending, fsync=self.fsync)

    def write(self, step: int, records: Mapping[str, Any]) -> None:
        if self._f is None:
            self.open(None)
        line = json.dumps({"step": step, "records": {k: to_json(v) for k, v in records.items()}})
        self._f.append((line + "\n").encode("utf-8"))
        self._f.flush()

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            finally:
                self._dropped_at_close = f.dropped
