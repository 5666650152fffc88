"""Reading a run, or a folder of runs, back from disk.

``load()`` reads what can be read: a damaged line (binary junk, invalid UTF-8, JSON that is no
``{"step": int, "records": {...}}`` object, a step that is no integer or out of range, nesting too deep
to parse, a last line cut short by a crash) is skipped and counted on the History (``skipped``,
``skipped_lines``), and one :class:`~cockpit_lite.errors.CockpitWarning` says how many and where. A
file that cannot be read at all raises one documented error: :class:`FileNotFoundError` for a path
that holds no run, :class:`RunReadError` (a ``ValueError``) for a ``cockpit.jsonl`` that is a
directory or cannot be opened.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cockpit_lite.errors import warn
from cockpit_lite.records import History, from_json
from cockpit_lite.rundir import Runs, find_runs
from cockpit_lite.sinks.jsonl import FILENAME

#: steps outside [-STEP_LIMIT, STEP_LIMIT) are damage (a flipped digit), not a step
STEP_LIMIT = 2**63
#: how many line numbers of skipped lines a History keeps (the count is exact)
FIRST_LINES = 10

# the prefix JsonLines writes: a line outside the selected steps is skipped without parsing its JSON
_PREFIX = re.compile(rb'\{"step": (-?\d{1,19}), "records": ')


_scan = json.JSONDecoder().scan_once  # the C scanner, without json.loads' per-call overhead


def _parse(text: str) -> Any:
    """``json.loads(text)`` for one line, faster on the common line that starts with its value."""
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        return json.loads(text)  # raises the decoding error, or reads a line that starts with blanks
    if end != len(text) and text[end:].strip():
        raise ValueError(f"extra data after the JSON value at column {end}")
    return value


class RunReadError(ValueError):
    """A run's ``cockpit.jsonl`` exists but cannot be read (a directory of that name, no permission,
    an I/O error). The message names the file and the fix."""


def load(
    logdir: str | os.PathLike,
    tags: Iterable[str] | str | None = None,
    steps: tuple[int | None, int | None] | None = None,
) -> History | Runs:
    """Read the run in ``logdir`` (its ``cockpit.jsonl``) into a :class:`History`, the same shape as
    ``cockpit.history``; or, for a folder of runs (``runs/`` holding ``runs/gpt``, ``runs/gpt-2``),
    every run in it as :class:`~cockpit_lite.rundir.Runs`, a dict from relative path to History.
    ``logdir`` may also name the ``cockpit.jsonl`` file itself.

    ``tags``: a list of tags to keep, or one string, a prefix (``"grad_norm"`` keeps ``grad_norm`` and
    ``grad_norm/fc1``); None keeps every tag. ``steps``: ``(start, stop)``, keep the steps
    ``start <= step < stop`` (either end None for no bound). Lines outside the selected steps or
    holding none of the listed tags are passed over without parsing (so damage in them is not counted).

    A record written twice under one step (a run resumed with ``resume=True`` from a checkpoint older
    than its last records) keeps the later value. Damaged lines, including a last line cut short by a
    crash, are skipped and counted: ``history.skipped`` (the number), ``history.skipped_lines`` (the
    first :data:`FIRST_LINES` line numbers, from 1), and one CockpitWarning. A History read from disk
    holds every record of the selection (no window: :class:`History` ``window=None``).

    Raises :class:`FileNotFoundError` when ``logdir`` holds no run, and :class:`RunReadError` (a
    ``ValueError``) when a ``cockpit.jsonl`` is a directory or cannot be opened or read.
    """
    base = Path(logdir)
    if base.is_file():
        return _read(base, tags, steps)
    path = base / FILENAME
    if not path.exists():
        runs = find_runs(base) if base.is_dir() else []
        if runs:
            return Runs((r.relative_to(base).as_posix(), _read(r / FILENAME, tags, steps)) for r in runs)
        raise FileNotFoundError(
            f"no cockpit run in {logdir}: {path} does not exist, nor any run directory below it "
            "(give the Cockpit's logdir=..., the directory holding cockpit.jsonl)"
        )
    return _read(path, tags, steps)


def _selector(tags: Iterable[str] | str | None):
    if tags is None:
        return None, None
    if isinstance(tags, str):
        prefix = tags
        return (lambda t: t.startswith(prefix)), None
    wanted = frozenset(tags)
    # a listed tag appears in its line as its JSON string: a line holding none of them is not parsed
    needles = [json.dumps(t).encode() for t in wanted]
    return wanted.__contains__, needles


def _step(v: Any) -> int | None:
    if type(v) is int and -STEP_LIMIT <= v < STEP_LIMIT:
        return v
    return None


def _read(
    path: Path, tags: Iterable[str] | str | None = None, steps: tuple[int | None, int | None] | None = None
) -> History:
    keep, needles = _selector(tags)
    start, stop = steps if steps is not None else (None, None)
    lo = -math.inf if start is None else start
    hi = math.inf if stop is None else stop
    select_steps = steps is not None
    by_tag: dict[str, dict[int, Any]] = {}
    skipped, first = 0, []
    try:
        f = open(path, "rb")
    except IsADirectoryError:
        raise RunReadError(
            f"{path} is a directory, not the JSON lines file a Cockpit writes: move it aside, or load() "
            "the run directory that holds the real cockpit.jsonl"
        ) from None
    except OSError as e:
        why = e.strerror or e
        raise RunReadError(f"cannot open {path}: {why}; make it readable (chmod u+r) and load() again") from None
    with f:
        n = 0
        try:
            for raw in f:
                n += 1
                if select_steps or needles is not None:
                    m = _PREFIX.match(raw)
                    if m is not None and select_steps and not lo <= int(m.group(1)) < hi:
                        continue
                    if needles is not None and m is not None and not any(x in raw for x in needles):
                        continue
                if not raw.strip():
                    continue  # a blank line is no record, and no damage
                try:
                    entry = _parse(raw.decode("utf-8"))
                    step = _step(entry["step"])
                    records = entry["records"]
                    if step is None or type(records) is not dict:
                        raise ValueError
                    if not lo <= step < hi:
                        continue
                    values = [
                        (tag, v if type(v) is float else from_json(v))
                        for tag, v in records.items()
                        if keep is None or keep(tag)
                    ]
                except (ValueError, TypeError, KeyError, IndexError, RecursionError, MemoryError):
                    # UnicodeDecodeError and JSONDecodeError are ValueErrors; a list is no mapping
                    skipped += 1
                    if len(first) < FIRST_LINES:
                        first.append(n)
                    continue
                for tag, value in values:
                    d = by_tag.get(tag)
                    if d is None:
                        d = by_tag[tag] = {}
                    d[step] = value  # a step written twice: the later value wins
        except OSError as e:
            why = e.strerror or e
            raise RunReadError(f"cannot read {path} (line {n + 1}): {why}; check the disk and load() again") from None
    history = History(window=None)
    history._load_sorted({tag: sorted(d.items()) for tag, d in by_tag.items()})
    history.skipped, history.skipped_lines = skipped, first
    if skipped:
        lines = ", ".join(map(str, first)) + (", ..." if skipped > len(first) else "")
        warn(f"{path}: skipped {skipped} damaged line{'s' if skipped > 1 else ''} (line {lines}); read the rest")
    return history
