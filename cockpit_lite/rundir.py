"""One directory per run: a logdir that already holds a run is never appended to silently.

TensorBoard, Lightning and the Hugging Face Trainer all keep one folder per run; a second run written
into the first one's folder merges the two (``tensorboard`` draws both as one line, ``load()`` returns
every step twice). So a Cockpit given a ``logdir`` that already holds a run writes its own run into the
first free sibling ``<logdir>-2``, ``<logdir>-3``, ... and says so; ``resume=True`` continues the run
that is there instead (after ``load_state_dict`` from a checkpoint). ``load()`` of a folder of runs
returns them by name (:class:`Runs`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cockpit_lite.sinks.jsonl import FILENAME

#: TensorBoard's event files (ours and any other writer's)
EVENTS = "events.out.tfevents.*"


def holds_run(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a run already: a non-empty ``cockpit.jsonl`` or TensorBoard event files."""
    p = Path(path)
    if not p.is_dir():
        return False
    jsonl = p / FILENAME
    return (jsonl.is_file() and jsonl.stat().st_size > 0) or any(p.glob(EVENTS))


def run_dir(logdir: str | os.PathLike, resume: bool = False) -> str:
    """The directory a new run given ``logdir`` writes to: ``logdir`` itself when it holds no run yet
    (or ``resume``), else the first sibling ``<logdir>-<n>`` (n = 2, 3, ...) that holds none."""
    logdir = os.fspath(logdir)
    if resume or not holds_run(logdir):
        return logdir
    base = os.path.normpath(logdir)
    n = 2
    while holds_run(f"{base}-{n}"):
        n += 1
    return f"{base}-{n}"


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def find_runs(folder: str | os.PathLike) -> list[Path]:
    """The run directories (holding ``cockpit.jsonl``) at any depth below ``folder``, in natural order
    of their relative paths (``gpt``, ``gpt-2``, ``gpt-10``)."""
    root = Path(folder)
    runs = [p.parent for p in root.rglob(FILENAME) if p.parent != root]
    return sorted(runs, key=lambda p: _natural(p.relative_to(root).as_posix()))


class Runs(dict):
    """The runs of a folder of runs: relative path (``"gpt"``, ``"gpt-2"``) -> :class:`History`."""

    def __repr__(self) -> str:
        lines = [f"  {name}: {h.last_step() + 1 if h.last_step() is not None else 0} steps" for name, h in self.items()]
        return "Runs(\n" + "\n".join(lines) + "\n)"
