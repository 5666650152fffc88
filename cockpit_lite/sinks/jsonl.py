"""JSON lines: one line per (step, records) written, appended and flushed at once."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cockpit_lite.records import to_json
from cockpit_lite.sinks.base import Sink

FILENAME = "cockpit.jsonl"


class JsonLines(Sink):
    """Append ``{"step": t, "records": {...}}`` per write to ``logdir/cockpit.jsonl``.

    Each line is flushed when written, so a crash of the training process loses at most the step in
    flight. ``fsync=True`` also survives a crash of the machine, at a cost per step.
    """

    def __init__(self, logdir: str | os.PathLike, fsync: bool = False):
        self.logdir = os.fspath(logdir)
        self.fsync = fsync
        self._f = None

    @property
    def path(self) -> Path:
        return Path(self.logdir) / FILENAME

    def open(self, context: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, step: int, records: Mapping[str, Any]) -> None:
        if self._f is None:
            self.open(None)
        line = json.dumps({"step": step, "records": {k: to_json(v) for k, v in records.items()}})
        self._f.write(line + "\n")
        self.flush()

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()
            if self.fsync:
                os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self.flush()
            self._f.close()
            self._f = None
