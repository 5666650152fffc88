"""Per-step time and peak-memory overhead of instrument sets, as ratios to plain training.

    python benchmarks/overhead.py                      # every model, optimizer and configuration
    python benchmarks/overhead.py --models mlp --configs economy --optims sgd
    python benchmarks/overhead.py --models gpt,gpt-inner,resnet18 --configs economy,func-norms,func-norms-dot

Models (benchmarks/common.py): the MNIST MLP and the 3C3D-like CNN of REFERENCE.md, a small GPT
(4 layers, d = 256, T = 128, B = 16, vocabulary 512, tied embeddings; ``gpt`` returns logits for a loss
module, ``gpt-inner`` computes its loss inside forward) and ResNet-18 on 32x32 (B = 32, BatchNorm in
train mode). ``func-norms`` and ``func-norms-dot`` are torch.func references on the same model in the
same run: per-sample squared norms (and g_i . gbar) by vmap(grad) of a functional_call, timed as the
extra cost on top of a plain step, like the cockpit's configurations (common.FuncNorms).

Time: each configuration owns a model copy, optimizer and cockpit; blocks of --steps steps run
interleaved over --reps repetitions; the median block time per step is compared with plain training.
Memory: each configuration runs in a fresh subprocess; the figure is the peak of the bytes allocated
through malloc (where CPU tensors live), sampled at every module's forward/backward boundary and around
the optimizer step, minus the bytes in use before the model was built: parameters, gradients,
optimizer state, activations and everything the cockpit keeps.

``--device cuda``: models, batches and cockpits on the GPU; every timed block starts and ends with
``torch.cuda.synchronize()``. Memory is then the CUDA caching allocator's peak of allocated bytes
(``torch.cuda.max_memory_allocated``) while the configuration is built and trained, minus the bytes
allocated before it was built, measured in this process one configuration at a time (the others
freed first): the same quantity as on the CPU, without malloc's noise.

    python benchmarks/overhead.py --device cuda --models mlp,cnn,gpt,resnet18 --optims sgd \
        --configs economy-alpha,economy,func-norms        # what benchmarks/gpu.sh runs
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    MODELS,
    OPTIMIZERS,
    FuncNorms,
    PeakSampler,
    interleaved,
    loss_module,
    make_batches,
    malloc_in_use_mb,
    synchronize,
    train_steps,
)

from cockpit_lite import Cockpit  # noqa: E402


def _economy_minus_alpha():
    from cockpit_lite.instruments import Distance, GradientTests, GradNorm, Loss, UpdateSize

    return [Loss(), GradNorm(), UpdateSize(), Distance(), GradientTests()]


def _economy_clipping():
    from cockpit_lite.instruments import Clipping
    from cockpit_lite.instruments.presets import economy

    return economy() + [Clipping(max_norm=1.0, agc_clip=0.01, per_sample_clip=1.0)]


def _sinks(*which: str):
    """Sinks at their default throttle writing into the config's tmpdir (no JSON lines unless named)."""

    def make(tmpdir: str) -> dict:
        from cockpit_lite.sinks import Dashboard, JsonLines, TensorBoard

        kinds = {
            "tensorboard": lambda: TensorBoard(tmpdir),
            "dashboard": lambda: Dashboard(os.path.join(tmpdir, "dashboard.png")),
            "jsonl": lambda: JsonLines(tmpdir),
        }
        return {"sinks": [kinds[w]() for w in which]}

    return make


