"""Records and the in-memory history.

A record is (step, tag, value); value is a float, a 1-D numpy array (per-sample values), a string
(verdicts), or a small dict table of those. The history, the JSON lines, TensorBoard and the dashboard
all read the same records.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from operator import itemgetter
from typing import Any

import numpy as np
import torch


def to_value(v: Any) -> Any:
    """Normalise an instrument's value to a float, numpy array, string or dict of those."""
    if type(v) is float:  # the common case, first
        return v
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    if isinstance(v, np.ndarray):
        return float(v) if v.ndim == 0 else v.astype(np.float64) if v.dtype.kind == "f" else v
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v)
    if isinstance(v, Mapping):
        return {str(k): to_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return np.asarray(v)
    if v is None or isinstance(v, str):
        return v
    raise TypeError(f"record values must be numbers, arrays, strings or dicts of those, got {type(v).__name__}")


def to_json(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return [to_json(x) for x in v.tolist()] if v.dtype.kind == "f" else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # "nan", "inf", "-inf": strict JSON has no such numbers
    if isinstance(v, dict):
        return {k: to_json(x) for k, x in v.items()}
    return v


_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def from_json(v: Any) -> Any:
    if isinstance(v, list):
        return np.asarray([from_json(x) for x in v])
    if isinstance(v, str) and v in _NONFINITE:
        return _NONFINITE[v]
    if isinstance(v, dict):
        return {k: from_json(x) for k, x in v.items()}
    return v


def _number(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


#: steps of the recent window a live History keeps in full (every record, per-sample arrays too)
WINDOW = 2048

#: steps a History holds as handed over before filing them by tag (:meth:`History.add`)
SETTLE_EVERY = 64


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (float, int, str, np.floating, np.integer))


class History(Mapping):
    """tag -> [(step, value), ...] in step order. ``history["loss"]`` is a list of pairs.

    Bounded: a live history (``cockpit.history``) keeps, per tag, the records of the last ``window``
    steps in full and, for the older steps, only scalar values (floats, strings) downsampled: every
    k-th older record, k doubling (1, 2, 4, ...) whenever more than ``window`` older records would be
    kept (the tag's first record stays, where ``window > 1``). So a tag holds at most
    ``3 * window + 1`` pairs (``2 * window + 1`` recent ones before a compaction, ``window`` older
    ones) whatever the run length, arrays and dicts (per-sample values, tables) only for the recent
    ``2 * window`` steps; the last value and the series for plotting are always there, thinned in the
    past. A tag with few records (verdicts, notes) is never thinned. The
    disk (``cockpit.jsonl``) stays the full record: ``load()`` returns a History with ``window=None``,
    which keeps everything. ``skipped`` and ``skipped_lines`` count the damaged lines ``load()``
    passed over (0 and [] for a live history).
    """

    def __init__(self, window: int | None = WINDOW) -> None:
        if window is not None and window < 1:
            raise ValueError(f"History window must be a positive number of steps or None, got {window}")
        self.window = window
        self.skipped = 0
        self.skipped_lines: list[int] = []
        # tag -> its steps and its values, side by side (no pair objects while a run writes); the pairs
        # a reader gets are formed on first read and kept until the tag's next records are filed
        self._steps: dict[str, list[int]] = {}
        self._values: dict[str, list[Any]] = {}
        self._pairs: dict[str, list[tuple[int, Any]]] = {}
        self._old: dict[str, int] = {}  # tag -> how many leading records are the thinned past
        self._stride: dict[str, int] = {}  # tag -> k: one older record in k is kept
        self._seen: dict[str, int] = {}  # tag -> older records met so far (picks every k-th)
        self._pending: list[tuple[int, dict[str, Any]]] = []  # steps added, not yet filed by tag
        self._tags: set[str] = set()  # every tag added (filed or pending)

    def add(self, step: int, records: Mapping[str, Any]) -> None:
        """File ``records`` under ``step``. They are held as handed over (a copy of the mapping) and filed
        by tag, by a few C-level passes over up to ``SETTLE_EVERY`` steps at once, before anything reads
        the history: a step's records cost no Python loop over its tags and make no objects."""
        self._own(step, dict(records))

    def _own(self, step: int, records: dict[str, Any]) -> None:
        """:meth:`add` of a dict no one changes afterwards (the emitter's own: not copied)."""
        if not records:
            return
        if not self._tags.issuperset(records):
            self._tags.update(records)
        self._pending.append((step, records))
        if len(self._pending) >= SETTLE_EVERY:
            self._settle()

    def _column(self, tag: str) -> tuple[list[int], list[Any]]:
        """The step and value lists of ``tag`` to file more records in (its read pairs dropped)."""
        steps = self._steps.get(tag)
        if steps is None:
            steps = self._steps[tag] = []
            self._values[tag] = []
        self._pairs.pop(tag, None)
        return steps, self._values[tag]

    def _settle(self) -> None:
        """File the pending steps by tag, in the order they were added. Steps with the same tags (in the
        same order) form a group, filed by two extends per tag (the values gathered by ``itemgetter`` and
        transposed by ``zip``) where the groups share no tag and no tag reaches its compaction point;
        otherwise step by step, so that what is kept is the same whenever the history is read."""
        pending, self._pending = self._pending, []
        window = self.window
        limit = 2 * window + 1 if window is not None else None
        groups: dict[tuple[str, ...], list[tuple[int, dict[str, Any]]]] = {}
        for entry in pending:
            key = tuple(entry[1])
            group = groups.get(key)
            if group is None:
                groups[key] = [entry]
            else:
                group.append(entry)
        disjoint = len(groups) == 1 or sum(map(len, groups)) == len(set().union(*groups))
        if not disjoint or (
            limit is not None
            and any(
                len(self._steps.get(t, ())) - self._old.get(t, 0) + len(g) > limit
                for tags, g in groups.items()
                for t in tags
            )
        ):
            for step, records in pending:
                for tag, value in records.items():
                    steps, values = self._column(tag)
                    steps.append(step)
                    values.append(value)
                    if limit is not None and len(steps) - self._old.get(tag, 0) > limit:
                        self._compact(tag)
            return
        for tags, group in groups.items():
            at = [s for s, _ in group]
            if len(tags) == 1:
                columns: Any = [[r[tags[0]] for _, r in group]]
            else:
                get = itemgetter(*tags)
                columns = zip(*[get(r) for _, r in group], strict=True)
            for tag, column in zip(tags, columns, strict=True):
                steps, values = self._column(tag)
                steps.extend(at)
                values.extend(column)

    def _compact(self, tag: str) -> None:
        """Move the records older than the last ``window`` steps of ``tag`` into its thinned past."""
        steps, values, window = self._steps[tag], self._values[tag], self.window
        n_old = self._old.get(tag, 0)
        cutoff = steps[-1] - window
        old = list(zip(steps[:n_old], values[:n_old], strict=True))
        recent = []
        k, seen = self._stride.get(tag, 1), self._seen.get(tag, 0)
        for p in zip(steps[n_old:], values[n_old:], strict=True):
            if p[0] > cutoff:
                recent.append(p)
            elif _is_scalar(p[1]):
                if seen % k == 0:
                    old.append(p)
                seen += 1
        pin = 1 if window > 1 else 0  # the tag's first record stays: where the series starts
        while len(old) > window:
            old = old[:pin] + old[pin:][::-1][::2][::-1]  # every other one, the newest kept
            k *= 2
        kept = old + recent
        steps[:] = [s for s, _ in kept]
        values[:] = [v for _, v in kept]
        self._pairs.pop(tag, None)
        self._old[tag], self._stride[tag], self._seen[tag] = len(old), k, seen

    def _load_sorted(self, data: Mapping[str, list[tuple[int, Any]]]) -> None:
        """Fill from ``tag -> [(step, value), ...]`` lists already in step order (``load()``)."""
        self._settled()
        for tag, pairs in data.items():
            self._steps[tag] = [s for s, _ in pairs]
            self._values[tag] = [v for _, v in pairs]
            self._pairs.pop(tag, None)
        self._tags.update(data)

    def _settled(self) -> dict[str, list[int]]:
        """The steps by tag, every step added filed."""
        if self._pending:
            self._settle()
        return self._steps

    def _pairs_of(self, tag: str) -> list[tuple[int, Any]] | None:
        """The ``(step, value)`` pairs of ``tag`` (formed once per filing), or None if it has none."""
        steps = self._settled().get(tag)
        if not steps:
            return None
        pairs = self._pairs.get(tag)
        if pairs is None:
            pairs = self._pairs[tag] = list(zip(steps, self._values[tag], strict=True))
        return pairs

    def __getitem__(self, tag: str) -> list[tuple[int, Any]]:
        pairs = self._pairs_of(tag)
        if pairs is None:
            raise KeyError(f"no records under {tag!r}; tags present: {sorted(self)}")
        return pairs

    def __iter__(self) -> Iterator[str]:
        return iter([t for t, steps in self._settled().items() if steps])

    def __len__(self) -> int:
        """The number of tags (without filing the pending steps: a sink asks at every step)."""
        return len(self._tags)

    def __contains__(self, tag: object) -> bool:
        return bool(self._settled().get(tag))  # type: ignore[call-overload]

    def get(self, tag: str, default: Any = None) -> Any:  # type: ignore[override]
        """The ``[(step, value), ...]`` pairs of ``tag``, or ``default`` if it has none."""
        pairs = self._pairs_of(tag)
        return pairs if pairs is not None else default

    def tags(self, prefix: str = "") -> list[str]:
        """The tags that start with ``prefix``, sorted."""
        return sorted(t for t, steps in self._settled().items() if steps and t.startswith(prefix))

    def latest(self, tag: str) -> tuple[int, Any] | None:
        """The last ``(step, value)`` pair of ``tag`` (None if it has none)."""
        for step, records in reversed(self._pending):  # (read at every step: no filing for it)
            if tag in records:
                return step, records[tag]
        steps = self._steps.get(tag)
        return (steps[-1], self._values[tag][-1]) if steps else None

    def value_at(self, tag: str, step: int, default: Any = None) -> Any:
        """The value of ``tag`` recorded under ``step`` (the last one if several), or ``default``."""
        steps = self._settled().get(tag) or []
        for k in range(len(steps) - 1, -1, -1):
            if steps[k] == step:
                return self._values[tag][k]
        return default

    def series(self, tag: str, max_points: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of ``tag`` as float arrays (NaN where a value is no number); empty if absent.

        With ``max_points``, a longer series is thinned to at most that many points by an even stride
        counted from the end, so the last point is always kept.
        """
        steps = self._settled().get(tag)
        if not steps:
            return np.empty(0), np.empty(0)
        values = self._values[tag]
        if max_points is not None and len(steps) > max_points:
            stride = math.ceil(len(steps) / max_points)
            steps, values = steps[::-1][::stride][::-1], values[::-1][::stride][::-1]
        return np.array(steps, dtype=float), np.fromiter(map(_number, values), dtype=float, count=len(values))

    def steps(self, tag: str) -> np.ndarray:
        self[tag]  # noqa: B018 (a KeyError naming the tags present, for an absent one)
        return np.array(self._steps[tag])

    def values(self, tag: str) -> list[Any]:  # type: ignore[override]
        self[tag]  # noqa: B018
        return list(self._values[tag])

    def last(self, tag: str, default: Any = None) -> Any:
        found = self.latest(tag)
        return found[1] if found is not None else default

    def last_step(self) -> int | None:
        """The largest step any record is filed under (None for an empty history)."""
        return max((steps[-1] for steps in self._settled().values() if steps), default=None)

    def sort(self) -> None:
        """Put each tag's records in step order (stable: records of one step keep their order)."""
        for tag, steps in self._settled().items():
            order = sorted(range(len(steps)), key=steps.__getitem__)
            values = self._values[tag]
            steps[:] = [steps[k] for k in order]
            values[:] = [values[k] for k in order]
            self._pairs.pop(tag, None)

    def __repr__(self) -> str:
        return f"History({', '.join(f'{t}: {len(v)}' for t, v in sorted(self._settled().items()))})"
