"""A long run: memory and step time over many steps, and the time to read the run back.

    python benchmarks/long_run.py [--steps 100000] [--window 2048] [--unbounded] [--lines 1000000]

1. A small MLP (64-128-10, batch 32, SGD) trains ``--steps`` steps under a Cockpit with the economy
   preset and a logdir (JSON lines; no TensorBoard). Printed every tenth of the run: the step, the
   process RSS (MB, from /proc/self/statm) and the median wall time per step of the last block (ms).
   ``--unbounded`` sets ``cockpit.history.window = None`` (every record kept in memory, the behaviour
   before the window) for comparison.
2. ``load()`` of the run's cockpit.jsonl: seconds, and with a tag and step selection.
3. ``--lines N``: a synthetic cockpit.jsonl of N steps with 4 scalar tags (the JsonLines format), and
   the time of ``load()`` whole, of one tag, and of the last 1% of the steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cockpit_lite import Cockpit, load  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def train(logdir: str, steps: int, window: int | None, unbounded: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    X, y = torch.randn(4096, 64), torch.randint(0, 10, (4096,))
    block = max(steps // 10, 1)
    print(f"{'step':>8} {'RSS MB':>8} {'ms/step':>8} {'history pairs':>14}")
    with Cockpit(model, opt, loss_fn, instruments="economy", logdir=logdir, sinks=[]) as cp:
        if unbounded:
            cp.history.window = None
        elif window is not None:
            cp.history.window = window
        times: list[float] = []
        for step in range(steps):
            i = (step * 32) % 4064
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = loss_fn(model(X[i : i + 32]), y[i : i + 32])
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            if (step + 1) % block == 0:
                pairs = sum(len(cp.history.get(t) or ()) for t in cp.history)
                ms = 1e3 * statistics.median(times)
                print(f"{step + 1:>8} {rss_mb():>8.1f} {ms:>8.3f} {pairs:>14}", flush=True)
                times = []


def timed(what: str, fn) -> object:
    t0 = time.perf_counter()
    out = fn()
    print(f"  {what}: {time.perf_counter() - t0:.2f} s")
    return out


def synthetic(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for s in range(n):
            rec = {"loss": 2.0 / (1 + s), "grad_norm": 1.0 + s % 7, "update_size": 1e-3, "lr": 0.1}
            f.write(json.dumps({"step": s, "records": rec}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--window", type=int, default=None, help="cockpit.history.window (default: History's)")
    ap.add_argument("--unbounded", action="store_true", help="keep every record in memory (window=None)")
    ap.add_argument("--lines", type=int, default=1_000_000, help="synthetic run length to load (0: none)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        if args.steps:
            run = os.path.join(d, "run")
            print(f"training {args.steps} steps, economy preset, logdir {run}")
            train(run, args.steps, args.window, args.unbounded)
            size = os.path.getsize(os.path.join(run, "cockpit.jsonl")) / 2**20
            print(f"load() of the run ({size:.0f} MB of JSON lines):")
            h = timed("whole", lambda: load(run))
            print(f"    {len(h)} tags, {sum(len(h[t]) for t in h)} records, skipped {h.skipped}")
            timed("tag 'loss', last 10% of steps", lambda: load(run, tags=["loss"], steps=(args.steps * 9 // 10, None)))
        if args.lines:
            path = Path(d) / "synthetic" / "cockpit.jsonl"
            path.parent.mkdir()
            synthetic(path, args.lines)
            print(f"load() of a synthetic {args.lines}-step run, 4 scalar tags ({path.stat().st_size / 2**20:.0f} MB):")
            timed("whole", lambda: load(path.parent))
            timed("one tag ['loss']", lambda: load(path.parent, tags=["loss"]))
            timed("prefix 'grad'", lambda: load(path.parent, tags="grad"))
            timed("last 1% of steps", lambda: load(path.parent, steps=(args.lines * 99 // 100, None)))


if __name__ == "__main__":
    main()
