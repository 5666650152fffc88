"""The overhead budget's ledger (cockpit_lite/ledger.py) against direct sums over a list of the steps."""

from __future__ import annotations

import math
import random

from cockpit_lite.ledger import HOOKS, PLAIN, RECENT, WINDOW, Ledger, upper_quartile


def _steps(n: int, seed: int = 0) -> list[tuple[int, str, float, float, float, bool]]:
    """(step, kind, timed, hooks, wall, quiet) of n steps: runs every 7 steps, their follow-ups, rest
    steps, some of which nothing tracked."""
    rng = random.Random(seed)
    out = []
    for s in range(n):
        kind = "run" if s % 7 == 0 else "follow" if s % 7 == 1 else "rest"
        timed = rng.uniform(0.0, 5.0) if kind != "rest" else rng.uniform(0.0, 0.1)
        quiet = kind == "rest" and rng.random() < 0.7
        out.append((s, kind, timed, rng.uniform(0.05, 0.2), 10.0 + rng.uniform(0.0, 1.0), quiet))
    return out


def test_upper_quartile_is_the_ceil_three_quarters_smallest():
    assert upper_quartile([]) is None
    assert upper_quartile([3.0]) == 3.0
    assert upper_quartile([5.0, 1.0, 3.0]) == 5.0  # the largest of up to 3
    assert upper_quartile([float(v) for v in range(8, 0, -1)]) == 6.0  # 6th smallest of 8


def test_window_estimates_and_floor_match_direct_sums():
    steps = _steps(3 * WINDOW + 11)
    ledger = Ledger()
    for s, kind, timed, hooks, wall, quiet in steps:
        c = ledger.add(s, kind, timed, hooks, wall, quiet, beyond=False, first=s == 0)
        assert c == timed + hooks
    last = steps[-WINDOW:]
    c_sum = math.fsum(t + h for _, _, t, h, _, _ in last)
    w_sum = math.fsum(w for *_, w, _ in last)
    assert math.isclose(ledger.share(), c_sum / w_sum, rel_tol=1e-12)
    assert ledger.plain_ms() == min(w - t - h for _, _, t, h, w, _ in steps[-PLAIN:])
    for kind, n in RECENT.items():
        mine = [t + h for _, k, t, h, _, _ in steps if k == kind][-n:]
        assert ledger.estimate(kind) == sorted(mine)[math.ceil(3 * len(mine) / 4) - 1]
    # the floor: quiet steps that follow a quiet step
    pairs = zip(steps, steps[1:], strict=False)
    floor = [t + h for (_, *_, q0), (_, _, t, h, _, q) in pairs if q and q0][-HOOKS:]
    assert ledger.hooks_ms() == sorted(floor)[math.ceil(3 * len(floor) / 4) - 1]
    rest = [(t, h, w) for _, k, t, h, w, _ in steps if k == "rest"][-5:]
    c, w, n = ledger.last_rest(5, beyond=True)
    assert n == 5 and math.isclose(c, sum(t for t, _, _ in rest)) and math.isclose(w, sum(w for *_, w in rest))
    c, _, _ = ledger.last_rest(5, beyond=False)
    assert math.isclose(c, sum(t + h for t, h, _ in rest))
    lo, hi = steps[-30][0], steps[-10][0]
    assert [s for s, _, _ in ledger.measured(lo, hi)] == list(range(lo, hi))


def test_beyond_leaves_the_hooks_out_and_forget_drops_what_it_names():
    ledger = Ledger()
    for s, kind, timed, hooks, wall, quiet in _steps(40):
        assert ledger.add(s, kind, timed, hooks, wall, quiet, beyond=True, first=s == 0) == timed
    ledger.forget(("run",), rest=True)
    assert ledger.estimate("run") is None and ledger.estimate("rest") is not None and not ledger.rest


def test_state_round_trip():
    ledger = Ledger()
    for s, kind, timed, hooks, wall, quiet in _steps(150, seed=3):
        ledger.add(s, kind, timed, hooks, wall, quiet, beyond=False, first=s == 0)
    again = Ledger()
    again.load_state_dict(ledger.state_dict())
    assert again.state_dict() == ledger.state_dict()
    assert math.isclose(again.share(), ledger.share(), rel_tol=1e-12) and again.hooks_ms() == ledger.hooks_ms()
