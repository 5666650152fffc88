"""The recipes of docs/recipes/ run as written, and do what they say."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import torch
from torch import nn

from cockpit_lite import load
from tests import models

DOCS = Path(__file__).resolve().parents[1] / "docs"


def code_blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), flags=re.S)


def test_sink_recipe(tmp_path):
    torch.manual_seed(0)
    model, loss_fn = models.mlp(), nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def train():
        for _ in range(3):
            x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()

    namespace = dict(model=model, optimizer=optimizer, loss_fn=loss_fn, logdir=str(tmp_path), train=train)
    for block in code_blocks("recipes/sink.md"):
        exec(block, namespace)
    with open(tmp_path / "scalars.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    run = load(tmp_path)
    got = {(int(r["step"]), r["tag"]): float(r["value"]) for r in rows}
    for tag in ("loss", "grad_norm", "tests/norm", "alpha"):
        for step, value in run[tag]:
            if isinstance(value, float):
                assert got[(step, tag)] == value or (math.isnan(value) and math.isnan(got[(step, tag)]))
    assert {s for s, _ in got} == {0, 1, 2}
