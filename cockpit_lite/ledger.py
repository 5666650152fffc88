"""The overhead budget's measurements (:mod:`cockpit_lite.budget` holds the policy that reads them): each
step's cost c_t and wall time w_t over the last window, the recent costs of each kind of step, the plain
step, the hooks' floor and the parts of the recent rest steps. Plain Python values, saved with the run.

c_t is the step's timed work plus, unless the budget counts beyond them, its hooks' own time
(``cost/driver_ms``); the accounting is the caller's (``beyond``), and the caller forgets what an
accounting change makes stale (:meth:`Ledger.forget`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

#: the window of the guarantee, in steps
WINDOW = 100
#: how many recent measurements the estimates take the upper quartile of, per kind of step
RECENT = {"run": 8, "follow": 8, "rest": 16}
#: recent steps whose smallest w_t - c_t is the plain step p
PLAIN = 16
#: recent steps whose hooks' time (``cost/driver_ms``) gives the hooks' estimate h; also the rest steps
#: whose parts are kept
HOOKS = 16

REST = "rest"


def upper_quartile(values: Iterable[float]) -> float | None:
    """The ceil(3n/4)-th smallest of n values (the largest of up to 3; one or two outliers among 8 do not
    count), None for none."""
    ordered = sorted(values)
    return ordered[math.ceil(3 * len(ordered) / 4) - 1] if ordered else None


class Ledger:
    """What the last steps cost. Attributes: :attr:`obs` ((step, c_t, w_t, kind) of the last WINDOW
    steps), :attr:`recent` (c_t of the last steps of each kind in ``RECENT``), :attr:`plain` (w_t - c_t of
    the last PLAIN steps), :attr:`hooks` (the hooks' time and the budget's decision on the last HOOKS
    steps no instrument tracked that followed such a step; :attr:`hooks_after`: the same after a tracked
    step, whose records' tail they hold), :attr:`rest` ((timed c_t, hooks, w_t) of the last HOOKS rest
    steps)."""

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self.obs: deque[tuple[int, float, float, str]] = deque(maxlen=WINDOW)
        self._sums = (0.0, 0.0)
        self.recent: dict[str, deque[float]] = {k: deque(maxlen=n) for k, n in RECENT.items()}
        self.plain: deque[float] = deque(maxlen=PLAIN)
        self.hooks: deque[float] = deque(maxlen=HOOKS)
        self.hooks_after: deque[float] = deque(maxlen=HOOKS)
        #: the last step no instrument tracked
        self.quiet: int | None = None
        self.rest: deque[tuple[float, float, float]] = deque(maxlen=HOOKS)

    def add(
        self, step: int, kind: str, timed: float, hooks: float, wall: float, quiet: bool, beyond: bool, first: bool
    ) -> float:
        """Step ``step`` of ``kind`` took ``timed`` ms in timed regions and ``hooks`` ms in the hooks outside
        them, of ``wall`` ms; ``quiet``: no instrument tracked it; ``beyond``: c_t leaves the hooks out;
        ``first``: the run's first step (its hooks pay one-time costs: no floor). Returns c_t."""
        c = timed if beyond else timed + hooks
        obs = self.obs
        if len(obs) == WINDOW:
            _, c0, w0, _ = obs[0]
            self._sums = (self._sums[0] - c0, self._sums[1] - w0)
        obs.append((step, c, wall, kind))
        self._sums = (self._sums[0] + c, self._sums[1] + wall)
        if step % WINDOW == 0:  # no drift of the running sums over a long run
            self._resum()
        self.plain.append(max(wall - c, 0.0))
        # the floor: a step no instrument tracks costs its hooks and the budget's decision (its only region)
        if quiet and self.quiet == step - 1:  # (the last step's records are in this one's hooks)
            self.hooks.append(hooks + timed)
        elif quiet and not first:
            self.hooks_after.append(hooks + timed)
        if quiet:
            self.quiet = step
        if kind in self.recent:
            self.recent[kind].append(c)
        if kind == REST:
            self.rest.append((timed, hooks, wall))
        return c

    def _resum(self) -> None:
        self._sums = (math.fsum(o[1] for o in self.obs), math.fsum(o[2] for o in self.obs))

    def share(self) -> float:
        """S of the last WINDOW steps: sum c_t / sum w_t."""
        return self._sums[0] / self._sums[1]

    def plain_ms(self) -> float | None:
        """The plain step p: the smallest w_t - c_t of the last PLAIN steps (None before any)."""
        return min(self.plain) if self.plain else None

    def estimate(self, kind: str) -> float | None:
        """The upper quartile of the recent costs of ``kind`` (None before any)."""
        return upper_quartile(self.recent[kind])

    def hooks_ms(self) -> float:
        """The hooks' floor h: the upper quartile of :attr:`hooks` (of :attr:`hooks_after` before any), 0
        before either."""
        return upper_quartile(self.hooks or self.hooks_after) or 0.0

    def last_rest(self, n: int, beyond: bool) -> tuple[float, float, int]:
        """(sum of c_t, sum of w_t, how many) of the last ``n`` rest steps, c_t without the hooks when
        ``beyond``."""
        c = w = 0.0
        k = 0
        for t, h, wt in reversed(self.rest):
            c, w, k = c + (t if beyond else t + h), w + wt, k + 1
            if k == n:
                break
        return c, w, k

    def measured(self, lo: int, hi: int) -> Iterator[tuple[int, float, float]]:
        """(step, c_t, w_t) of the steps observed in [lo, hi)."""
        return ((s, c, w) for s, c, w, _ in self.obs if lo <= s < hi)

    def forget(self, kinds: Iterable[str], rest: bool = False) -> None:
        """Drop the recent costs of ``kinds`` (and the rest steps' parts with ``rest``): they described
        another set of instruments or another accounting."""
        for kind in kinds:
            self.recent[kind].clear()
        if rest:
            self.rest.clear()

    def state_dict(self) -> dict[str, Any]:
        return {
            "obs": [list(o) for o in self.obs],
            "recent": {k: list(v) for k, v in self.recent.items()},
            "plain": list(self.plain),
            "hooks": list(self.hooks),
            "hooks_after": list(self.hooks_after),
            "quiet": self.quiet,
            "rest_whole": [list(r) for r in self.rest],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (keys a state of an older version lacks start empty)."""
        self._clear()
        self.obs.extend((int(s), float(c), float(w), str(k)) for s, c, w, k in state["obs"])
        self._resum()
        for kind, values in state["recent"].items():
            self.recent[str(kind)].extend(float(v) for v in values)
        self.plain.extend(float(v) for v in state["plain"])
        self.hooks.extend(float(v) for v in state.get("hooks", []))
        self.hooks_after.extend(float(v) for v in state.get("hooks_after", []))
        self.quiet = None if state.get("quiet") is None else int(state["quiet"])
        self.rest.extend((float(t), float(h), float(w)) for t, h, w in state.get("rest_whole", []))
