"""Cost of the coupled path (exact per-sample statistics of a model with train-mode BatchNorm, by
replaying the batch's forward: cockpit_lite/persample/coupled.py) on ResNet-18 for CIFAR.

    python benchmarks/coupled.py                      # width 64 (11.2 M parameters), B = 32, 3 repetitions
    python benchmarks/coupled.py --width 16 --reps 5  # a quarter of the width

Configurations, each one training step of its own copy of the model (SGD, momentum 0.9), interleaved
(one step of each per repetition), medians, printed as ratios to plain training:

    plain          zero_grad, forward, cross-entropy (mean), backward, step
    capture        plain + CoupledRecorder (RNG state, inputs, output gradient captured by hooks)
    dot            capture + g_i . gbar (InnerTest) by one JVP, gbar = p.grad
    economy-proj   capture + g_i . gbar and Alpha's two projections (onto d_t and d_{t-1}, at theta_t
                   from a snapshot taken before the step): three JVPs
    norms-loop     capture + ||g_i||^2 per parameter and g_i . gbar: one replay, one backward per example
    norms-batched  the same with the backward batched over chunks of examples (vmap over backward),
                   chunk from the path's memory estimate (CHUNK_BYTES)
    norms-auto     the default: the first step times one chunk each way, later steps use the faster

Then, one step each, not interleaved: the peak of live CPU tensor memory (malloc in use, sampled every
millisecond by a thread) above the level before the step, and the chunk the path chose.
"""

from __future__ import annotations

import argparse
import copy
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import interleaved, malloc_in_use_mb  # noqa: E402

from cockpit_lite.needs import Need  # noqa: E402
from cockpit_lite.persample.coupled import CHUNK_BYTES, CoupledPath, CoupledRecorder  # noqa: E402
from tests.models import resnet18_cifar  # noqa: E402


class Runner:
    """One configuration: its own model copy, optimizer, recorder and path."""

    def __init__(self, model: nn.Module, batches, mode: str | None, chunk_bytes: int):
        self.model = copy.deepcopy(model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.loss_fn = nn.CrossEntropyLoss()
        self.batches, self.k = batches, 0
        self.mode = mode
        self.params = dict(self.model.named_parameters())
        self.rec = CoupledRecorder(self.model) if mode != "plain" else None
        self.path = CoupledPath(self.model, self.params, chunk_bytes=chunk_bytes)
        if mode == "norms-loop":
            self.path.vjp_mode = "loop"
        if mode == "norms-batched":
            self.path.vjp_mode = "batched"
        # "norms-auto": the default, one chunk timed each way at its first step, then the faster
        self.prev_update: dict[str, torch.Tensor] | None = None
        self.last = None

    def __call__(self) -> None:
        x, y = self.batches[self.k % len(self.batches)]
        self.k += 1
        if self.rec is not None:
            self.rec.reset()
        self.opt.zero_grad()
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        if self.mode in ("plain", "capture"):
            self.opt.step()
            return
        rec, b = self.rec, x.shape[0]
        gbar = {n: p.grad for n, p in self.params.items()}  # mean loss: gbar = p.grad
        args = (rec.args, rec.kwargs, rec.output_grads, float(b))
        if self.mode == "dot":
            self.last = self.path.statistics(*args, {Need.PER_SAMPLE_DOT_MEAN}, state=rec.state, mean_grad=gbar)
            self.opt.step()
        elif self.mode == "economy-proj":
            theta_t = self.path.snapshot()
            self.opt.step()
            d = {n: p.detach() - theta_t[n] for n, p in self.params.items()}
            dirs = {"start": d}
            if self.prev_update is not None:
                dirs["end"] = self.prev_update
            self.last = self.path.statistics(
                *args, {Need.PER_SAMPLE_DOT_MEAN}, dirs, state=rec.state, values=theta_t, mean_grad=gbar
            )
            self.prev_update = d
        else:  # norms
            needs = {Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_DOT_MEAN}
            self.last = self.path.statistics(*args, needs, state=rec.state, mean_grad=gbar)
            self.opt.step()


class PeakThread:
    """Peak of malloc_in_use_mb() sampled every millisecond while in the block, above the level at entry."""

    def __enter__(self):
        self.base = self.peak = malloc_in_use_mb()
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, malloc_in_use_mb())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.extra_mb = self.peak - self.base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chunk-bytes", type=int, default=CHUNK_BYTES)
    ap.add_argument(
        "--modes", default="plain,capture,dot,economy-proj,norms-loop,norms-batched,norms-auto", help="comma-separated"
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = resnet18_cifar(width=a.width)
    batches = [(torch.randn(a.batch, 3, 32, 32), torch.randint(0, 10, (a.batch,))) for _ in range(2)]
    modes = a.modes.split(",")
    runners = {m: Runner(model, batches, m, a.chunk_bytes) for m in modes}
    n_params = sum(p.numel() for p in model.parameters())
    print(f"ResNet-18 (CIFAR) width {a.width}: {n_params / 1e6:.2f} M parameters, B = {a.batch}, {a.threads} thread(s)")
    for r in runners.values():  # warm-up (and the second Alpha direction)
        r()
        r()
    med = interleaved(runners, a.reps)
    base = med.get("plain")
    print(f"{'configuration':<16}{'s/step':>10}{'x plain':>10}")
    for m, t in med.items():
        print(f"{m:<16}{t:>10.3f}{(t / base if base else float('nan')):>10.2f}")
    print("\npeak CPU tensor memory above the level before the step (one step each):")
    for m, r in runners.items():
        with PeakThread() as pk:
            r()
        extra = ""
        if r.path.last_chunk is not None and m.startswith("norms"):
            c, per = r.path.last_chunk
            extra = f"  chunk {c} examples, estimate {per / 2**20:.0f} MiB per example ({c * per / 2**20:.0f} MiB)"
        print(f"{m:<16}{pk.extra_mb:>8.0f} MiB{extra}")
    for m, r in runners.items():
        if r.path.vjp_times:
            times = ", ".join(f"{k} {v:.3f} s" for k, v in r.path.vjp_times.items())
            print(f"\n{m}: the 'auto' trial (per example: {times}) chose '{r.path.vjp_mode}'")


if __name__ == "__main__":
    main()
