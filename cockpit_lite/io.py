"""Reading a run, or a folder of runs, back from disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cockpit_lite.records import History, from_json
from cockpit_lite.rundir import Runs, find_runs
from cockpit_lite.sinks.jsonl import FILENAME


def load(logdir: str | os.PathLike) -> History | Runs:
    """Read the run in ``logdir`` (its ``cockpit.jsonl``) into a :class:`History`, the same shape as
    ``cockpit.history``; or, for a folder of runs (``runs/`` holding ``runs/gpt``, ``runs/gpt-2``),
    every run in it as :class:`~cockpit_lite.rundir.Runs`, a dict from relative path to History.

    A last line cut short by a crash is skipped. A record written twice under one step (a run resumed
    with ``resume=True`` from a checkpoint older than its last records) keeps the later value.
    """
    path = Path(logdir) / FILENAME
    if not path.exists():
        runs = find_runs(logdir) if Path(logdir).is_dir() else []
        if runs:
            return Runs((r.relative_to(logdir).as_posix(), _read(r / FILENAME)) for r in runs)
        raise FileNotFoundError(f"no cockpit run in {logdir}: {path} does not exist, nor any run directory below it")
    return _read(path)


def _read(path: Path) -> History:
    latest: dict[tuple[str, int], object] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = int(entry["step"])
            for tag, value in entry["records"].items():
                latest.pop((tag, step), None)  # a rewrite moves to the end: the later value wins
                latest[(tag, step)] = from_json(value)
    history = History()
    for (tag, step), value in latest.items():
        history.add(step, {tag: value})
    history.sort()
    return history
