"""The training run of tests/test_resume.py, importable and runnable as a script.

A small MLP with dropout (so the RNG state matters) trained by SGD with momentum (so the optimizer state
matters), global clipping in the loop, and a cockpit with every built-in instrument that keeps state
between steps. The data order is a fixed list of index batches (a new seeded permutation per epoch),
so a resumed run feeds batches ``[k:]`` through ``cockpit.track`` with the dataset indices TracIn needs.

    python -m tests.resume_run CHECKPOINT LOGDIR CKDIR STOP    # resume from CHECKPOINT, train to STOP

writes ``LOGDIR/verdicts.json`` (the cockpit's verdicts after closing).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from cockpit_lite.instruments import (
    Alpha,
    Checkpoints,
    Clipping,
    Distance,
    GradientTests,
    GradNorm,
    Loss,
    PerSampleGradNorms,
    TracIn,
    UpdateSize,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cockpit_lite import Cockpit

N_DATA, BATCH, STEPS = 24, 8, 16
#: the step the interrupted run stops before: Alpha then has a pending start point (step K - 1), the
#: clipping windows (10 steps) are partly filled, and AGC holds steps 4 and 5 of a batch of 4
K = 6
LOOP_MAX_NORM = 0.8  # clip_grad_norm_ in the loop


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_DATA, 6, generator=g)
    y = torch.randint(0, 3, (N_DATA,), generator=g)
    return TensorDataset(x, y)


def probes() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)


def batches() -> list[list[int]]:
    """Index batches of all STEPS steps: a seeded permutation per epoch, cut into batches."""
    g = torch.Generator().manual_seed(3)
    out: list[list[int]] = []
    while len(out) < STEPS:
        perm = torch.randperm(N_DATA, generator=g).tolist()
        out += [perm[i : i + BATCH] for i in range(0, N_DATA, BATCH)]
    return out[:STEPS]


def instruments(ckdir: str | os.PathLike) -> list:
    return [
        Loss(),
        GradNorm(),
        UpdateSize(),
        Distance(),
        PerSampleGradNorms(),
        GradientTests(),
        Alpha(window=6, verdict_every=4, min_alphas=3),
        Clipping(max_norm=0.01, agc_clip=0.05, per_sample_clip=0.5, window=10, cosine_every=2, batch_steps=4),
        TracIn(probes=probes(), top_k=5),
        Checkpoints(every=4, directory=ckdir),
    ]


def build(logdir: str | os.PathLike, ckdir: str | os.PathLike, seed: int = 0, resume: bool = False):
    """(model, optimizer, loss_fn, cockpit), the model initialised from ``seed`` (this reseeds the global
    RNG). The cockpit attaches before a resumed run loads its checkpoint, as a training script would."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Dropout(0.2), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    cockpit = Cockpit(model, optimizer, loss_fn, instruments=instruments(ckdir), logdir=logdir, sinks=[], resume=resume)
    return model, optimizer, loss_fn, cockpit


def train(model, optimizer, loss_fn, cockpit, start: int, stop: int) -> None:
    """Steps [start, stop) of the fixed batch order. The loader draws its base seed from its own
    generator, so building a loader at resumption leaves the global RNG (dropout's) untouched."""
    loader = DataLoader(dataset(), batch_sampler=batches()[start:stop], generator=torch.Generator())
    for x, y in cockpit.track(loader):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), LOOP_MAX_NORM)
        optimizer.step()


def save(path: str | os.PathLike, model, optimizer, cockpit) -> None:
    """The checkpoint of docs/quickstart.md, "Resuming a run", with the length of the run's JSON lines
    so far (to resume into the same logdir after cutting what the interrupted run wrote later)."""
    jsonl = Path(cockpit.logdir, "cockpit.jsonl")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "cockpit": cockpit.state_dict(),
            "jsonl_bytes": jsonl.stat().st_size if jsonl.exists() else 0,
        },
        path,
    )


def resume(path, logdir, ckdir, stop: int, drop: str | None = None) -> Cockpit:
    """Build anew, load the checkpoint (weights_only), train from its step to ``stop``, close.
    ``drop``: an instrument key whose state is left out (to show the comparison then fails)."""
    # another initialisation than the saved run's: whatever the checkpoint does not restore shows
    model, optimizer, loss_fn, cockpit = build(logdir, ckdir, seed=1, resume=True)
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    if drop is not None:
        del state["cockpit"]["instruments"][drop]
    cockpit.load_state_dict(state["cockpit"])
    train(model, optimizer, loss_fn, cockpit, cockpit.step, stop)
    cockpit.close()
    return cockpit


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)  # as tests/conftest.py: the same kernels, bit for bit, as the parent's run
    path, logdir, ckdir, stop = argv
    cockpit = resume(path, logdir, ckdir, int(stop))
    Path(logdir, "verdicts.json").write_text(json.dumps(cockpit.verdicts()))


if __name__ == "__main__":
    main(sys.argv[1:])
