"""Where a tracked step's time goes, by torch.profiler: plain training against a cockpit configuration on
the same model, a few steps each after a warm-up.

    python benchmarks/profile_step.py --device cuda --models gpt,resnet18 --config economy-alpha
    python benchmarks/profile_step.py --models mlp --trace /tmp/traces     # Chrome traces too

For each model it prints, per step: the wall time (synchronized), the time the device was busy (the
sum of its kernels; on a CPU none), the host-side operators' own time, the kernel launches and the
host-device synchronisations (``cudaStreamSynchronize``, ``cudaEventSynchronize``, ``cudaDeviceSynchronize``,
blocking ``cudaMemcpy``); then the operators with the most own host time and the most device time
under the cockpit. On a GPU a step whose wall time is far above its device time is bound by the host
(Python, operator dispatch, launches): the cockpit's extra kernels then cost their launches, not their
arithmetic. Issue 15, Must 4 (benchmarks/gpu.sh runs it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_batches, synchronize, train_steps  # noqa: E402
from overhead import build  # noqa: E402

from cockpit_lite.profiling import PREFIX  # noqa: E402

SYNCS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy")


def _kernel(evt) -> bool:
    """A kernel or copy on the device (the labels around them, ``cockpit_lite/<name>`` and PyTorch's own such
    as ``Optimizer.step#SGD.step``, appear on the device's timeline too, spanning their kernels and gaps)."""
    return evt.device_type == DeviceType.CUDA and not evt.key.startswith((PREFIX, "Optimizer.", "ProfilerStep"))


def _device_us(evt) -> float:
    """An averaged event's own device time in microseconds (the attribute's name moved in torch 2.4)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, name):
            return float(getattr(evt, name))
    return 0.0


def _by_region(prof) -> dict[str, float]:
    """Device time (us) of the kernels launched inside each cockpit region (the innermost
    ``cockpit_lite/<name>`` label around the operator that launched them), the rest under "training"."""
    out: dict[str, float] = {}
    for e in prof.events():
        kernels = getattr(e, "kernels", None) or []
        us = sum(k.duration for k in kernels)
        if not us:
            continue
        label, p = "training", e
        while p is not None:
            if p.name.startswith(PREFIX):
                label = p.name
                break
            p = p.cpu_parent
        out[label] = out.get(label, 0.0) + us
    return out


def _regions(prof) -> dict[str, float]:
    try:  # (a diagnostic: a profiler whose events lack the links leaves it empty, never the run)
        return _by_region(prof)
    except Exception as e:
        print(f"  (device time by region not available: {type(e).__name__}: {e})")
        return {}


def _summary(prof, steps: int, wall_s: float) -> dict:
    events = prof.key_averages()
    kernels = [e for e in events if _kernel(e)]
    launches = sum(e.count for e in events if "LaunchKernel" in e.key)
    syncs = {k: sum(e.count for e in events if e.key == k) / steps for k in SYNCS}
    host_ops = [e for e in events if not e.key.startswith(("cuda", "cu")) and e.self_cpu_time_total > 0]
    return {
        "wall_ms": 1e3 * wall_s / steps,
        "device_ms": sum(_device_us(e) for e in kernels) / 1e3 / steps,
        "host_ops_ms": sum(e.self_cpu_time_total for e in host_ops) / 1e3 / steps,
        "launches": launches / steps,
        "syncs": syncs,
        "events": events,
        "regions": _regions(prof),
    }


def profile_config(model_name: str, optim: str, config: str, steps: int, warmup: int, device: str, trace: str | None):
    """(summary dict) of ``steps`` profiled steps of ``config`` ("plain" for no cockpit) on a fresh model."""
    with tempfile.TemporaryDirectory() as tmp:
        model, opt, loss_fn, cockpit, reference = build(model_name, optim, config, tmp, device)
        batches = make_batches(model_name, warmup + steps, device=device)
        after = reference  # (a torch.func reference runs between backward and the step, as in overhead.py)
        train_steps(model, opt, loss_fn, batches[:warmup], after)
        synchronize(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if str(device).startswith("cuda") else [])
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            train_steps(model, opt, loss_fn, batches[warmup:], after)
            synchronize(device)
            wall = time.perf_counter() - t0
        if cockpit is not None:
            cockpit.close()
        if trace:
            os.makedirs(trace, exist_ok=True)
            prof.export_chrome_trace(os.path.join(trace, f"{model_name}-{config}.json"))
        return _summary(prof, steps, wall)


def _table(events, key: str, n: int) -> str:
    """The ``n`` operators with the most own host time (``key`` "host"), or the ``n`` kernels and copies
    with the most device time ("device")."""
    if key == "device":
        rows = sorted((e for e in events if _kernel(e)), key=_device_us, reverse=True)[:n]
    else:
        rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    lines = [f"    {'operator / kernel':80s} {'calls':>7s} {'own host ms':>12s} {'device ms':>10s}"]
    for e in rows:
        lines.append(
            f"    {e.key[:80]:80s} {e.count:7d} {e.self_cpu_time_total / 1e3:12.2f} {_device_us(e) / 1e3:10.2f}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="mlp,cnn,gpt,resnet18")
    ap.add_argument("--config", default="economy-alpha", help="a configuration of benchmarks/overhead.py")
    ap.add_argument("--optim", default="sgd")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--top", type=int, default=12, help="operators listed per table")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--trace", help="a folder for Chrome traces of the profiled steps")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, device {args.device}, {args.steps} profiled steps after {args.warmup}, per step:"
    )
    for name in args.models.split(","):
        plain = profile_config(name, args.optim, "plain", args.steps, args.warmup, args.device, args.trace)
        tracked = profile_config(name, args.optim, args.config, args.steps, args.warmup, args.device, args.trace)
        print(
            f"\n{name}: {'':14s} {'wall ms':>8s} {'device ms':>10s} {'host ops ms':>12s} {'launches':>9s}  "
            "syncs: stream/event/device/memcpy"
        )
        for label, s in (("plain", plain), (args.config, tracked)):
            print(
                f"  {label:20s} {s['wall_ms']:8.2f} {s['device_ms']:10.2f} {s['host_ops_ms']:12.2f} "
                f"{s['launches']:9.0f}  {'/'.join(f'{v:.1f}' for v in s['syncs'].values())}"
            )
        print(f"  {args.config}: the most own host time (all {args.steps} steps)")
        print(_table(tracked["events"], "host", args.top))
        if str(args.device).startswith("cuda"):
            print(f"  {args.config}: the kernels with the most device time (all {args.steps} steps)")
            print(_table(tracked["events"], "device", args.top))
            regions = sorted(tracked["regions"].items(), key=lambda kv: -kv[1])
            print(
                f"  {args.config}: device ms per step by region: "
                + ", ".join(f"{k.removeprefix(PREFIX)} {v / 1e3 / args.steps:.2f}" for k, v in regions)
            )


if __name__ == "__main__":
    main()
