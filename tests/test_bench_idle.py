"""benchmarks/idle.py: a short run on the tiny model times every arm on every round, finds the budget's
rest steps, and reports the budget's measure of its hooks; the timing rounds shuffle the arms."""

from __future__ import annotations

import math
import random
import sys

import pytest

from tests.bench_util import benchmark_module


@pytest.fixture(scope="module")
def idle():
    yield from benchmark_module("idle")


def test_a_short_run_reports_the_hooks_and_the_budgets_rest_steps(idle, monkeypatch):
    orders = []
    shuffle = random.Random.shuffle

    def seen(self, order):
        shuffle(self, order)
        orders.append(tuple(name for name, _ in order))  # ((name, runner) pairs)

    monkeypatch.setattr(random.Random, "shuffle", seen)  # (the rounds' order: common.interleaved_times)
    r = idle.run("tiny", steps=60, warmup=60, budget=0.05)
    assert r["plain_ms"] > 0 and math.isfinite(r["hooks_us"]) and math.isfinite(r["budget_mean_us"])
    # after the warm-up (46 steps) most steps of the tiny model are rest steps that track nothing
    assert 0 < r["rest_steps"] <= 60 and math.isfinite(r["budget_rest_us"])
    assert r["budget_hooks_ms"] > 0  # (its hooks measured on the warm-up's idle steps)
    assert len(orders) == 60 and all(sorted(o) == ["budget", "hooks", "plain"] for o in orders)
    assert len(set(orders)) > 1  # the order changes from round to round


def test_the_benchmarks_interleaving_shuffles_the_order_of_the_arms(idle):
    common = sys.modules["common"]  # (benchmarks/common.py, which the script imports)
    calls = []
    runners = {k: (lambda k=k: calls.append(k)) for k in "abcd"}
    times = common.interleaved_times(runners, reps=12)
    assert {k: len(v) for k, v in times.items()} == {k: 12 for k in "abcd"}
    rounds = [tuple(calls[4 * i : 4 * i + 4]) for i in range(12)]
    assert all(sorted(r) == list("abcd") for r in rounds) and len(set(rounds)) > 1
