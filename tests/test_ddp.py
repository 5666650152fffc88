"""DistributedDataParallel (gloo, two CPU processes) against one process on the concatenated batch.

Every rank builds the same Cockpit with the same logdir; rank 0 alone writes one run whose records
are those of the global batch. References, computed here in one process with no torch.distributed:

- equal local batches (DistributedSampler, 4 + 4 examples): one process on the concatenated batch
  (rank 0's examples first), the same model, optimizer and instruments;
- unequal local batches (3 + 5): DDP averages the ranks' mean gradients, so the reference is one
  process that accumulates the two ranks' batches as micro-batches with each loss divided by 2;
- clipping in the loop (``clip_grad_norm_`` between backward and step): the norm after DDP's
  all-reduce, before and after clipping, as the loop itself measured it.

Every tag of the economy preset plus TracIn (self-influence and probe influence, dataset indices from
DistributedSampler through ``cockpit.track``) must equal the reference to float32 round-off, one
record per step; both ranks hold the same history; the parameters are bit-identical with and without
the cockpit. All scenarios share one spawn of two processes (starting them costs most of the time).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import pickle
import re
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cockpit_lite.instruments.clipping import Clipping
from cockpit_lite.instruments.gradient_tests import gradient_tests
from cockpit_lite.instruments.presets import economy
from cockpit_lite.instruments.tracin import TracIn
from cockpit_lite.instruments.tracin_cp import Checkpoints
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from cockpit_lite import Cockpit, Instrument, compat, distributed, load
from cockpit_lite.providers.param_norms import PARAM_NORMS
from cockpit_lite.sinks.tensorboard import TensorBoard

WORLD = 2
N_DATA = 32
STEPS = 4
EQUAL = (4, 4)
UNEQUAL = (3, 5)
MAX_NORM = 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N_DATA, 6, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


def _probes():
    g = torch.Generator().manual_seed(4)
    return torch.randn(3, 6, generator=g), torch.tensor([0, 1, 2])


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _bn_net() -> nn.Module:
    """A train-mode BatchNorm couples the examples of each rank's batch (the coupled path)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


def _instruments():
    return [*economy(), TracIn(probes=_probes(), top_k=5)]


def _no_probes():
    return [*economy(), TracIn(top_k=5)]


def _clipping():
    return [Clipping(max_norm=MAX_NORM, per_sample_clip=1.0, batch_steps=1)]


def _rank_batches(rank: int, sizes: tuple[int, ...]) -> list[list[int]]:
    """Rank ``rank``'s index batches: DistributedSampler's shuffled share, cut into sizes[rank]."""
    if sizes[0] == sizes[1]:
        sampler = DistributedSampler(range(N_DATA), num_replicas=WORLD, rank=rank, shuffle=True, seed=1)
        share = list(sampler)
    else:  # unequal shares of one permutation: rank 0 takes 3 of every 8, rank 1 the next 5
        perm = torch.randperm(N_DATA, generator=torch.Generator().manual_seed(1)).tolist()
        per = sum(sizes)
        share = [i for s in range(STEPS) for i in perm[s * per + sum(sizes[:rank]) :][: sizes[rank]]]
    b = sizes[rank]
    return [share[k * b : (k + 1) * b] for k in range(STEPS)]


def _accumulate(model, opt, loader, cockpit, micro: int) -> None:
    """Each step: ``micro`` micro-batches of the loader's batches, loss / micro each; DDP all-reduces at
    the last backward only (``no_sync`` before)."""
    loss_fn = cockpit.loss_fn
    it = iter(cockpit.track(loader))
    for _ in range(STEPS):
        opt.zero_grad()
        for k in range(micro):
            x, y = next(it)
            sync = k == micro - 1 or not isinstance(model, nn.parallel.DistributedDataParallel)
            with contextlib.nullcontext() if sync else model.no_sync():
                (loss_fn(model(x), y) / micro).backward()
        opt.step()


def _train(model, opt, loader, cockpit=None, clip=None, log=None):
    loss_fn = cockpit.loss_fn if cockpit is not None else nn.CrossEntropyLoss()  # the module it watches
    batches = cockpit.track(loader) if cockpit is not None else loader
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        if clip is not None:
            before = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            after = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters()))
            log.append((float(before), float(after)))
        opt.step()


def _params(model) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()


