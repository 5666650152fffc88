"""Data-parallel training (DistributedDataParallel, ``torchrun``): one run over the examples of every rank.

Every rank builds the same ``Cockpit(...)`` (with the same ``logdir``); rank 0 alone writes the run.
Each step's per-rank numbers are gathered from every rank by one collective (O(B x world) numbers, no
parameter-sized traffic: the gradient itself is the one DDP averaged), so every rank's record, and
every instrument's results, describe the global batch (``cockpit_lite.providers.distributed``).

What "the global batch" means, with W ranks and rank k holding n_k examples of the step (its own
micro-batches summed): DDP averages the ranks' gradients, p.grad = (1/W) sum_k p.grad_k, with
p.grad_k = c_k sum_{i in k} g_i^(k) the rank's own gradient (c_k = 1/n_k for a mean loss, 1 for a sum).
Over the step's N = sum_k n_k examples the per-sample gradients and losses are

    g_i = r_k g_i^(k),   l_i = r_k l_i^(k),   r_k = (N / n_k) / W (mean),  1 / W (sum),

the unique scaling with p.grad = mean_i g_i (mean) or sum_i g_i (sum) and L = (1/W) sum_k L_k =
mean_i l_i (or sum_i l_i) for the loss DDP's gradient is the gradient of. With equal local batches
(DistributedSampler) r_k = 1 for a mean loss: every number equals that of one process on the
concatenated batch. Unequal local batches weight each rank's examples as DDP's averaging does (a rank
with fewer examples gives each of them more weight); the same numbers come from one process that
accumulates the ranks' batches as micro-batches with the loss divided by W.

FSDP2 (``fully_shard``) averages gradients as DDP does, so the same holds; its parameters, gradients and
updates are DTensors of which each rank holds a shard: their norms come from the local shards and one
all-reduce of one number per tensor (:func:`norms`), and what would project per-sample gradients onto a
sharded direction is left out with a note (``SHARDED_LEFT_OUT``; docs/integrations.md, "FSDP").
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from cockpit_lite.compat import default_store, foreach_norm, stacked_norms

#: need name of the distributed provider: ``record.get(DISTRIBUTED)`` is a :class:`Ranks`
DISTRIBUTED = "distributed"
#: how long a rank's cockpit waits at its first tracked step for the cockpits of the other ranks (seconds)
ATTACH_TIMEOUT_S = 30.0

#: the store key counting generations of cockpits (one generation: the cockpits of one run, one per rank)
ATTACH = "cockpit_lite/attach"


def initialized() -> bool:
    """Whether ``torch.distributed`` is available and its default process group initialized."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the default group (1 without ``torch.distributed``)."""
    return dist.get_world_size() if initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 without ``torch.distributed``)."""
    return dist.get_rank() if initialized() else 0


def is_main() -> bool:
    """Whether this process writes the run: rank 0, or the only process."""
    return rank() == 0


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank: one ``all_gather_object`` (two collectives
    on picklable, small objects). Every rank must call it, in the same order as the other collectives;
    with one process, ``[obj]``."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@dataclass(frozen=True)
class Ranks:
    """What the distributed provider says of one step (``record.get(DISTRIBUTED)``).

    ``rank`` and ``world`` are set when the step begins; ``batch_sizes`` (n_k, examples of each rank,
    in rank order: the order of the gathered per-sample vectors) and ``factors`` (r_k, see the module
    docstring) once the step's numbers are gathered, after the optimizer step.
    """

    rank: int
    world: int
    batch_sizes: tuple[int, ...] = ()
    factors: tuple[float, ...] = ()

    @property
    def offset(self) -> int:
        """Where this rank's examples start in the gathered per-sample vectors."""
        return int(sum(self.batch_sizes[: self.rank]))


def factors(batch_sizes: list[int], reduction: str | None) -> list[float]:
    """r_k = (N / n_k) / W for a mean loss, 1 / W for a sum (N = sum_k n_k, W ranks): the factor from a
    rank's own per-sample gradients and losses to those of the global batch."""
    w, n = len(batch_sizes), sum(batch_sizes)
    return [(n / b if reduction == "mean" else 1.0) / w for b in batch_sizes]


def join(warn: Any, timeout_s: float | None = None) -> bool:
    """Whether this cockpit merges its statistics with the cockpits of the other ranks.

    Called at a cockpit's first tracked step. With more than one process, every rank's cockpit
    announces itself in the default group's store and waits (up to ``ATTACH_TIMEOUT_S``) for the
    others: statistics are merged only if every rank's cockpit came, since the merge is a collective
    each rank must join (a cockpit on rank 0 alone would otherwise wait for ever). The decision is
    taken once, in the store, so all ranks take the same; without it each rank's cockpit describes
    its own examples (with a warning).
    """
    world = world_size()
    if world == 1:
        return False
    store = default_store()
    if store is None:
        warn(
            "torch.distributed has no key-value store to agree on: every rank's cockpit describes its own "
            "examples, and only rank 0 writes"
        )
        return False
    key = f"{ATTACH}/{store.add(ATTACH, 0)}"  # the generation of cockpits being built now
    if store.add(f"{key}/count", 1) == world:
        _decide(store, key, "merged")
    timeout = ATTACH_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        store.wait([f"{key}/decision"], datetime.timedelta(seconds=timeout))
    except RuntimeError:  # DistStoreError: not every rank built a cockpit in time
        _decide(store, key, "local")
    merged = bytes(store.get(f"{key}/decision")) == b"merged"
    if not merged:
        warn(
            f"torch.distributed runs {world} processes, but not every rank's Cockpit reached its first "
            f"tracked step within {timeout:g} s of the others: this one describes rank {rank()}'s examples alone"
            + (" and writes the run" if is_main() else ", and writes nothing (only rank 0 writes)")
            + ". Build the same Cockpit(...) on every rank (same logdir) for statistics over the global batch"
        )
    return merged


