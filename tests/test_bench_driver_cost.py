"""benchmarks/driver_cost.py runs end to end on a short schedule and reports every arm."""

from __future__ import annotations

import math

import pytest

from tests.bench_util import benchmark_module


@pytest.fixture(scope="module")
def driver_cost():
    yield from benchmark_module("driver_cost")


def test_measure_reports_each_arm(driver_cost) -> None:
    r = driver_cost.measure(reps=2, steps=2, arms=("none", "loss", "all", "lean"))
    assert set(r) == {"plain", "none", "loss", "all", "lean"}
    assert r["plain"] > 0 and all(math.isfinite(v) for v in r.values())


def test_main_prints_the_difference(driver_cost, capsys) -> None:
    driver_cost.main(["--reps", "1", "--steps", "2"])
    out = capsys.readouterr().out
    assert "all - lean" in out and "gradient_tests" in out