#: configuration name -> (instrument factory, extra Cockpit kwargs factory(tmpdir)); "plain" = no cockpit
CONFIGS = {
    "plain": None,
    "minimal": (lambda: "minimal", lambda d: {}),
    "economy-alpha": (_economy_minus_alpha, lambda d: {}),
    "economy": (lambda: "economy", lambda d: {}),
    "full": (lambda: "full", lambda d: {}),
    "economy+clipping": (_economy_clipping, lambda d: {}),
    "economy+sinks": (lambda: "economy", _sinks("tensorboard", "dashboard")),
    "economy+tensorboard": (lambda: "economy", _sinks("tensorboard")),
    "economy+dashboard": (lambda: "economy", _sinks("dashboard")),
    "economy+jsonl": (lambda: "economy", _sinks("jsonl")),
    # the overhead budget (docs/budget.md): time it over blocks of >= 100 steps (--steps 100); its
    # warm-up (4 + 6n steps: 46 for the economy preset) falls in the untimed first block
    "economy@5%": (lambda: "economy", lambda d: {"budget": 0.05}),
    # each step's records made during the next step (Cockpit(..., overlap=True)): on a GPU the device never
    # waits for the step's transfer to the host; on a CPU the same work as without
    "economy-alpha+overlap": (_economy_minus_alpha, lambda d: {"overlap": True}),
    "economy+overlap": (lambda: "economy", lambda d: {"overlap": True}),
}


#: torch.func references timed on the same model in the same run, as the extra cost on a plain step:
#: configuration name -> whether g_i . gbar is computed beside ||g_i||^2 (see common.FuncNorms)
FUNC_CONFIGS = {"func-norms": False, "func-norms-dot": True}


def config_entry(config: str):
    """A CONFIGS entry, or ``i:name+name`` for registered instruments by name (ad-hoc comparisons)."""
    if config.startswith("i:"):
        names = config[2:].split("+")
        return (lambda: names), (lambda d: {})
    return CONFIGS[config]


def build(model_name: str, optim: str, config: str, tmp: str, device: str = "cpu"):
    """(model, optimizer, loss module or None, cockpit or None, after-backward reference or None), the
    model and loss module on ``device``."""
    factory = MODELS[model_name][0]
    torch.manual_seed(0)
    model = factory().to(device)
    opt = OPTIMIZERS[optim](model.parameters())
    loss_fn = loss_module(model_name)
    if loss_fn is not None:
        loss_fn.to(device)
    cockpit, reference = None, None
    if config in FUNC_CONFIGS:
        reference = FuncNorms(model, loss_fn, dot=FUNC_CONFIGS[config])
    elif config_entry(config) is not None:
        instruments, extra = config_entry(config)
        cockpit = Cockpit(model, opt, loss_fn, instruments=instruments(), **extra(os.path.join(tmp, config)))
    return model, opt, loss_fn, cockpit, reference


def time_ratios(model_name, optim, configs, steps, reps, tmp, device="cpu"):
    """{config: seconds per step}; a configuration that cannot be built for this model (a cockpit
    without a loss module, before the loss-free engine) gets the reason instead."""
    batches = make_batches(model_name, steps, device=device)
    built, failed = {}, {}
    for c in configs:
        try:
            built[c] = build(model_name, optim, c, tmp, device)
        except Exception as e:
            failed[c] = f"{type(e).__name__}: {e}"
    runners = {c: (lambda b=b: train_steps(b[0], b[1], b[2], batches, b[4])) for c, b in built.items()}
    for run in runners.values():  # warm-up
        run()
    med = interleaved(runners, reps, device)
    for b in built.values():
        if b[3] is not None:
            b[3].close()
    return {c: med[c] / steps for c in built} | failed


def memory_child(model_name, optim, config, steps):
    """Peak bytes in use by training: everything allocated after the data (model, gradients, optimizer
    state, activations, the cockpit's own state), sampled at every layer boundary and step hook."""
    tmp = tempfile.mkdtemp()
    batches = make_batches(model_name, steps)
    base = malloc_in_use_mb()
    model, opt, loss_fn, cockpit, reference = build(model_name, optim, config, tmp)
    sampler = PeakSampler(model, opt)
    if reference is not None:
        reference.probe = sampler.sample
    train_steps(model, opt, loss_fn, batches, reference)
    sampler.sample()
    sampler.close()
    if cockpit is not None:
        cockpit.close()
    print(json.dumps({"peak_delta_mb": sampler.peak - base}))


