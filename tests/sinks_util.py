"""Shared helpers of the sink, dashboard, CLI and profiler tests: a tiny run and an event-file reader."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from cockpit_lite import Cockpit, Instrument
from tests import models

B = 8


class Talker(Instrument):
    """Emits what the not-yet-built instruments will: a verdict string that changes, a TracIn-like
    table, an alpha value and clipping scalars (fixed, known values)."""

    def compute(self, record):
        s = record.step
        return {
            "verdict/lr": "fine" if s < 3 else "too large: alpha > 1",
            "tracin/top_self_influence": {"index": np.array([5, 7, 9]), "self_influence": np.array([0.1, 0.9, 0.5])},
            "alpha": -0.5 + 0.25 * s,
            "clip/global/norm": 1.0 + s,
            "clip/global/frac_clipped": 0.5,
        }


def train(
    steps: int = 6, talker: bool = True, seed: int = 0, clock: list[float] | None = None, **cockpit_kw
) -> Cockpit:
    """A few SGD steps of the tiny MLP with the economy preset (+ Talker); returns the closed cockpit.
    ``clock``: given a list, ``time.perf_counter()`` (ms) is appended before the cockpit is made and after
    each iteration (the wall-clock bounds of what the cockpit's hooks can have measured)."""
    torch.manual_seed(seed)
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    from cockpit_lite.instruments.presets import economy

    # the Talker stands in for Alpha's verdict (too few steps here for a real one) and TracIn's table
    instruments = [i for i in economy() if not (talker and i.key == "alpha")] + ([Talker()] if talker else [])
    gen = torch.Generator().manual_seed(seed)
    tick = clock.append if clock is not None else lambda t: None
    tick(time.perf_counter() * 1e3)
    with Cockpit(model, opt, loss_fn, instruments=instruments, **cockpit_kw) as cockpit:
        for _ in range(steps):
            x, y = torch.randn(B, 6, generator=gen), torch.randint(0, 3, (B,), generator=gen)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            tick(time.perf_counter() * 1e3)
    return cockpit


def accumulator(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(
        str(logdir),
        size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0, "compressedHistograms": 0},
    )
    acc.Reload()
    return acc
