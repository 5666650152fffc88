"""The overhead budget's cost on each benchmark model: ``Cockpit(..., budget=0.05)`` against plain training.

    python benchmarks/budget.py                                  # MLP, CNN, small GPT, ResNet-18; budget 0.05
    python benchmarks/budget.py --models gpt --steps 100 --reps 3

For each model two arms own a copy of the model with the same initial weights: plain training and the
economy preset under the budget. Both first run ``--warmup`` untimed steps (the budget's warm-up, 44
steps for the economy preset, falls there), then ``--reps`` rounds of ``--steps``-step blocks run
interleaved (SGD with momentum, 1 thread). Printed per model:

- the plain step (median ms) and the budget arm's time over plain training's, as the median of the
  per-round ratios with their quartiles (``common.paired_ratio``): everything the cockpit costs, timed
  regions or not;
- the largest share the cockpit's own records give any window of 100 steps after the warm-up,
  S(W) = sum c_t / sum w_t, summed here from ``cost/cockpit_ms``, ``cost/sinks_ms``, ``cost/driver_ms``
  (the hooks' own time; left out when the budget says the hooks alone exceed it) and ``cost/step_ms`` (a
  step with nothing scheduled writes no cost records: its c_t is taken as the budget's hooks estimate and
  its w_t as the plain arm's median step), and the budget's own ``budget/share`` at its largest over the
  windows that begin after its warm-up;
- the schedule the budget chose: its last ``budget/every``, the steps each instrument ran on over the
  whole run (``Cockpit.budget.thinned``; "every step" for the cheap ones) and the last ``budget/plan``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cockpit_lite import Cockpit
from cockpit_lite.sinks import Sink

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, interleaved_times, make_batches, paired_ratio, train_steps  # noqa: E402
from overhead import build  # noqa: E402

WINDOW = 100


class Keep(Sink):
    """Keeps every scalar record of the run (a live history thins old steps: this one does not)."""

    def __init__(self) -> None:
        self.values: dict[str, dict[int, float | str]] = {}

    def write(self, step: int, records: Mapping[str, Any]) -> None:
        for tag, v in records.items():
            if isinstance(tag, str) and isinstance(v, (int, float, str)):
                self.values.setdefault(tag, {})[step] = v


def window_share(kept: Keep, first: int, last: int, plain_ms: float, hooks_ms: float | None) -> float:
    """The largest S(W) over the windows of ``WINDOW`` steps within [first, last] (module docstring), from
    the cost records: c_t = cost/cockpit_ms + cost/sinks_ms + cost/driver_ms, w_t = cost/step_ms +
    cost/sinks_ms. A step without records (nothing ran) counts the hooks' estimate ``hooks_ms`` over the
    plain step's median. With ``hooks_ms`` None (the budget counts the instruments beyond the hooks: the
    hooks alone exceed it) c_t leaves the hooks out."""
    tags = ("cost/cockpit_ms", "cost/sinks_ms", "cost/step_ms", "cost/driver_ms")
    c, s, w, d = (kept.values.get(t, {}) for t in tags)
    own = (lambda t: d.get(t, hooks_ms)) if hooks_ms is not None else (lambda t: 0.0)
    shares = []
    for t0 in range(first, last - WINDOW + 2):
        steps = range(t0, t0 + WINDOW)
        cost = sum(c.get(t, 0.0) + s.get(t, 0.0) + own(t) for t in steps)
        wall = sum(w.get(t, plain_ms) + s.get(t, 0.0) for t in steps)
        shares.append(cost / wall)
    return max(shares) if shares else float("nan")


def run_model(name: str, budget: float, steps: int, reps: int, warmup: int, device: str = "cpu") -> dict:
    batches = make_batches(name, steps, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        plain = build(name, "sgd", "plain", tmp, device)
        model, opt, loss_fn = build(name, "sgd", "plain", tmp, device)[:3]  # the same initial weights
        kept = Keep()
        cockpit = Cockpit(model, opt, loss_fn, instruments="economy", sinks=[kept], budget=budget)
        arms = {"plain": plain[:3], "budget": (model, opt, loss_fn)}
        for b in arms.values():  # untimed: the budget's own warm-up falls here
            for _ in range(max(1, -(-warmup // steps))):
                train_steps(*b, batches)
        first = cockpit.step
        runners = {k: (lambda b=b: train_steps(*b, batches)) for k, b in arms.items()}
        blocks = interleaved_times(runners, reps, device)
        times = {k: [t / steps for t in v] for k, v in blocks.items()}
        last = cockpit.step - 1
        plain_ms = statistics.median(times["plain"]) * 1e3
        ran = {}
        for inst in cockpit.instruments:
            thinned = cockpit.budget.thinned(inst.key)
            ran[inst.key] = "every step" if thinned is None else f"{thinned[0]} of {thinned[1]} steps"
        # budget/share at step t is over steps t - 99 .. t: a window wholly after the warm-up from start + 99 on
        since = max(first, (cockpit.budget.start or 0) + WINDOW - 1)
        shares = [v for t, v in kept.values.get("budget/share", {}).items() if since <= t <= last]
        every = [v for t, v in sorted(kept.values.get("budget/every", {}).items()) if t <= last]
        plans = [v for t, v in sorted(kept.values.get("budget/plan", {}).items()) if t <= last]
        beyond = cockpit.budget.beyond_hooks
        hooks_ms = cockpit.budget.hooks_ms(counted=False)
        cockpit.close()
    return {
        "plain_ms": plain_ms,
        "ratio": paired_ratio(times["budget"], times["plain"]),
        "window_max": window_share(kept, first, last, plain_ms, None if beyond else hooks_ms),
        "hooks_ms": hooks_ms,
        "beyond_hooks": beyond,
        "budget_share_max": max(shares) if shares else float("nan"),
        "every": every[-1] if every else None,
        "ran": ran,
        "steps": last - first + 1,
        "plan": plans[-1] if plans else "",
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,cnn,gpt,resnet18")
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=100, help="steps per timed block (>= 100: one window)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=100, help="untimed steps first (>= 44: the budget's warm-up)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--device", default="cpu", help="cuda: models, batches and cockpits on the GPU (blocks synchronized)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} thread(s), budget {args.budget}, "
        f"{args.reps} interleaved reps x {args.steps} steps after {args.warmup} untimed"
    )
    for name in args.models.split(","):
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}: one of {sorted(MODELS)}")
        r = run_model(name, args.budget, args.steps, args.reps, args.warmup, args.device)
        med, lo, hi = r["ratio"]
        print(
            f"\n{name}: plain step {r['plain_ms']:.1f} ms; budget arm {med:.3f}x plain [{lo:.3f}, {hi:.3f}] "
            f"over {r['steps']} timed steps"
        )
        counted = "without the hooks: they alone exceed the budget" if r["beyond_hooks"] else "the hooks counted"
        print(
            f"  largest 100-step window share from the cost records ({counted}; hooks {r['hooks_ms']:.3g} ms a "
            f"step): {r['window_max']:.2%}; budget/share at most {r['budget_share_max']:.2%}; budget/every {r['every']}"
        )
        print("  instruments ran on: " + ", ".join(f"{k} {v}" for k, v in r["ran"].items()) + " (whole run)")
        print(f"  plan: {r['plan']}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