def cuda_memory_delta(model_name, optim, config, steps, device) -> float:
    """Peak CUDA bytes allocated (MB) while ``config`` is built and trained for ``steps`` steps, minus
    those allocated before it was built (its data included), in this process (module docstring)."""
    batches = make_batches(model_name, steps, device=device)
    gc.collect()
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as tmp:
        model, opt, loss_fn, cockpit, reference = build(model_name, optim, config, tmp, device)
        train_steps(model, opt, loss_fn, batches, reference)
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        if cockpit is not None:
            cockpit.close()
    del model, opt, loss_fn, cockpit, reference
    gc.collect()
    return (peak - base) / 2**20


def memory_delta(model_name, optim, config, steps, device="cpu") -> float:
    if torch.device(device).type == "cuda":
        return cuda_memory_delta(model_name, optim, config, steps, device)
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", model_name, optim, config, "--steps", str(steps)],
        capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_delta_mb"]


#: glibc malloc settings that keep freed heap memory for reuse instead of returning it to the kernel
#: (and mapping it afresh, page fault by page fault, on the next step): the largest mmap threshold glibc
#: accepts and a trim threshold above any one step's temporaries. PyTorch's CPU tuning guide makes the
#: same point with jemalloc/tcmalloc. Read by glibc at process start, so they are set by re-executing.
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


def _malloc_setting() -> str:
    return "tuned" if all(os.environ.get(k) == v for k, v in TUNED_MALLOC.items()) else "default"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--optims", default="sgd,adam")
    ap.add_argument("--configs", default=",".join([c for c in CONFIGS if c != "plain"] + list(FUNC_CONFIGS)))
    ap.add_argument("--steps", type=int, default=5, help="steps per timed block")
    ap.add_argument("--reps", type=int, default=9, help="interleaved repetitions")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where models, batches and cockpits live")
    ap.add_argument(
        "--malloc", choices=("default", "tuned"), default="default",
        help="glibc malloc as the process starts, or TUNED_MALLOC (no page faults on re-allocated memory)",
    )  # fmt: skip
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--memory-child", nargs=3, metavar=("MODEL", "OPTIM", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.malloc == "tuned" and _malloc_setting() != "tuned":
        argv = sys.argv[1:] if argv is None else list(argv)
        os.execve(sys.executable, [sys.executable, __file__, *argv], {**os.environ, **TUNED_MALLOC})
    torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch.cuda.is_available() is False on this machine")
    if args.memory_child:
        return memory_child(*args.memory_child, args.steps)

    configs = ["plain"] + [c for c in args.configs.split(",") if c != "plain"]
    rows = []
    where = args.device
    if torch.device(args.device).type == "cuda":
        where += f" ({torch.cuda.get_device_name(args.device)}, CUDA {torch.version.cuda})"
    print(
        f"torch {torch.__version__}, device {where}, {args.threads} thread(s), {args.reps} interleaved reps x "
        f"{args.steps} steps, {_malloc_setting()} malloc"
    )
    print(f"{'model':9} {'optim':5} {'config':22} {'ms/step':>9} {'time x':>7} {'peak MB':>8} {'mem x':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models.split(","):
            for optim in args.optims.split(","):
                per_step = time_ratios(model_name, optim, configs, args.steps, args.reps, tmp, args.device)
                ran = [c for c in configs if not isinstance(per_step[c], str)]
                mem = (
                    {}
                    if args.no_memory
                    else {c: memory_delta(model_name, optim, c, args.steps, args.device) for c in ran}
                )
                for c in configs:
                    if c not in ran:
                        print(f"{model_name:9} {optim:5} {c:22} not run: {per_step[c]}")
                        continue
                    row = {
                        "model": model_name, "optim": optim, "config": c, "malloc": _malloc_setting(),
                        "device": args.device,
                        "ms_per_step": per_step[c] * 1e3, "time_ratio": per_step[c] / per_step["plain"],
                        "peak_mb": mem.get(c), "mem_ratio": mem[c] / mem["plain"] if mem else None,
                    }  # fmt: skip
                    rows.append(row)
                    m = f"{row['peak_mb']:8.1f} {row['mem_ratio']:6.2f}" if mem else ""
                    print(f"{model_name:9} {optim:5} {c:22} {row['ms_per_step']:9.2f} {row['time_ratio']:7.2f} {m}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
