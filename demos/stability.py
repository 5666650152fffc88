"""Stability: a loss spike in a small transformer, and the examples and layers behind it.

    python demos/stability.py      # about half a minute on one CPU core

Data: scikit-learn's 8x8 handwritten digits (shipped with scikit-learn, nothing is downloaded) as token
sequences: a class token, then the 8 rows of the image, each row of 8 binarised pixels one token (256
possible rows). A nanoGPT-style decoder (2 blocks, width 32, tests/models_lm.py) learns to predict each
row from the class and the rows above it, with Adam, one loss per sequence (nn.CrossEntropyLoss on
(B, V, T) logits). Two faults: at step 200 the learning rate jumps 30-fold for one step (a schedule
gone wrong), and at step 350 a batch carries six corrupted sequences (row patterns no digit has, a random
class token), appended to the dataset at the indices 1797 to 1802 and drawn by that batch only; the loop
iterates ``cockpit.track(loader)``, so the cockpit knows every example's dataset index.

The StabilityMonitor flags both spikes by OLMo-core's rule (loss > mean + 6 sigma of the last 128
steps; the first shows in the loss of step 201, after the oversized update) and tells them apart: after
the learning-rate jump no example stands out and the layers' update and gradient norms jumped; at step
350 it names the examples with the largest per-sample losses and gradient norms (the corrupted ones),
the layers whose gradient norm jumped against their recent median, and where Adam's update was
limited by eps. The batch-size (GradientNoiseScale), sharpness (Sharpness) and update-ratio (UpdateRatio) verdicts
are printed when those instruments are in this checkout. The dashboard goes to docs/img/stability_dashboard.png.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from cockpit_lite.instruments import Distance, GradNorm, Loss, PerSampleGradNorms, UpdateSize  # noqa: E402
from cockpit_lite.instruments.stability import StabilityMonitor  # noqa: E402

from cockpit_lite import Cockpit, load  # noqa: E402
from cockpit_lite.figure import DashboardFigure  # noqa: E402
from cockpit_lite.sinks.dashboard import write_atomic  # noqa: E402
from tests.models_lm import LogitsForLoss, NanoGPT  # noqa: E402

STEPS = 380
SPIKE = 350
BATCH = 32
BAD_POSITIONS = (2, 7, 13, 19, 24, 30)  # where the corrupted sequences sit in the batch of step SPIKE


def digit_sequences(seed: int = 0) -> tuple[torch.Tensor, int]:
    """(N + 6, 9) tokens: class token 256 + label, then the 8 rows as 8-bit tokens; the last 6 rows of the
    tensor are the corrupted sequences (row patterns no digit has, after a random class token)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    bits = (x >= 8).astype(np.int64).reshape(-1, 8, 8)
    rows = (bits * (2 ** np.arange(8))).sum(-1)
    seqs = np.concatenate([256 + y[:, None], rows], 1)
    rng = np.random.default_rng(seed)
    unseen = np.setdiff1d(np.arange(256), rows)  # row patterns no digit has
    k = len(BAD_POSITIONS)
    bad = np.concatenate([256 + rng.integers(0, 10, (k, 1)), rng.choice(unseen, (k, 8))], 1)
    return torch.tensor(np.concatenate([seqs, bad])), len(y)


def batch_plan(n: int, seed: int = 0) -> list[list[int]]:
    """Random batches of the clean sequences; the batch of step SPIKE holds the corrupted ones."""
    rng = np.random.default_rng(seed)
    plan = [rng.choice(n, BATCH, replace=False).tolist() for _ in range(STEPS)]
    for k, pos in enumerate(BAD_POSITIONS):
        plan[SPIKE][pos] = n + k
    return plan


def optional_instruments() -> dict[str, object]:
    """The batch-size, sharpness and update-ratio instruments, if this checkout has them (built alongside
    this one); else the exception that says why not."""
    found = {}
    for label, module, cls in (
        ("batch size (GradientNoiseScale)", "noise_scale", "GradientNoiseScale"),
        ("sharpness (Sharpness)", "sharpness", "Sharpness"),
        ("update ratios (UpdateRatio)", "update_ratio", "UpdateRatio"),
    ):
        try:
            mod = __import__(f"cockpit_lite.instruments.{module}", fromlist=[cls])
            found[label] = getattr(mod, cls)()
        except Exception as e:  # not in this checkout (ImportError), or another signature
            found[label] = e
    return found