def _decide(store: Any, key: str, decision: str) -> None:
    """The first decision for a generation holds; whoever takes it opens the next generation, so the
    cockpits built after it (a later run; the ranks after a cockpit on rank 0 alone) agree anew."""
    if bytes(store.compare_set(f"{key}/decision", "", decision)) == decision.encode():
        if store.add(f"{key}/closed", 1) == 1:
            store.add(ATTACH, 1)


def _dtensor_type() -> type | None:
    """``DTensor`` if its module was imported (importing it costs seconds: it is looked up, not imported)."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def is_sharded(t: torch.Tensor | None) -> bool:
    """Whether ``t`` is a DTensor (a parameter or gradient sharded by FSDP2's ``fully_shard``)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (``t.to_local()``), else ``t`` itself."""
    return t.to_local() if is_sharded(t) else t


#: [whether the last cockpit to join holds FSDP2 shards but not every rank's cockpit came, why]: a norm of
#: a sharded tensor then needs a collective the other ranks never join, so :func:`norms` refuses it
UNMERGED_SHARDS: list = [False, ""]


_PLAIN_TENSOR = {torch.Tensor}


def any_dtensor(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether any of ``tensors`` is a DTensor (FSDP2's sharded parameters and what is derived from them)."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return False
    kinds = set(map(type, tensors))  # (one C-level pass: plain tensors are the usual case)
    return kinds != _PLAIN_TENSOR and any(issubclass(k, dtensor) for k in kinds)


def norms(tensors: list[torch.Tensor]) -> list[float]:
    """||t|| of each tensor as floats. Plain tensors: one fused norm, one transfer. If any is a DTensor
    sharded by FSDP2 (every rank holds a disjoint shard, :func:`check_sharded`): ||t||^2 = sum_k ||t_k||^2
    over the ranks' local shards t_k, by one all-reduce of ``len(tensors)`` numbers. Every rank must call
    it with the same tensors, in the same order as its other collectives."""
    if not tensors:
        return []
    if not any_dtensor(tensors):  # plain tensors (tolist: Python floats, exact from any float dtype, one transfer)
        return stacked_norms(tensors).tolist()
    if UNMERGED_SHARDS[0]:
        raise RuntimeError(UNMERGED_SHARDS[1])
    parts = [local(t) for t in tensors]
    sq = torch.stack([v.double().square() for v in foreach_norm(parts)])  # on the shards' device (NCCL: GPU)
    if world_size() > 1:
        dist.all_reduce(sq)
    return sq.sqrt().cpu().tolist()


#: why the statistics that project per-sample gradients onto a sharded direction are left out under FSDP2
SHARDED_LEFT_OUT = (
    "{what} under FSDP2 (fully_shard): the per-sample gradients g_i are computed on the rank of their "
    "example, while the direction (the mean gradient, the update, a probe's gradient) is sharded over the "
    "ranks; g_i . v would need g_i or v gathered onto every rank (parameter-sized traffic): left out"
)


def check_sharded(params: dict[str, torch.nn.Parameter]) -> bool:
    """Whether the parameters are sharded by FSDP2 (DTensors); a ``ValueError`` for DTensor layouts the
    norms of :func:`norms` would get wrong: every DTensor must be sharded (``Shard`` placements only, no
    ``Replicate`` as in HSDP, no tensor parallelism) over a mesh of every rank of the default group."""
    sharded = [n for n, p in params.items() if is_sharded(p)]
    if not sharded:
        return False
    bad = []
    for name in sharded:
        p = params[name]
        placements, mesh = p.placements, p.device_mesh
        if mesh.ndim != 1 or mesh.size() != world_size() or not all(pl.is_shard() for pl in placements):
            bad.append(f"{name} ({placements} over a mesh of {mesh.size()} of {world_size()} ranks)")
    if bad:
        listed = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise ValueError(
            f"cockpit-lite supports FSDP2 (fully_shard) with parameters sharded over every rank of the default "
            f"process group on a one-dimensional mesh; {listed} are laid out otherwise (HSDP, tensor parallelism), "
            "where the norms of local shards do not add up to the norm of the tensor. Fix: shard over one "
            "mesh of every rank (fully_shard(module) with the default mesh), or track the run with "
            "DistributedDataParallel"
        )
    return True


SHARDED = (
    "cockpit-lite does not support FSDP1 (FullyShardedDataParallel): {what}. It supports FSDP2 "
    "(torch.distributed.fsdp.fully_shard), whose parameters are DTensors it reads shard by shard. Fix: shard "
    "the model with fully_shard(layer) for each layer and fully_shard(model) (the same loop), or track the run "
    "with DistributedDataParallel (model = DistributedDataParallel(model))"
)


def refuse_sharded(model: torch.nn.Module, params: dict[str, torch.nn.Parameter]) -> bool:
    """Whether the model is sharded by FSDP2 (:func:`check_sharded`, which refuses layouts it cannot
    measure); a ``ValueError`` naming the fix for FSDP1 (``FullyShardedDataParallel``), which exists
    only if its module was imported (it is looked up, not imported)."""
    wrapper = getattr(sys.modules.get("torch.distributed.fsdp"), "FullyShardedDataParallel", None)
    if wrapper is not None and any(isinstance(m, wrapper) for m in model.modules()):
        raise ValueError(SHARDED.format(what="the model holds FullyShardedDataParallel modules"))
    return check_sharded(params)
