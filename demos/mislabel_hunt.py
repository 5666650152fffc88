"""Mislabel hunt: which ranking of the training examples finds the flipped labels first?

    python demos/mislabel_hunt.py            # two settings, about two minutes on 2 cores
    python demos/mislabel_hunt.py --quick    # a few epochs (used by the tests)

Data: scikit-learn's handwritten digits (1797 8x8 images, shipped with the package). A share of the
training labels is flipped; every method ranks the training examples, and the table gives the fraction
of the flipped examples found in the top 10/20/30% of its ranking (the "best possible" row: inspecting
10% of the data finds at most half of them when 20% are flipped), with the seconds the method took
end to end (its training run with the instruments it needs, plus any computation afterwards; the
machine may be shared, so compare with the plain training time printed above the table).

Methods:
    online TracIn    self-influence traced during training (instruments.TracIn), sum over steps of
                     (eta/b) ||g_t(z)||^2
    TracInCP         self-influence from one checkpoint per epoch (instruments.Checkpoints + TracInCP)
    TracInCP last    the same from the final checkpoint only
    cumulative loss  the per-example training loss summed over all steps that used the example
    final loss       the per-example loss of the trained model
    random           a random permutation

Settings: "easy" is 10% uniform label noise on a small MLP; "hard" is 20% structured noise (every
flipped example of class c gets the same wrong class) on a wide two-hidden-layer MLP trained long
enough to memorise the flipped labels, where the final loss no longer sees them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from cockpit_lite.instruments import Checkpoints, TracIn, TracInCP
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cockpit_lite import Cockpit, Instrument, Need


class CumulativeLoss(Instrument):
    """Sum over the steps of each example's training loss (the strong baseline of REFERENCE.md s. 5)."""

    NEEDS = frozenset({Need.PER_SAMPLE_LOSS, Need.INDICES})

    def __init__(self, n: int, **kw):
        super().__init__(**kw)
        self.total = np.zeros(n)

    def compute(self, record):
        if record.indices is not None and record.per_sample_loss is not None:
            np.add.at(self.total, record.indices, record.per_sample_loss)
        return {}


@dataclass
class Setting:
    name: str
    hidden: tuple[int, ...]
    noise: float
    structured: bool
    epochs: int
    lr: float = 0.1
    batch: int = 32


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target, dtype=torch.long)


def flip(y: torch.Tensor, share: float, structured: bool, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = len(y)
    flipped = rng.choice(n, int(round(share * n)), replace=False)
    y = y.clone()
    if structured:
        target = rng.permutation(10)
        while np.any(target == np.arange(10)):  # a derangement: every class maps to another one
            target = rng.permutation(10)
        y[flipped] = torch.as_tensor(target)[y[flipped]]
    else:
        y[flipped] = (y[flipped] + torch.as_tensor(rng.integers(1, 10, len(flipped)))) % 10
    return y, np.sort(flipped)


def mlp(hidden: tuple[int, ...]) -> nn.Module:
    layers, d = [], 64
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    return nn.Sequential(*layers, nn.Linear(d, 10))


def train(setting: Setting, X, y, instruments_fn=None, logdir=None, seed=0):
    """Train with a fixed seed (identical trajectories across calls); return model, seconds, instruments."""
    torch.manual_seed(seed)
    model = mlp(setting.hidden)
    opt = torch.optim.SGD(model.parameters(), lr=setting.lr)
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(X, y), batch_size=setting.batch, shuffle=True)
    instruments = instruments_fn(len(loader)) if instruments_fn else None
    t0 = time.perf_counter()
    if instruments is None:
        for _ in range(setting.epochs):
            for xb, yb in loader:
                opt.zero_grad()
                loss_fn(model(xb), yb).backward()
                opt.step()
    else:
        with Cockpit(model, opt, loss_fn, instruments=instruments, logdir=logdir) as cockpit:
            for _ in range(setting.epochs):
                for xb, yb in cockpit.track(loader):
                    opt.zero_grad()
                    loss_fn(model(xb), yb).backward()
                    opt.step()
    return model, time.perf_counter() - t0, instruments, loss_fn


