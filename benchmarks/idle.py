"""What a step the cockpit does not track costs: its hooks alone, and the overhead budget's rest steps.

    python benchmarks/idle.py                       # the benchmark MLP, 2000 steps
    python benchmarks/idle.py --models tiny,mlp --steps 3000

Three arms own a copy of the model with the same initial weights: plain training, a cockpit with no
instrument (``hooks``: every step is untracked, what attaching alone costs) and the economy preset under
``budget=0.05`` (``budget``), after ``--warmup`` steps (the budget's warm-up falls there). Then the arms run
one step each in turn, in an order shuffled every round (at this scale a fixed order shifts an arm by tens
of microseconds), and each step is timed alone. Printed per model: the plain step (median) and each arm's
cost over it, the median of the per-round differences, for ``budget`` over the rounds where the budget
ran nothing (its rest steps); and the budget's own measure of its hooks (``Cockpit.budget.hooks_ms()``),
which sees the hooks' work but not PyTorch calling them. ``--device cuda``: models and batches on the GPU,
each timed step between two ``torch.cuda.synchronize()`` (the host's work and the device's in series: a
hook's host time shows in full). Figures: docs/performance.md, "Issue 15, session 17" and "session 18".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, OPTIMIZERS, interleaved_times, loss_module, make_batches  # noqa: E402

from cockpit_lite import Cockpit  # noqa: E402


def tiny() -> nn.Module:
    """A 16-16-16-4 MLP (B = 8): a step of a few hundred microseconds, where the hooks are most of it."""
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def _batches(model: str, n: int, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if model == "tiny":
        g = torch.Generator().manual_seed(0)
        pairs = [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]
        return [(x.to(device), y.to(device)) for x, y in pairs]
    return make_batches(model, n, device=device)


def run(model: str, steps: int, warmup: int, budget: float, device: str = "cpu") -> dict[str, float]:
    """Per-step costs (us) of the ``hooks`` and ``budget`` arms over plain training on ``model``."""
    build = tiny if model == "tiny" else MODELS[model][0]
    batches = _batches(model, 8, device)
    arms = {}
    for arm in ("plain", "hooks", "budget"):
        torch.manual_seed(0)
        net = build().to(device)
        opt = OPTIMIZERS["sgd"](net.parameters())
        loss_fn = nn.CrossEntropyLoss() if model == "tiny" else loss_module(model)
        if loss_fn is not None:
            loss_fn.to(device)
        cockpit = None
        if arm == "hooks":
            cockpit = Cockpit(net, opt, loss_fn, instruments=[], sinks=[])
        elif arm == "budget":
            cockpit = Cockpit(net, opt, loss_fn, instruments="economy", sinks=[], budget=budget)
        arms[arm] = (net, opt, loss_fn, cockpit)

    rest: list[bool] = []  # per round: the budget's step tracked nothing
    b = arms["budget"][3].budget

    def stepper(arm: str):
        net, opt, loss_fn, _ = arms[arm]
        done = [0]

        def step() -> None:  # one training step on this arm's next batch (the same batch for every arm)
            x, y = batches[done[0] % len(batches)]
            done[0] += 1
            opt.zero_grad(set_to_none=True)
            loss = net(x, y)[1] if loss_fn is None else loss_fn(net(x), y)
            loss.backward()
            opt.step()
            if arm == "budget" and done[0] > warmup:
                rest.append(b.decision is not None and b.decision.kind == "rest" and not b.cheap)

        return step

    runners = {arm: stepper(arm) for arm in arms}
    for _ in range(warmup):
        for run_ in runners.values():
            run_()
    times = interleaved_times(runners, steps, device)  # (one step per arm a round, in a shuffled order)
    plain = times["plain"]

    def over(arm: str, keep: list[bool]) -> float:
        return statistics.median([t - p for t, p, k in zip(times[arm], plain, keep, strict=True) if k]) * 1e6

    every = [True] * steps
    out = {"plain_ms": statistics.median(plain) * 1e3, "hooks_us": over("hooks", every), "rest_steps": sum(rest)}
    out["budget_rest_us"] = over("budget", rest) if any(rest) else float("nan")
    out["budget_mean_us"] = (sum(times["budget"]) - sum(plain)) / steps * 1e6
    out["budget_hooks_ms"] = b.hooks_ms(counted=False)
    for _, _, _, cockpit in arms.values():
        if cockpit is not None:
            cockpit.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp", help="tiny and/or keys of benchmarks/common.py's MODELS")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=150, help="untimed steps first (>= 46: the budget's warm-up)")
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # (the budget's warnings about the hooks of a small step: they are the subject)
    print(
        f"torch {torch.__version__}, device {args.device}, {args.threads} thread(s), {args.steps} rounds after "
        f"{args.warmup} untimed"
    )
    for model in args.models.split(","):
        r = run(model, args.steps, args.warmup, args.budget, args.device)
        print(
            f"{model}: plain step {r['plain_ms']:.3f} ms; hooks alone +{r['hooks_us']:.0f} us a step; "
            f"economy under budget={args.budget:g}: rest steps (nothing tracked, {r['rest_steps']} of {args.steps}) "
            f"+{r['budget_rest_us']:.0f} us, all steps +{r['budget_mean_us']:.0f} us on average; the budget "
            f"measures its hooks at {r['budget_hooks_ms'] * 1e3:.0f} us"
        )


if __name__ == "__main__":
    main()
