"""Learning-rate debugging with alpha: the same network at three learning rates, side by side.

    python demos/lr_debugging.py            # about a minute on 2 CPU cores
    tensorboard --logdir runs/lr_debugging  # once a TensorBoard sink is configured

A small MLP learns scikit-learn's handwritten digits (shipped with scikit-learn, nothing is downloaded)
with plain SGD at a learning rate that is too small, one that is about right and one that is too large.
Each run streams its records to its own logdir under ``runs/lr_debugging/`` (read them back with
``cockpit_lite.load(logdir)``). The loss curves alone do not say which way to change the learning rate;
the alpha verdict does: too small (alpha near -1: steps stop far short of the valley floor), about right
(alpha around 0), too large (alpha near or above 1: steps overshoot to the opposite flank).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cockpit_lite.instruments import Alpha  # noqa: E402

from cockpit_lite import Cockpit  # noqa: E402

#: learning rates of plain SGD for this network and batch size (label -> lr)
LEARNING_RATES = {"too small": 0.01, "about right": 0.6, "too large": 1.2}
BATCH = 128


def digits(seed: int = 0):
    """sklearn's 8x8 digits, scaled to [0, 1], split 75/25 into train and test tensors."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.75 * len(y))
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[te], y[te]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def train(lr: float, steps: int, logdir: str | None, data, seed: int = 0) -> dict:
    """Train with plain SGD at ``lr`` for ``steps`` steps with the economy cockpit attached."""
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    with Cockpit(model, optimizer, loss_fn, instruments="economy", logdir=logdir) as cockpit:
        for _ in range(steps):  # the user's loop, unchanged
            idx = torch.randint(0, len(y_tr), (BATCH,), generator=gen)
            optimizer.zero_grad()
            loss = loss_fn(model(x_tr[idx]), y_tr[idx])
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        acc = float((model(x_te).argmax(1) == y_te).float().mean())
    alpha = next(i for i in cockpit.instruments if isinstance(i, Alpha))
    alphas = np.array([a for _, a in cockpit.history["alpha"]], dtype=float)
    return {
        "lr": lr,
        "test_acc": acc,
        "final_loss": cockpit.history.last("loss"),
        "median_alpha": float(np.nanmedian(alphas[-alpha.window :])),
        "verdict": alpha.verdict(),
        "statement": alpha.verdicts()[0] if alpha.verdicts() else "",
        "logdir": logdir,
    }


def main(steps: int = 600, quiet: bool = False, root: str | os.PathLike | None = "runs/lr_debugging") -> list[dict]:
    """Train at the three learning rates; print and return one result per run (``root=None``: no files)."""
    say = (lambda *a, **k: None) if quiet else print
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a network this small only loses time to thread synchronisation
    try:
        results = _run_all(steps, root, say)
    finally:
        torch.set_num_threads(threads)
    _report(results, root, say)
    return results


def _run_all(steps: int, root, say) -> list[dict]:
    data = digits()
    results = []
    for expected, lr in LEARNING_RATES.items():
        logdir = None if root is None else os.path.join(os.fspath(root), f"lr={lr}")
        if logdir is not None and os.path.exists(os.path.join(logdir, "cockpit.jsonl")):
            os.remove(os.path.join(logdir, "cockpit.jsonl"))  # a fresh run, not appended to an old one
        t0 = time.perf_counter()
        res = train(lr, steps, logdir, data)
        res["expected"] = expected
        res["seconds"] = time.perf_counter() - t0
        results.append(res)
        say(f"lr={lr:<6} {steps} steps in {res['seconds']:.1f} s")
    return results


def _report(results: list[dict], root, say) -> None:
    say()
    say(f"{'learning rate':>14} {'test acc':>9} {'final loss':>11} {'median alpha':>13}  alpha verdict")
    for r in results:
        say(f"{r['lr']:>14} {r['test_acc']:>9.3f} {r['final_loss']:>11.3f} {r['median_alpha']:>13.2f}  {r['verdict']}")
    say()
    for r in results:
        say(f"lr={r['lr']}: {r['statement']}")
    if root is not None:
        say()
        say("Each run's records (alpha, alpha/status, verdict/lr, loss, gradient tests, ...) are in:")
        for r in results:
            say(f"  {r['logdir']}/cockpit.jsonl    (cockpit_lite.load('{r['logdir']}'))")
        say(f"TensorBoard (all three runs side by side): tensorboard --logdir {root}")
        say(f"A short report per run:                     cockpit-lite summary {results[0]['logdir']}")
        say(f"The dashboard of a run as a picture:        cockpit-lite dashboard {results[0]['logdir']} -o dash.png")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--root", default="runs/lr_debugging")
    args = ap.parse_args()
    main(steps=args.steps, root=args.root)
