"""benchmarks/budget.py: its window share is the windows' sum of the cost records over their wall time,
and a short run on the MLP reports a schedule, a share and the steps each instrument ran on."""

from __future__ import annotations

import math

import pytest

from tests.bench_util import benchmark_module


@pytest.fixture(scope="module")
def budget():
    yield from benchmark_module("budget")


def test_window_share_sums_the_cost_records_of_each_window(budget):
    kept = budget.Keep()
    # steps 0..149: a run step every 50 (cockpit 20 ms and hooks 0.5 ms of a 120 ms step), rest steps write
    # no cost records (their hooks: the budget's estimate, 0.2 ms)
    for t in range(150):
        if t % 50 == 0:
            kept.write(t, {"cost/cockpit_ms": 20.0, "cost/step_ms": 120.0, "cost/driver_ms": 0.5, "budget/plan": "p"})
        kept.write(t, {"cost/sinks_ms": 1.0} if t % 50 == 0 else {})
    plain = 100.0
    got = budget.window_share(kept, 0, 149, plain, 0.2)
    # a window holding two run steps (t0 = 1..50 hold 50 and 100; t0 = 0 holds 0 and 50) is the largest
    wall = 2 * (120.0 + 1.0) + 98 * plain
    assert got == pytest.approx((2 * (20.0 + 1.0 + 0.5) + 98 * 0.2) / wall, rel=1e-12)
    # the hooks alone over the budget (None): the instruments' work beyond them
    assert budget.window_share(kept, 0, 149, plain, None) == pytest.approx(2 * (20.0 + 1.0) / wall, rel=1e-12)
    assert kept.values["budget/plan"] == {0: "p", 50: "p", 100: "p"}  # strings kept, every step


def test_a_short_budget_run_reports_its_schedule(budget):
    r = budget.run_model("mlp", 0.05, steps=50, reps=2, warmup=50)
    assert r["steps"] == 100 and r["plain_ms"] > 0
    # (0 where nothing ran in the timed steps: the MLP's step is short, its hooks alone may exceed 5%)
    assert math.isfinite(r["window_max"]) and 0 <= r["window_max"] < 0.5
    assert r["plan"].startswith("overhead budget 0.05") and "The cockpit's hooks" in r["plan"]
    assert r["hooks_ms"] > 0 and isinstance(r["beyond_hooks"], bool)
    assert set(r["ran"]) == {"loss", "grad_norm", "update_size", "distance", "per_sample_grad_norms",
                             "gradient_tests", "alpha"}  # fmt: skip
    assert all(v == "every step" or v.endswith(" steps") for v in r["ran"].values())
