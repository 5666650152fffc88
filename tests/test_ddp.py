"""DistributedDataParallel (gloo, two CPU processes): one cockpit per rank, each with its own logdir.

Per-sample statistics are those of the rank's own batch; gradient norms and the update are those the
optimizer sees (averaged over ranks). Training must run as without the cockpit: same parameters.
"""

from __future__ import annotations

import os
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, logdir: str, attach: bool) -> None:
    from cockpit_lite import Cockpit

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)))
        opt, loss_fn = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), nn.CrossEntropyLoss()
        g = torch.Generator().manual_seed(rank)
        batches = [(torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(STEPS)]
        cockpit = Cockpit(model, opt, loss_fn, logdir=os.path.join(logdir, f"rank{rank}")) if attach else None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no cockpit warning either
            for x, y in batches:
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
        if cockpit is not None:
            cockpit.close()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
        np.save(os.path.join(logdir, f"params_{'with' if attach else 'without'}_{rank}.npy"), flat)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_ddp_one_cockpit_per_rank(tmp_path):
    from cockpit_lite import load

    for attach in (False, True):
        mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), attach), nprocs=2)
    for rank in range(2):
        run = load(tmp_path / f"rank{rank}")
        assert [s for s, _ in run["loss"]] == list(range(STEPS))
        assert len(run["persample/grad_norm"][-1][1]) == 5  # the rank's own batch
        assert np.isfinite(run["tests/norm"][-1][1]) and np.isfinite(run["grad_norm"][-1][1])
        assert "grad_norm/0.weight" in run  # names of the wrapped module, without DDP's "module."
        np.testing.assert_array_equal(
            np.load(tmp_path / f"params_with_{rank}.npy"), np.load(tmp_path / f"params_without_{rank}.npy")
        )
    # DDP keeps the ranks' parameters equal: the gradients the optimizer saw were averaged
    np.testing.assert_array_equal(np.load(tmp_path / "params_with_0.npy"), np.load(tmp_path / "params_with_1.npy"))