def _ddp_run(
    rank: int,
    out: str,
    name: str,
    sizes,
    attach: bool,
    instruments=None,
    clip=None,
    net=_net,
    reduction="mean",
    overlap: bool = False,
) -> None:
    model = nn.parallel.DistributedDataParallel(net())
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    loader = DataLoader(_data(), batch_sampler=_rank_batches(rank, sizes))
    cockpit = None
    if attach:
        insts = instruments() if instruments is not None else _instruments()
        logdir = os.path.join(out, name)
        sinks = [TensorBoard(logdir, image_every=None)] if name == "equal" else []  # no dashboard image: slow
        loss_fn = nn.CrossEntropyLoss(reduction=reduction)
        cockpit = Cockpit(model, opt, loss_fn, instruments=insts, logdir=logdir, sinks=sinks, overlap=overlap)
    log: list = []
    _train(model, opt, loader, cockpit, clip, log)
    result = {"params": _params(model), "clip": log}
    if cockpit is not None:
        cockpit.close()
        tracin = next((i for i in cockpit.instruments if isinstance(i, TracIn)), None)
        result["history"] = {t: cockpit.history[t] for t in cockpit.history if not t.startswith("cost/")}
        if tracin is not None:
            result["tracin"] = (tracin.self_influence(), tracin.influence())
        saver = next((i for i in cockpit.instruments if isinstance(i, Checkpoints)), None)
        if saver is not None:
            result["saved"] = [p.name for p in saver.paths]
    with open(os.path.join(out, f"{name}_{'with' if attach else 'without'}_rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def _doc_example(section: str = "DDP / torchrun") -> str:
    """The example of a section of docs/integrations.md, as written."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text()
    section = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]


def _run_doc_example(rank: int, port: int, out: str, section: str = "DDP / torchrun", name: str = "doc") -> None:
    """As ``torchrun --nproc_per_node=2`` runs it: the rank and the rendezvous in the environment."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank)}
    os.environ.update(env, WORLD_SIZE=str(WORLD))
    os.chdir(out)
    TensorBoard.image = lambda self, step: None  # this child only: drawing the dashboard costs seconds here
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(_doc_example(section), {"__name__": "__main__"})
    Path(out, f"{name}_rank{rank}.txt").write_text(printed.getvalue())


def _worker(rank: int, port: int, out: str, doc_port: int, fsdp_port: int) -> None:
    torch.set_num_threads(1)
    try:
        _distributed_runs(rank, port, out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run_doc_example(rank, doc_port, out)
        _run_doc_example(rank, fsdp_port, out, "FSDP", "fsdp_doc")


def _distributed_runs(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no cockpit warning
        _rank0_only(rank, out)  # first: the cockpits after it agree anew
        _rank0_only(rank, out, net=_fsdp_net)
        _ddp_run(rank, out, "equal", EQUAL, attach=True)
        _ddp_run(rank, out, "equal", EQUAL, attach=False)
        _ddp_run(rank, out, "unequal", UNEQUAL, attach=True)
        _ddp_run(rank, out, "overlap", UNEQUAL, attach=True, overlap=True)
        _ddp_run(rank, out, "clip", EQUAL, attach=True, instruments=_clipping, clip=MAX_NORM)
        _no_sync(rank, out)
        _ddp_run(rank, out, "batchnorm", EQUAL, attach=True, instruments=economy, net=_bn_net)
        _ddp_run(rank, out, "sum", UNEQUAL, attach=True, instruments=economy, reduction="sum")
        _ddp_run(rank, out, "ckpt", EQUAL, attach=True, instruments=lambda: [Checkpoints(directory=Path(out, "ck"))])
        _fsdp(rank, out)
        _twice(rank, out)


def _no_sync(rank: int, out: str) -> None:
    """Gradient accumulation under DDP: two micro-batches of 2 per rank and step, ``no_sync`` first."""
    model = nn.parallel.DistributedDataParallel(_net())
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    batches = [b[k : k + 2] for b in _rank_batches(rank, EQUAL) for k in (0, 2)]
    loader = DataLoader(_data(), batch_sampler=batches)
    logdir = os.path.join(out, "no_sync")
    cockpit = Cockpit(model, opt, nn.CrossEntropyLoss(), instruments=_no_probes(), logdir=logdir, sinks=[])
    _accumulate(model, opt, loader, cockpit, micro=2)
    cockpit.close()


def _twice(rank: int, out: str) -> None:
    """Two runs given one logdir: the second goes beside the first (rank 0 chooses and says so)."""
    for _ in range(2):
        model = nn.parallel.DistributedDataParallel(_net())
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cockpit = Cockpit(model, opt, nn.CrossEntropyLoss(), "minimal", logdir=os.path.join(out, "twice"), sinks=[])
        _train(model, opt, DataLoader(_data(), batch_sampler=_rank_batches(rank, EQUAL)), cockpit)
        cockpit.close()
    Path(out, f"twice_rank{rank}.txt").write_text("\n".join(str(w.message) for w in caught))


def _rank0_only(rank: int, out: str, net=_net) -> None:
    """A cockpit built on rank 0 alone (the usual "log on rank 0" pattern): after the attach timeout (at
    its first tracked step) it describes rank 0's examples, with a warning; training goes on (no
    collective waits for rank 1)."""
    model = nn.parallel.DistributedDataParallel(net()) if net is _net else net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    loader = DataLoader(_data(), batch_sampler=_rank_batches(rank, EQUAL))
    cockpit, caught = None, []
    if rank == 0:
        cockpit = Cockpit(model, opt, nn.CrossEntropyLoss(), instruments="economy", sinks=[])
    distributed.ATTACH_TIMEOUT_S, timeout = 0.5, distributed.ATTACH_TIMEOUT_S
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _train(model, opt, loader, cockpit)
    finally:
        distributed.ATTACH_TIMEOUT_S = timeout
    result = {"warnings": [str(w.message) for w in caught]}
    if cockpit is not None:
        cockpit.close()
        result["sizes"] = [len(v) for _, v in cockpit.history["persample/grad_norm"]]
        result["tags"] = set(cockpit.history)
        result["notes"] = {t: v for t, v in cockpit.history.items() if t.startswith("note/")}
    name = "rank0only" if net is _net else "fsdp2_rank0only"
    with open(os.path.join(out, f"{name}_rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def _fsdp_net() -> nn.Module:
    """The model of the DDP runs, sharded by FSDP2 over both ranks: each Linear, then the root."""
    from torch.distributed.fsdp import fully_shard

    net = _net()
    fully_shard(net[0])
    fully_shard(net[2])
    return fully_shard(net)


class _Functional(nn.Module):
    """Its own weight used functionally (``F.linear(h, self.w)``): under FSDP2 forward sees an unsharded
    copy of it, which the per-sample engine does not recognise as the parameter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 8)
        self.w = nn.Parameter(0.3 * torch.randn(3, 8))

    def forward(self, x):
        return nn.functional.linear(torch.tanh(self.a(x)), self.w)


class _ParamNorm(Instrument):
    """||theta_t|| from the need ``param_norms``."""

    NEEDS = frozenset({PARAM_NORMS})

    def compute(self, record):
        return {"param_norm": float(np.sqrt(sum(v * v for v in record.get(PARAM_NORMS).values())))}


def _fsdp_instruments():
    return [*_no_probes(), Clipping(max_norm=MAX_NORM, per_sample_clip=1.0, batch_steps=1), _ParamNorm()]


def _fsdp(rank: int, out: str) -> None:
    """FSDP2 (fully_shard) with and without the cockpit (economy + TracIn self-influence)."""
    result = {}
    for attach in (True, False):
        net = _fsdp_net()
        opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
        loader = DataLoader(_data(), batch_sampler=_rank_batches(rank, EQUAL))
        cockpit = None
        if attach:
            logdir = os.path.join(out, "fsdp2")
            cockpit = Cockpit(net, opt, nn.CrossEntropyLoss(), instruments=_fsdp_instruments(), logdir=logdir, sinks=[])
        _train(net, opt, loader, cockpit)
        full = [p.detach().full_tensor().reshape(-1) for p in net.parameters()]  # an all-gather of each
        result["with" if attach else "without"] = torch.cat(full)
        if cockpit is not None:
            cockpit.close()
            result["self_influence"] = next(i for i in cockpit.instruments if isinstance(i, TracIn)).self_influence()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    hsdp = fully_shard(_net(), mesh=init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("r", "s")))  # HSDP
    try:
        Cockpit(hsdp, torch.optim.SGD(hsdp.parameters(), lr=0.1), nn.CrossEntropyLoss(), sinks=[])
        result["hsdp"] = None
    except ValueError as e:
        result["hsdp"] = str(e)
    with open(os.path.join(out, f"fsdp_rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    # a summed loss over unequal local batches: FSDP2 averages the ranks' gradients as DDP does
    net = _fsdp_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    cockpit = Cockpit(net, opt, loss_fn, instruments=economy(), logdir=os.path.join(out, "fsdp2_sum"), sinks=[])
    _train(net, opt, DataLoader(_data(), batch_sampler=_rank_batches(rank, UNEQUAL)), cockpit)
    cockpit.close()

    # gradient accumulation: two micro-batches of 2 per rank and step (FSDP2 reduce-scatters each backward)
    net = _fsdp_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    batches = [b[k : k + 2] for b in _rank_batches(rank, EQUAL) for k in (0, 2)]
    logdir = os.path.join(out, "fsdp2_accumulate")
    cockpit = Cockpit(net, opt, nn.CrossEntropyLoss(), instruments=_no_probes(), logdir=logdir, sinks=[])
    _accumulate(net, opt, DataLoader(_data(), batch_sampler=batches), cockpit, micro=2)
    cockpit.close()
    bn = {}
    for attach in (True, False):  # train-mode BatchNorm: the coupled path's replay is refused, with a note
        net = _bn_net()
        fully_shard(net[0])
        fully_shard(net[3])
        fully_shard(net)
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        logdir = os.path.join(out, "fsdp2_bn")
        cockpit = (
            Cockpit(net, opt, nn.CrossEntropyLoss(), instruments=economy(), logdir=logdir, sinks=[]) if attach else None
        )
        _train(net, opt, DataLoader(_data(), batch_sampler=_rank_batches(rank, EQUAL)), cockpit)
        if cockpit is not None:
            cockpit.close()
        bn[attach] = torch.cat([p.detach().full_tensor().reshape(-1) for p in net.parameters()]).numpy()
    np.testing.assert_array_equal(bn[True], bn[False])  # the cockpit does not change training
    net = _Functional()
    fully_shard(net.a)
    fully_shard(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    logdir = os.path.join(out, "fsdp2_functional")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning that w has no per-sample contribution (its note is tested)
        cockpit = Cockpit(net, opt, nn.CrossEntropyLoss(), instruments=economy(), logdir=logdir, sinks=[])
        _train(net, opt, DataLoader(_data(), batch_sampler=_rank_batches(rank, EQUAL)), cockpit)
    cockpit.close()


# --- the single-process references --------------------------------------------------------------------
def _reference(sizes, instruments=None, clip=None, micro: int | None = None):
    """One process on the ranks' batches: concatenated (equal sizes), else as micro-batches (rank 0's
    batch, then rank 1's; each cut into ``micro`` examples under DDP's ``no_sync``), the loss of each
    divided by their number per step (DDP averages the ranks' gradients: the mean of the ranks' losses)."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    per_rank = [_rank_batches(r, sizes) for r in range(WORLD)]
    cockpit = Cockpit(model, opt, nn.CrossEntropyLoss(), instruments=(instruments or _instruments)(), sinks=[])
    log = []
    if sizes[0] == sizes[1] and micro is None:
        loader = DataLoader(_data(), batch_sampler=[per_rank[0][s] + per_rank[1][s] for s in range(STEPS)])
        _train(model, opt, loader, cockpit, clip, log)
    else:
        batches = [per_rank[r][s] for s in range(STEPS) for r in range(WORLD)]
        if micro is not None:
            batches = [b[k : k + micro] for b in batches for k in range(0, len(b), micro)]
        _accumulate(model, opt, DataLoader(_data(), batch_sampler=batches), cockpit, len(batches) // STEPS)
    cockpit.close()
    tracin = next((i for i in cockpit.instruments if isinstance(i, TracIn)), None)
    return cockpit.history, tracin, _params(model), log


def _probe_influence_loop(sizes) -> np.ndarray:
    """TracIn(z_i, probe_k) = sum_t lr c_i g_t(z_i) . g_t(probe_k), c_i = 1 / (W n_k) the weight DDP's
    average gives example i of rank k: float64, one autograd call per example, training as DDP does."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    x, y = _data().tensors
    px, py = _probes()
    per_rank = [_rank_batches(r, sizes) for r in range(WORLD)]
    infl = np.zeros((N_DATA, len(py)))
    for s in range(STEPS):
        m64 = copy.deepcopy(model).double()
        params = list(m64.parameters())

        def grad(xi, yi, m64=m64, params=params):
            loss = nn.functional.cross_entropy(m64(xi[None].double()), yi[None])
            return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

        h = torch.stack([grad(px[k], py[k]) for k in range(len(py))])
        for r in range(WORLD):
            for i in per_rank[r][s]:
                infl[i] += (0.5 / (WORLD * sizes[r]) * (h @ grad(x[i], y[i]))).numpy()
        opt.zero_grad()
        for r in range(WORLD):
            idx = per_rank[r][s]
            (nn.functional.cross_entropy(model(x[idx]), y[idx]) / WORLD).backward()
        opt.step()
    return infl


def _assert_same_run(got, want, skip=()) -> None:
    """Every tag of ``want`` (the reference) in ``got``, the same steps, values equal to float32 round-off."""
    tags = {t for t in want if not t.startswith(("cost/", "note/")) and t not in skip}
    got_tags = {t for t in got if not t.startswith(("cost/", "note/")) and t not in skip}
    assert got_tags == tags
    for tag in sorted(tags):
        g, w = got[tag], want[tag]
        assert [s for s, _ in g] == [s for s, _ in w], tag
        for (step, a), (_, b) in zip(g, w, strict=True):
            if isinstance(b, str):
                assert a == b, (tag, step)
            elif isinstance(b, dict):
                assert a.keys() == b.keys(), (tag, step)
                for k in b:
                    if np.asarray(b[k]).dtype.kind in "iu":
                        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{tag}[{k}] at step {step}")
                    else:
                        _close(a[k], b[k], f"{tag}[{k}] at step {step}")
            else:
                _close(a, b, f"{tag} at step {step}")


def _close(a, b, what: str) -> None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = np.nanmax(np.abs(b)) if b.size and np.any(np.isfinite(b)) else 1.0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale, err_msg=what)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    nn.parallel.DistributedDataParallel  # noqa: B018
    torch.optim.SGD(_net().parameters(), lr=0.1)  # the first optimizer imports torch._dynamo (seconds)
    from torch.distributed import fsdp  # noqa: F401 - imported once, before the fork

    # fork: the workers start with torch already imported (spawning costs seconds per process)
    mp.start_processes(
        _worker, args=(_free_port(), str(out), _free_port(), _free_port()), nprocs=WORLD, start_method="fork"
    )

    def read(name: str) -> dict:
        with open(out / name, "rb") as f:
            return pickle.load(f)

    return out, read


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_ddp_with_overlap_writes_the_same_records_on_every_rank(ddp_runs):
    """overlap=True under DDP (each step's records made during the next step, at the same point on every
    rank): the records of the synchronous run, bit for bit, and training unchanged."""
    out, read = ddp_runs
    for r in range(WORLD):
        lagged, sync = read(f"overlap_with_rank{r}.pkl"), read(f"unequal_with_rank{r}.pkl")
        assert lagged["history"].keys() == sync["history"].keys()
        for tag, rows in sync["history"].items():
            assert [s for s, _ in lagged["history"][tag]] == [s for s, _ in rows], tag
            for (_, a), (_, b) in zip(lagged["history"][tag], rows, strict=True):
                assert repr(a) == repr(b), (tag, r)
        np.testing.assert_array_equal(lagged["params"], sync["params"])


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_ddp_equals_one_process_on_the_concatenated_batch(ddp_runs):
    out, read = ddp_runs
    run = load(out / "equal")
    history, tracin, params, _ = _reference(EQUAL)
    assert [s for s, _ in run["loss"]] == list(range(STEPS))  # one record per step: rank 1 wrote nothing
    assert len(run["persample/grad_norm"][0][1]) == sum(EQUAL)  # the global batch
    for tag in ("tests/norm", "tests/inner", "tests/ortho", "alpha", "tracin/self_influence"):
        assert tag in run
    _assert_same_run(run, history)
    # both ranks hold the global statistics and the merged TracIn scores
    ranks = [read(f"equal_with_rank{r}.pkl") for r in range(WORLD)]
    _assert_same_run(ranks[1]["history"], ranks[0]["history"])
    for r in ranks:
        _close(r["tracin"][0], tracin.self_influence(), "self-influence")
        _close(r["tracin"][1], tracin.influence(), "probe influence")
    # the cockpit does not change training: bit-identical parameters, and DDP's equal the reference's
    for r in range(WORLD):
        np.testing.assert_array_equal(ranks[r]["params"], read(f"equal_without_rank{r}.pkl")["params"])
    _close(ranks[0]["params"], params, "parameters")
    # rank 1 wrote nothing: one JSON lines file with one line per step, one TensorBoard event file
    files = sorted(p.name for p in (out / "equal").iterdir())
    assert files.count("cockpit.jsonl") == 1 and sum(f.startswith("events.out.tfevents") for f in files) == 1, files
    lines = [json.loads(line) for line in (out / "equal" / "cockpit.jsonl").read_text().splitlines()]
    pairs = [(e["step"], tag) for e in lines for tag in e["records"]]
    assert len(pairs) == len(set(pairs))  # every (step, tag) written once


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_ddp_unequal_local_batches_weigh_examples_as_ddp_averages(ddp_runs):
    out, read = ddp_runs
    run = load(out / "unequal")
    history, tracin, params, _ = _reference(UNEQUAL)  # one process accumulating the ranks' batches
    assert len(run["persample/grad_norm"][0][1]) == sum(UNEQUAL)
    _assert_same_run(run, history)
    ranks = [read(f"unequal_with_rank{r}.pkl") for r in range(WORLD)]
    for r in ranks:
        _close(r["tracin"][0], tracin.self_influence(), "self-influence")
        _close(r["tracin"][1], _probe_influence_loop(UNEQUAL), "probe influence")  # merged over the ranks
    _close(read("unequal_with_rank1.pkl")["params"], params, "parameters")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_ddp_clipping_sees_the_all_reduced_gradient(ddp_runs):
    out, read = ddp_runs
    run = load(out / "clip")
    log = read("clip_with_rank0.pkl")["clip"]
    before = np.array([b for b, _ in log])
    after = np.array([a for _, a in log])
    assert np.all(before > MAX_NORM)  # the loop clipped every step
    # the norm after backward is the all-reduced one clip_grad_norm_ measured; the received one is after it
    _close([v for _, v in run["clip/global/norm"]], before, "norm after backward")
    _close([v for _, v in run["clip/global/received_norm"]], after, "received norm")
    _close([v for _, v in run["clip/global/received_ratio"]], after / before, "received ratio")
    history, _, _, ref_log = _reference(EQUAL, instruments=_clipping, clip=MAX_NORM)
    _close(before, [b for b, _ in ref_log], "reference clip norms")
    # the clipped mean's cosine needs g_i . g_j across ranks (parameter-sized traffic): left out, with a note
    gram = {"clip/per_sample/cosine", "clip/per_sample/norm_ratio"}
    assert gram <= set(history) and not gram & set(run)
    assert "Gram entries" in run["note/clipping"][0][1]
    _assert_same_run(run, history, skip=gram)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_a_cockpit_on_rank_0_alone_describes_its_rank_and_never_waits(ddp_runs):
    _, read = ddp_runs
    got = read("rank0only_rank0.pkl")
    assert got["sizes"] == [EQUAL[0]] * STEPS  # rank 0's own examples
    assert any("not every rank's Cockpit" in w and "describes rank 0's examples" in w for w in got["warnings"])
    assert read("rank0only_rank1.pkl") == {"warnings": []}


def _fsdp2_left_out(tag: str) -> bool:
    """What FSDP2 leaves out: whatever needs g_i . v for a sharded v (g_i . gbar, the update: alpha's fit),
    Gram entries across ranks (the clipped mean's cosine) and AGC's unit-wise norms."""
    return tag.startswith(("clip/agc/", "clip/suggest/agc/")) or tag in {
        "tests/inner", "tests/ortho", "alpha/median", "alpha/overshoot_share",
        "clip/per_sample/cosine", "clip/per_sample/norm_ratio",
    }  # fmt: skip


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_fsdp2_equals_one_process_where_it_needs_no_parameter_sized_traffic(ddp_runs):
    out, read = ddp_runs
    run = load(out / "fsdp2")
    history, tracin, params, _ = _reference(EQUAL, instruments=_fsdp_instruments)
    assert [s for s, _ in run["loss"]] == list(range(STEPS))  # one run, one record per step
    assert len(run["persample/grad_norm"][0][1]) == sum(EQUAL)  # the global batch
    computed = ("loss", "param_norm", "grad_norm", "update_size", "distance", "tests/norm", "persample/grad_norm")
    computed += ("clip/global/norm", "clip/global/received_norm", "clip/per_sample/frac_clipped")
    assert set(computed) <= set(run) and "tracin/self_influence" in run
    # what would need parameter-sized traffic is absent, or NaN with its status (alpha), and says why
    left_out = {t for t in history if _fsdp2_left_out(t)}
    assert "tests/inner" in left_out and any(t.startswith("clip/agc/") for t in left_out)
    assert set(history) - set(run) == left_out
    assert all(np.isnan(v) for _, v in run["alpha"]) and {v for _, v in run["alpha/status"]} == {"missing_data"}
    for note in ("note/alpha", "note/gradient_tests", "note/clipping"):
        assert all("FSDP2" in text and "parameter-sized" in text for _, text in run[note]), note
    left_out |= {"alpha", "alpha/status", "verdict/lr"}
    _assert_same_run(run, history, skip=left_out)
    for rank in range(WORLD):
        got = read(f"fsdp_rank{rank}.pkl")
        _close(got["self_influence"], tracin.self_influence(), "self-influence")
        # the cockpit does not change training: bit-identical parameters, equal to the one process's
        np.testing.assert_array_equal(got["with"].numpy(), got["without"].numpy())
        _close(got["with"].numpy(), params, "parameters")
        assert "HSDP" in got["hsdp"] and "Replicate" in got["hsdp"]  # local norms would not add up: refused
    assert not any(p.name.startswith("fsdp2-") for p in out.iterdir())  # rank 1 wrote no run of its own


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_fsdp2_cockpit_on_rank_0_alone_measures_no_shard_and_never_waits(ddp_runs):
    """Sharded norms need every rank: they fail with the fix named, instead of a collective rank 1
    never joins (or a norm of rank 0's shard posing as the tensor's)."""
    _, read = ddp_runs
    got = read("fsdp2_rank0only_rank0.pkl")
    assert got["sizes"] == [EQUAL[0]] * STEPS  # rank 0's own examples
    assert not {"grad_norm", "update_size", "distance", "tests/inner", "tests/ortho"} & got["tags"]
    for tag in ("note/grad_norm", "note/update_size"):
        assert all("build the same Cockpit on every rank" in text for _, text in got["notes"][tag]), tag
    assert any("build the same Cockpit on every rank" in w for w in got["warnings"])  # distance's failure
    assert read("fsdp2_rank0only_rank1.pkl") == {"warnings": []}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_fsdp2_norm_test_over_the_parameters_with_per_sample_statistics(ddp_runs):
    """A weight used functionally is left out of the per-sample statistics under FSDP2 (with a note);
    ||gbar||^2 of the norm test leaves it out too: the test of the covered parameters, float64 loop."""
    out, _ = ddp_runs
    run = load(out / "fsdp2_functional")
    assert run["persample/coverage"][0][1] < 1 and "['w']" in run["note/per_sample_grad_norms"][0][1]
    model, (x, y) = _Functional().double(), _data().tensors
    idx = _rank_batches(0, EQUAL)[0] + _rank_batches(1, EQUAL)[0]
    losses = nn.functional.cross_entropy(model(x[idx].double()), y[idx], reduction="none")
    params = list(model.a.parameters())
    g = torch.stack(
        [torch.cat([t.reshape(-1) for t in torch.autograd.grad(v, params, retain_graph=True)]) for v in losses]
    ).numpy()
    _close(run["tests/norm"][0][1], gradient_tests((g * g).sum(1), g @ g.mean(0))["norm"], "tests/norm")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_fsdp2_train_mode_batchnorm_leaves_per_sample_statistics_out(ddp_runs):
    """The coupled path would replay the forward at the sharded parameters: refused, training untouched
    (bit-identical parameters, asserted in the worker), the gradient norms kept."""
    out, _ = ddp_runs
    run = load(out / "fsdp2_bn")
    x, y = _data().tensors
    model = _bn_net()
    idx = _rank_batches(0, EQUAL)[0]
    (nn.functional.cross_entropy(model(x[idx]), y[idx]) / WORLD).backward()  # rank 0's half of the mean
    other = _bn_net()
    idx = _rank_batches(1, EQUAL)[0]
    (nn.functional.cross_entropy(other(x[idx]), y[idx]) / WORLD).backward()
    pairs = zip(model.parameters(), other.parameters(), strict=True)
    grad = np.sqrt(sum(float((p.grad + q.grad).square().sum()) for p, q in pairs))
    _close(run["grad_norm"][0][1], grad, "gradient norm: each rank's BatchNorm over its own batch, averaged")
    assert "persample/grad_norm" not in run and "tests/norm" not in run
    assert all("train-mode BatchNorm under FSDP2" in text for _, text in run["note/per_sample_grad_norms"])


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_fsdp2_gradient_accumulation(ddp_runs):
    out, _ = ddp_runs
    run = load(out / "fsdp2_accumulate")
    history, _, _, _ = _reference(EQUAL, instruments=_no_probes, micro=2)
    assert len(run["persample/grad_norm"][0][1]) == sum(EQUAL) and "tests/norm" in run
    left_out = {t for t in history if _fsdp2_left_out(t)} | {"alpha", "alpha/status", "verdict/lr"}
    _assert_same_run(run, history, skip=left_out)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_fsdp2_sum_loss_unequal_batches(ddp_runs):
    """g_i = g_i^(k) / W, ||gbar||^2 = ||p.grad||^2 / N^2 from the reduce-scattered shards: the norm test."""
    out, _ = ddp_runs
    run = load(out / "fsdp2_sum")
    g, losses = _first_step_loop(_net, UNEQUAL, "sum")
    sq = (g * g).sum(1)
    _close(run["persample/grad_norm"][0][1], np.sqrt(sq), "per-sample norms")
    _close(run["loss"][0][1], losses.sum(), "loss")
    _close(run["grad_norm"][0][1], np.linalg.norm(g.sum(0)), "gradient norm")
    _close(run["tests/norm"][0][1], gradient_tests(sq, g @ g.mean(0))["norm"], "tests/norm")
    assert [s for s, _ in run["loss"]] == list(range(STEPS)) and "tests/inner" not in run


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_ddp_gradient_accumulation_with_no_sync(ddp_runs):
    out, _ = ddp_runs
    run = load(out / "no_sync")
    history, _, _, _ = _reference(EQUAL, instruments=_no_probes, micro=2)
    assert [s for s, _ in run["loss"]] == list(range(STEPS))
    assert len(run["persample/grad_norm"][0][1]) == sum(EQUAL)
    _assert_same_run(run, history)


def _first_step_loop(net, sizes, reduction: str) -> tuple[np.ndarray, np.ndarray]:
    """Global per-sample gradients and losses of step 0, float64, one autograd call per example: rank
    k's example i has l_i = r_k l_i^(k) (its loss in rank k's batch forward, train mode) and
    g_i = d l_i / d theta, with r_k = N / (W n_k) for a mean loss and 1 / W for a sum."""
    model, (x, y) = net().double(), _data().tensors
    params, n = list(model.parameters()), sum(sizes)
    rows, losses = [], []
    for r in range(WORLD):
        idx = _rank_batches(r, sizes)[0]
        r_k = n / (WORLD * sizes[r]) if reduction == "mean" else 1 / WORLD
        ls = r_k * nn.functional.cross_entropy(model(x[idx].double()), y[idx], reduction="none")
        for i in range(len(idx)):
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(ls[i], params, retain_graph=True)]))
        losses.append(ls.detach())
    return torch.stack(rows).numpy(), torch.cat(losses).numpy()


def _assert_first_step(run, g: np.ndarray, losses: np.ndarray, reduction: str) -> None:
    gbar = g.mean(0)  # p.grad = mean_i g_i (mean) or sum_i g_i (sum): gbar is the mean either way
    sq, dots = (g * g).sum(1), g @ gbar
    _close(run["persample/grad_norm"][0][1], np.sqrt(sq), "per-sample norms")
    _close(run["loss/per_sample"][0][1], losses, "per-sample losses")
    _close(run["loss"][0][1], losses.mean() if reduction == "mean" else losses.sum(), "loss")
    _close(run["grad_norm"][0][1], np.linalg.norm(gbar if reduction == "mean" else g.sum(0)), "gradient norm")
    for name, value in gradient_tests(sq, dots).items():
        _close(run[f"tests/{name}"][0][1], value, f"tests/{name}")
    assert [s for s, _ in run["loss"]] == list(range(STEPS))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_ddp_train_mode_batchnorm_per_rank_coupling(ddp_runs):
    """Each rank's BatchNorm normalises over its own batch (the coupled path), gbar the all-reduced gradient."""
    out, _ = ddp_runs
    _assert_first_step(load(out / "batchnorm"), *_first_step_loop(_bn_net, EQUAL, "mean"), "mean")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_ddp_sum_loss_unequal_batches(ddp_runs):
    """A summed loss: DDP still averages the ranks' gradients, so g_i = g_i^(k) / W, gbar = p.grad / N."""
    out, _ = ddp_runs
    _assert_first_step(load(out / "sum"), *_first_step_loop(_net, UNEQUAL, "sum"), "sum")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_the_torchrun_example_of_the_docs_runs_as_written(ddp_runs):
    out, _ = ddp_runs
    run = load(out / "runs" / "ddp")
    assert [s for s, _ in run["loss"]] == list(range(16))  # 2 epochs of 128 examples per rank, 16 a batch
    printed = [(out / f"doc_rank{r}.txt").read_text().split("\n") for r in range(WORLD)]
    assert printed[0][0] == "0 32" and printed[1][0] == "1 32"  # the global batch on every rank
    assert printed[0][1][2:] == printed[1][1][2:]  # the same TracIn ranking on both ranks
    top = run["tracin/self_influence"][0][1].argsort()[-5:]
    assert printed[0][1] == f"0 {top}"


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_the_fsdp2_example_of_the_docs_runs_as_written(ddp_runs):
    out, _ = ddp_runs
    run = load(out / "runs" / "fsdp")
    assert [s for s, _ in run["loss"]] == list(range(16)) and len(run["persample/grad_norm"][0][1]) == 32
    assert "tests/norm" in run and "tracin/self_influence" in run and "tests/inner" not in run
    for r in range(WORLD):
        assert (out / f"fsdp_doc_rank{r}.txt").read_text() == f"{r} True False\n"


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_a_second_run_into_the_same_logdir_goes_beside_it_once(ddp_runs):
    out, _ = ddp_runs
    assert (
        "is written to" in (out / "twice_rank0.txt").read_text()
        and str(out / "twice-2") in (out / "twice_rank0.txt").read_text()
    )
    assert (out / "twice_rank1.txt").read_text() == ""  # rank 1 writes nothing: it chooses nothing
    for name in ("twice", "twice-2"):
        assert [s for s, _ in load(out / name)["loss"]] == list(range(STEPS))
    assert not (out / "twice-3").exists()


def test_a_backward_callback_queued_by_a_callback_runs_after_the_others():
    """compat.queue_backward_callback from inside a callback (how the cockpit's end of backward follows
    DDP's reducer, whose callback is queued during backward): it runs after every callback queued before."""
    w = torch.randn(3, requires_grad=True)
    order = []

    def first():
        order.append("cockpit, first call")
        compat.queue_backward_callback(lambda: order.append("cockpit, again"))

    y = (w * 2).sum()
    y.register_hook(lambda g: compat.queue_backward_callback(first))
    w.register_hook(lambda g: compat.queue_backward_callback(lambda: order.append("reducer")))
    y.backward()
    assert order == ["cockpit, first call", "reducer", "cockpit, again"]


def test_fsdp1_is_refused_with_the_fix():
    """FullyShardedDataParallel cannot be built on CPU (it needs an accelerator): an instance made
    without its constructor stands for one."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped = nn.Module.__new__(FullyShardedDataParallel)
    nn.Module.__init__(wrapped)
    model = nn.Sequential(nn.Linear(2, 2))
    model.add_module("fsdp", wrapped)
    with pytest.raises(ValueError, match="FSDP1") as caught:
        Cockpit(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss())
    assert "fully_shard(layer)" in str(caught.value) and "DistributedDataParallel(model)" in str(caught.value)


def test_without_a_process_group_there_is_no_store_and_one_rank():
    assert compat.default_store() is None
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_ddp_checkpoints_are_saved_by_rank_0_alone(ddp_runs):
    _, read = ddp_runs
    saved = read("ckpt_with_rank0.pkl")["saved"]
    assert saved == [f"step_{t:08d}.pt" for t in range(STEPS + 1)]  # every step, and the final parameters
    assert read("ckpt_with_rank1.pkl")["saved"] == []
