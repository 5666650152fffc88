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
"""

from __future__ import annotations

import datetime
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from cockpit_lite.compat import default_store

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


SHARDED = (
    "cockpit-lite does not support sharded data parallelism (FSDP{kind}): {what}. Its statistics read whole "
    "gradients and updates on each rank (gradient and update norms, AGC's unit norms, projections of the "
    "per-sample gradients onto the update and the mean gradient for alpha and the gradient tests); under "
    "FSDP that would mean gathering every parameter-sized direction onto every rank, the traffic and memory "
    "FSDP exists to avoid. Fix: track the run with DistributedDataParallel (the same loop: "
    "model = DistributedDataParallel(model)), e.g. a shorter or smaller run of the same model, or build the "
    "Cockpit only where the model is not sharded"
)


def refuse_sharded(model: torch.nn.Module, params: dict[str, torch.nn.Parameter]) -> None:
    """Raise a ``ValueError`` naming the fix for a model sharded by FSDP2 (``fully_shard``: parameters
    are DTensors) or FSDP1 (``FullyShardedDataParallel``). Neither can exist unless its module was
    imported (importing them costs seconds: they are looked up, not imported)."""
    tensor, fsdp = sys.modules.get("torch.distributed.tensor"), sys.modules.get("torch.distributed.fsdp")
    dtensor = getattr(tensor, "DTensor", None)
    sharded = [n for n, p in params.items() if dtensor is not None and isinstance(p, dtensor)]
    if sharded:
        listed = ", ".join(sharded[:3]) + (", ..." if len(sharded) > 3 else "")
        raise ValueError(SHARDED.format(kind="2, fully_shard", what=f"parameters {listed} are sharded DTensors"))
    wrapper = getattr(fsdp, "FullyShardedDataParallel", None)
    if wrapper is not None and any(isinstance(m, wrapper) for m in model.modules()):
        raise ValueError(SHARDED.format(kind="1", what="the model holds FullyShardedDataParallel modules"))