#: Adam's learning rate, and the step at which a faulty schedule multiplies it by LR_JUMP for one step
LR, LR_SPIKE, LR_JUMP = 3e-3, 200, 30.0


def main(logdir: str = "runs/stability", out: str | None = str(ROOT / "docs" / "img" / "stability_dashboard.png")):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokens, n = digit_sequences()
    model = LogitsForLoss(NanoGPT(vocab_size=266, block_size=8, n_layer=2, n_head=2, d=32))
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    dataset = TensorDataset(tokens[:, :-1], tokens[:, 1:])  # predict each row from the class and rows above
    loader = DataLoader(dataset, batch_sampler=batch_plan(n))
    monitor = StabilityMonitor(top_k=8)
    extra = optional_instruments()
    instruments = [Loss(), GradNorm(), UpdateSize(), Distance(), PerSampleGradNorms(), monitor]
    instruments += [i for i in extra.values() if not isinstance(i, Exception)]
    shutil.rmtree(logdir, ignore_errors=True)
    t0 = time.perf_counter()
    with Cockpit(model, optimizer, loss_fn, instruments=instruments, logdir=logdir, sinks=[]) as cockpit:
        for inputs, targets in cockpit.track(loader):  # the same batches; the cockpit learns their indices
            for group in optimizer.param_groups:  # a learning-rate schedule gone wrong for one step
                group["lr"] = LR * (LR_JUMP if cockpit.step == LR_SPIKE else 1.0)
            optimizer.zero_grad()
            loss_fn(model(inputs), targets).backward()
            optimizer.step()
    seconds = time.perf_counter() - t0
    h = cockpit.history
    spikes = [int(s) for s, v in h["stability/spike"] if v == 1.0]
    bad = f"{n}..{n + len(BAD_POSITIONS) - 1}"
    print(
        f"trained {cockpit.step} steps in {seconds:.1f} s; learning rate x{LR_JUMP:g} at step {LR_SPIKE}; "
        f"corrupted sequences {bad} injected at step {SPIKE}"
    )
    print(f"spike steps flagged: {spikes}")
    z, thr, loss = (dict(h[t]) for t in ("stability/loss_z", "stability/threshold", "loss"))
    print(f"step {SPIKE}: loss {loss[SPIKE]:.3f}, threshold {thr[SPIKE]:.3f}, z {z[SPIKE]:.1f}")
    for tag, what in (("stability/examples/by_loss", "loss"), ("stability/examples/by_grad_norm", "gradient norm")):
        for step, table in h.get(tag) or []:
            column = table["loss" if what == "loss" else "grad_norm"]
            rows = ", ".join(f"{int(i)} ({v:.3g})" for i, v in zip(table["index"], column, strict=True))
            print(f"step {step}, examples by per-sample {what}: {rows}")
    for step, table in h.get("stability/layers") or []:
        rows = ", ".join(f"{name} {g:.3g}x" for name, g in zip(table["layer"], table["grad_jump"], strict=True))
        print(f"step {step}, layers by gradient-norm jump against their median: {rows}")
    print()
    print("verdicts:")
    for v in monitor.verdicts():
        print(f"  stability: {v}")
    for label, inst in extra.items():
        if isinstance(inst, Exception):
            print(f"  {label}: not available in this checkout ({type(inst).__name__})")
        else:
            said = inst.verdicts()
            print(f"  {label}: {said[0] if said else 'no verdict'}")
    if out is not None:
        title = (
            f"digits as token sequences, nanoGPT 2x32, Adam 3e-3; learning rate x{LR_JUMP:g} at step {LR_SPIKE}, "
            f"corrupted batch at step {SPIKE}"
        )
        write_atomic(out, DashboardFigure(title=title, instruments=instruments).png(load(logdir)))
        print(f"\nwrote {out}")
    return cockpit, spikes


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--logdir", default="runs/stability")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img" / "stability_dashboard.png"))
    args = ap.parse_args()
    main(args.logdir, args.out)
