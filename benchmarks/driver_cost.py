"""What the cockpit's Python costs a tracked step, apart from its tensor work: the benchmark MLP's shape shrunk
to a tiny one (16-8-8-4, B = 8) whose kernels cost almost nothing, so that what a configuration adds to a
plain step is the driver's and the instruments' Python (hooks, events, the step record, the host batch,
records, costs) plus the dispatch of their few small tensor ops.

    python benchmarks/driver_cost.py            # us per step over plain: none, each economy instrument alone, all
    python benchmarks/driver_cost.py --reps 80

Arms, timed interleaved (``common.interleaved_times``: the order shuffled each round), medians:

- ``none``: a Cockpit with no instruments (its hooks on an untracked step);
- ``loss``, ``grad_norm``, ``update_size``, ``distance``, ``gradient_tests``: one instrument alone (the fixed cost
  of a tracked step plus that instrument's);
- ``all``: the five (economy minus Alpha, as ``floor.py --parts economy-alpha`` times on the real MLP);
- ``lean``: ``floor.LeanEconomy`` on the same tiny MLP (the same numbers, hand-written).

The difference ``all - lean`` on the tiny MLP is what separates the cockpit from the lean reference on the real
one (``floor.py``: cockpit / lean at B = 128), as the tensor work there is the same (docs/performance.md). At
these sizes every layer takes the projection route for g_i . gbar (the real MLP's first two layers take the
Grams'): other kernels, the same Python.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cockpit_lite.instruments import Distance, GradientTests, GradNorm, Loss, UpdateSize  # noqa: E402
from common import OPTIMIZERS, interleaved_times, train_steps  # noqa: E402
from floor import LeanEconomy  # noqa: E402

from cockpit_lite import Cockpit  # noqa: E402

ARMS = {
    "none": (),
    "loss": (Loss,),
    "grad_norm": (GradNorm,),
    "update_size": (UpdateSize,),
    "distance": (Distance,),
    "gradient_tests": (GradientTests,),
    "all": (Loss, GradNorm, UpdateSize, Distance, GradientTests),
}


def tiny_mlp() -> nn.Module:
    """The benchmark MLP's layers (Linear, ReLU, Linear, ReLU, Linear) at sizes where kernels are nearly free."""
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def measure(reps: int = 40, steps: int = 16, arms: tuple[str, ...] = (*ARMS, "lean")) -> dict[str, float]:
    """{arm: microseconds per step over plain training} (medians of ``reps`` interleaved rounds of ``steps``
    steps each, SGD), with ``"plain"`` the plain step's own microseconds."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(steps)]
    runners, attached = {}, []
    for arm in ("plain", *arms):
        torch.manual_seed(0)
        net = tiny_mlp()
        opt = OPTIMIZERS["sgd"](net.parameters())
        loss_fn = nn.CrossEntropyLoss()
        if arm == "lean":
            attached.append(LeanEconomy(net, opt, loss_fn, alpha=False))
        elif arm != "plain":
            attached.append(Cockpit(net, opt, loss_fn, instruments=[cls() for cls in ARMS[arm]], sinks=[]))
        runners[arm] = lambda net=net, opt=opt, loss_fn=loss_fn: train_steps(net, opt, loss_fn, batches)
    try:
        for run in runners.values():
            run()
        times = interleaved_times(runners, reps)
    finally:
        for a in attached:
            a.close()
    med = {k: statistics.median(v) / steps * 1e6 for k, v in times.items()}
    return {"plain": med["plain"], **{k: v - med["plain"] for k, v in med.items() if k != "plain"}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--steps", type=int, default=16)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    r = measure(args.reps, args.steps)
    print(f"torch {torch.__version__}, 1 thread, tiny MLP (16-8-8-4, B = 8), {args.reps} reps x {args.steps} steps")
    print(f"plain step {r['plain']:.0f} us; added per step over plain (us):")
    for k, v in r.items():
        if k != "plain":
            print(f"  {k:15s} {v:7.0f}")
    print(f"  all - lean      {r['all'] - r['lean']:7.0f}   (the cockpit's Python beyond the lean reference's)")


if __name__ == "__main__":
    main()
