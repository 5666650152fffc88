"""TracIn costs: online TracIn's training overhead, and TracInCP against Captum's TracInCP.

    python benchmarks/tracin.py                       # both parts
    python benchmarks/tracin.py --part online --models mlp,cnn
    python benchmarks/tracin.py --part cp

Part "online": blocks of one epoch (--steps steps of batch 128) run interleaved over --reps repetitions
for plain training, TracIn self-influence only, and TracIn with 100 probes (exact, and with a random
projection to 64 dimensions); the median block time is given as a ratio to plain training.
Targets: <= 1.3x (self-influence) and <= 2x (100 probes).

Part "cp": sklearn digits, an MLP 64-128-128-10 trained with one checkpoint per epoch; train x test
influence (--n-test test points) and self-influence over every training example, end to end from the
same checkpoint files and learning rates, by cockpit-lite's TracInCP and by Captum's TracInCP (default
per-example path, and its sample_wise_grads_per_batch path); the largest relative difference of the
scores is printed next to the times. Target: >= 10x faster than Captum at equal numbers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cockpit_lite.instruments import Checkpoints, TracIn, TracInCP  # noqa: E402
from cockpit_lite.instruments.tracin_cp import captum_loader  # noqa: E402
from common import MODELS, interleaved  # noqa: E402

from cockpit_lite import Cockpit  # noqa: E402


# --- online TracIn --------------------------------------------------------------------------------------
def _loader(model_name: str, steps: int):
    _, data, batch = MODELS[model_name]
    torch.manual_seed(0)
    n = steps * batch
    ds = TensorDataset(data(n), torch.randint(0, 10, (n,)))
    # batches by list indexing (no per-example collate), so the loader costs little in both arms
    return DataLoader(ds, batch_size=None, sampler=BatchSampler(RandomSampler(ds), batch, drop_last=True))


ONLINE = {
    "plain": None,
    "tracin self": lambda probes: [TracIn(write_scores=False)],
    "tracin 100 probes": lambda probes: [TracIn(probes=probes, write_scores=False)],
    "tracin 100 probes, proj 64": lambda probes: [TracIn(probes=probes, projection_dim=64, write_scores=False)],
}


def online(models: list[str], steps: int, reps: int) -> list[dict]:
    rows = []
    for model_name in models:
        factory, data, _ = MODELS[model_name]
        loader = _loader(model_name, steps)
        torch.manual_seed(1)
        probes = (data(100), torch.randint(0, 10, (100,)))
        built = {}
        for name, make in ONLINE.items():
            torch.manual_seed(0)
            model = factory()
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            loss_fn = nn.CrossEntropyLoss()
            cockpit = Cockpit(model, opt, loss_fn, instruments=make(probes)) if make else None
            built[name] = (model, opt, loss_fn, cockpit)

        def run(b):
            model, opt, loss_fn, cockpit = b
            for x, y in cockpit.track(loader) if cockpit is not None else loader:  # noqa: B023
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()

        runners = {name: (lambda b=b: run(b)) for name, b in built.items()}
        for r in runners.values():
            r()  # warm-up
        med = interleaved(runners, reps)
        for name, b in built.items():
            if b[3] is not None:
                b[3].close()
            row = {"model": model_name, "config": name, "ms_per_step": med[name] / steps * 1e3}
            row["ratio"] = med[name] / med["plain"]
            rows.append(row)
            print(f"{model_name:5} {name:28} {row['ms_per_step']:9.2f} ms/step {row['ratio']:6.2f}x", flush=True)
    return rows


# --- TracInCP vs Captum ---------------------------------------------------------------------------------
def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target, dtype=torch.long)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def cp(epochs: int, n_test: int, captum_batch: int) -> list[dict]:
    from captum.influence import TracInCP as CaptumTracInCP

    X, y = _digits()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    test, train = perm[:n_test], perm[n_test:]
    Xtr, ytr, Xte, yte = X[train], y[train], X[test], y[test]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(Xtr, ytr), batch_size=32, shuffle=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with Cockpit(model, opt, loss_fn, instruments=[Checkpoints(every=len(loader), final=False)], logdir=tmp) as ck:
            for _ in range(epochs):
                for xb, yb in ck.track(loader):
                    opt.zero_grad()
                    loss_fn(model(xb), yb).backward()
                    opt.step()
        ours = TracInCP(model, loss_fn, tmp, batch_size=512)
        paths = [str(p) for p in ours.paths]
        print(f"TracInCP: {len(Xtr)} training x {n_test} test examples, {len(paths)} checkpoints, MLP 64-128-128-10")

        t0 = time.perf_counter()
        infl = ours.influence((Xtr, ytr), (Xte, yte))
        selfi = ours.self_influence((Xtr, ytr))
        t_ours = time.perf_counter() - t0

        model.eval()  # Captum does not switch modes; this model has no mode-dependent layer anyway
        for label, sw, lf in (
            ("captum TracInCP (per-example)", False, nn.CrossEntropyLoss(reduction="none")),
            ("captum TracInCP (sample_wise)", True, nn.CrossEntropyLoss(reduction="sum")),
        ):
            t0 = time.perf_counter()
            captum = CaptumTracInCP(
                model,
                TensorDataset(Xtr, ytr),
                checkpoints=paths,
                checkpoints_load_func=captum_loader,
                loss_fn=lf,
                batch_size=captum_batch,
                sample_wise_grads_per_batch=sw,
            )
            c_infl = captum.influence((Xte, yte)).double().numpy().T
            c_self = captum.self_influence().double().numpy()
            t_c = time.perf_counter() - t0
            rows.append(
                {
                    "method": label,
                    "seconds": t_c,
                    "ours_seconds": t_ours,
                    "speedup": t_c / t_ours,
                    "max_rel_diff_influence": _rel(infl, c_infl),
                    "max_rel_diff_self": _rel(selfi, c_self),
                }
            )
        print(f"  cockpit-lite TracInCP: {t_ours:7.2f} s (influence + self-influence)")
        for r in rows:
            print(
                f"  {r['method']:30} {r['seconds']:7.2f} s   ours {r['speedup']:6.1f}x faster   max rel diff "
                f"influence {r['max_rel_diff_influence']:.1e}, self {r['max_rel_diff_self']:.1e}"
            )
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="online,cp")
    ap.add_argument("--models", default="mlp")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed block (one epoch)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--epochs", type=int, default=5, help="TracInCP: epochs = checkpoints")
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--captum-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    out = {}
    if "online" in args.part:
        print(f"online TracIn: {args.reps} interleaved reps x {args.steps} steps, batch as in benchmarks/common.py")
        out["online"] = online(args.models.split(","), args.steps, args.reps)
    if "cp" in args.part:
        out["cp"] = cp(args.epochs, args.n_test, args.captum_batch)
    return out


if __name__ == "__main__":
    main()
