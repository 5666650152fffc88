"""The live history is bounded (recent steps in full, older scalars thinned), the disk keeps every
record (issue 14, Must 3)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from cockpit_lite import load
from cockpit_lite.figure import DashboardFigure
from cockpit_lite.presentation import summary_text
from cockpit_lite.records import WINDOW, History
from tests.sinks_util import train


def f(step: int) -> float:
    return 1.0 / (1.0 + step) + 0.25 * step


@pytest.mark.parametrize("window", [1, 8, 50])
def test_recent_in_full_older_thinned_bounded(window):
    n = 40 * window + 37
    h = History(window=window)
    for s in range(n):
        recs = {"loss": f(s), "per_sample": np.full(3, float(s)), "table": {"i": np.arange(2)}}
        if s % 97 == 0:
            recs["verdict/lr"] = f"fine at {s}"
        h.add(s, recs)
        assert len(h["loss"]) <= 3 * window + 1
        assert len(h["per_sample"]) <= 2 * window + 1
    last = n - 1
    pairs = h["loss"]
    steps = [s for s, _ in pairs]
    assert steps == sorted(set(steps)) and steps[-1] == last and h.latest("loss") == (last, f(last))
    assert all(v == f(s) for s, v in pairs)  # what is kept is the value recorded under its step
    assert set(range(last - window + 1, n)) <= set(steps)  # the last `window` steps in full
    # older steps: evenly thinned over the whole run, the gaps at most 4 n / window
    gaps = np.diff([-1] + steps)
    assert gaps.max() <= 4 * n / window and steps[0] <= 4 * n / window
    for tag in ("per_sample", "table"):  # arrays and tables: only the recent steps
        kept = [s for s, _ in h[tag]]
        assert kept == list(range(kept[0], n)) and window <= len(kept) <= 2 * window + 1
        assert all(v.tolist() == [float(s)] * 3 for s, v in h["per_sample"])
    # a sparse tag (a verdict every 97 steps) is never thinned
    assert h["verdict/lr"] == [(s, f"fine at {s}") for s in range(0, n, 97)]
    s_steps, s_values = h.series("loss")
    np.testing.assert_array_equal(s_values, [f(int(s)) for s in s_steps])
    assert s_steps[-1] == last


def test_no_window_keeps_everything():
    h = History(window=None)
    for s in range(5000):
        h.add(s, {"loss": f(s), "v": np.ones(2)})
    assert h.steps("loss").tolist() == list(range(5000)) and len(h["v"]) == 5000
    with pytest.raises(ValueError, match="window"):
        History(window=0)


def test_default_window_bounds_a_long_history():
    h = History()
    n = 5 * WINDOW
    for s in range(n):
        h.add(s, {"loss": f(s), "v": np.zeros(4)})
    assert len(h["loss"]) <= 3 * WINDOW + 1 and len(h["v"]) <= 2 * WINDOW + 1
    assert h.steps("loss")[-WINDOW:].tolist() == list(range(n - WINDOW, n))


def _assert_same(a, b):
    if isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys()
        for k in b:
            _assert_same(a[k], b[k])
    elif isinstance(b, np.ndarray) or isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b or (a != a and b != b)  # NaN is NaN


def test_cockpit_history_bounded_disk_complete(tmp_path, monkeypatch):
    window = 3
    monkeypatch.setattr("cockpit_lite.cockpit.History", functools.partial(History, window=window))
    cp = train(24, logdir=tmp_path, sinks=[])
    assert cp.history.window == window
    disk = load(tmp_path)
    assert disk.window is None and disk.steps("loss").tolist() == list(range(24))  # the full record
    for tag in disk:
        live = cp.history.get(tag)
        assert live is not None and len(live) <= 3 * window + 1
        s, v = live[-1]
        assert s == disk.latest(tag)[0]
        if isinstance(disk[tag][0][1], (float, str)):
            assert live[0][0] == disk[tag][0][0]  # a scalar series starts where it started
        _assert_same(v, disk.latest(tag)[1])
        recent = [p for p in disk[tag] if p[0] > s - window]
        assert [p[0] for p in live[-len(recent) :]] == [p[0] for p in recent]

    # the report and the picture read the last values and the medians over the last 10% of the steps
    # (steps 21-23, kept in full): the same from the bounded history as from disk; the cost medians
    # (over the kept records) differ
    def last_values(h):
        text = summary_text(h).split("cost per tracked step")[0]
        return text.splitlines()[1:]

    assert len(last_values(disk)) > 5 and last_values(cp.history) == last_values(disk)
    assert sum("median of last 10%" in line for line in last_values(disk)) > 3
    assert len(DashboardFigure().png(cp.history)) > 10_000