QS = (0.1, 0.2, 0.3)


def found(scores: np.ndarray, flipped: np.ndarray, share: float) -> float:
    top = np.argsort(-scores, kind="stable")[: int(round(share * len(scores)))]
    return len(np.intersect1d(top, flipped)) / len(flipped)


def run_setting(setting: Setting, seed: int = 0) -> list[tuple[str, list[float], float]]:
    X, y_true = digits()
    y, flipped = flip(y_true, setting.noise, setting.structured, seed)
    n = len(y)
    rows: list[tuple[str, np.ndarray, float]] = []

    _, t_plain, _, _ = train(setting, X, y, seed=seed)

    _, t, (tracin,), _ = train(setting, X, y, lambda steps: [TracIn(write_scores=False)], seed=seed)
    rows.append(("online TracIn", tracin.self_influence(), t))

    with tempfile.TemporaryDirectory() as tmp:
        model, t, _, loss_fn = train(setting, X, y, lambda steps: [Checkpoints(every=steps)], logdir=tmp, seed=seed)
        t0 = time.perf_counter()
        cp = TracInCP(model, loss_fn, tmp, batch_size=512)
        rows.append((f"TracInCP ({len(cp.paths)} ckpts)", cp.self_influence((X, y)), t + time.perf_counter() - t0))
        t0 = time.perf_counter()
        last = TracInCP(model, loss_fn, cp.paths[-1:], batch_size=512)
        rows.append(("TracInCP last ckpt", last.self_influence((X, y)), t_plain + time.perf_counter() - t0))

    _, t, (cum,), _ = train(setting, X, y, lambda steps: [CumulativeLoss(n)], seed=seed)
    rows.append(("cumulative loss", cum.total, t))

    t0 = time.perf_counter()
    with torch.no_grad():
        final = nn.CrossEntropyLoss(reduction="none")(model(X), y).double().numpy()
    rows.append(("final loss", final, t_plain + time.perf_counter() - t0))

    rows.append(("random", np.random.default_rng(seed + 1).permutation(n).astype(float), t_plain))
    out = [(name, [found(s, flipped, q) for q in QS], sec) for name, s, sec in rows]
    out.append(("best possible", [min(1.0, q / setting.noise) for q in QS], float("nan")))
    acc = (model(X).argmax(1) == y).float().mean().item()
    print(
        f"\n{setting.name}: {n} digits, {len(flipped)} labels flipped ({setting.noise:.0%}, "
        f"{'structured' if setting.structured else 'uniform'}), MLP 64-{'-'.join(map(str, setting.hidden))}-10, "
        f"{setting.epochs} epochs SGD lr {setting.lr} batch {setting.batch}; plain training {t_plain:.1f} s, "
        f"final accuracy on the noisy labels {acc:.2f}"
    )
    print(f"  {'ranking':22} {'top 10%':>8} {'top 20%':>8} {'top 30%':>8} {'seconds':>8}")
    for name, fr, sec in out:
        print(f"  {name:22} {fr[0]:8.2f} {fr[1]:8.2f} {fr[2]:8.2f} {'' if np.isnan(sec) else f'{sec:8.2f}':>8}")
    return out


SETTINGS = {
    "easy": Setting("easy", hidden=(32,), noise=0.10, structured=False, epochs=30),
    "hard": Setting("hard", hidden=(128, 128), noise=0.20, structured=True, epochs=150),
}


def main(argv=None) -> dict[str, list]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few epochs per setting (for tests)")
    ap.add_argument("--settings", default="easy,hard")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    for name in args.settings.split(","):
        s = SETTINGS[name]
        if args.quick:
            s = Setting(s.name, s.hidden, s.noise, s.structured, epochs=2)
        results[name] = run_setting(s, seed=args.seed)
    return results


if __name__ == "__main__":
    main()
