"""Reading a run back from disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cockpit_lite.records import History, from_json
from cockpit_lite.sinks.jsonl import FILENAME


def load(logdir: str | os.PathLike) -> History:
    """Read ``logdir/cockpit.jsonl`` into a :class:`History` (the same shape as ``cockpit.history``).

    A last line cut short by a crash is skipped.
    """
    path = Path(logdir) / FILENAME
    if not path.exists():
        raise FileNotFoundError(f"no cockpit run in {logdir}: {path} does not exist")
    history = History()
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            history.add(int(entry["step"]), {k: from_json(v) for k, v in entry["records"].items()})
    history.sort()
    return history
