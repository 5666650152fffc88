"""The need ``"distributed"``: under data-parallel training, the step record describes the global batch.

Active on every tracked step when the ranks' cockpits merged (:func:`cockpit_lite.distributed.join`, at
the first tracked step); with one process it does nothing. What each rank computed of its own examples
is gathered, after the per-sample provider has finished (so instruments' ``compute`` sees the global record; in
``on_after_backward`` and ``on_before_step`` the per-rank fields are still the rank's own), by one
``all_gather_object`` of O(B) numbers per rank:

- ``batch_size`` = N = sum_k n_k, ``micro_batches`` concatenated, ``loss`` = (1/W) sum_k L_k;
- per-sample vectors concatenated in rank order and scaled to the global batch (r_k, see
  :mod:`cockpit_lite.distributed`): ``per_sample_loss`` (r_k), squared norms total and by parameter
  (r_k^2), projections (r_k), ``indices``, ``dataset_size``;
- g_i . gbar against the all-reduced gradient: on merged steps the need ``per_sample_dot_mean`` is
  served as a projection of the rank's own per-sample gradients onto gbar, the gradient after DDP's
  all-reduce (a copy taken at the end of backward, which the Cockpit delays until DDP's reducer has
  finished), times r_k (and / N for a sum loss);
- Gram entries across ranks and materialised g_i would need each rank's per-sample gradients on
  another (parameter-sized traffic): they are left out, with a note, never given for one rank only;
- notes of every rank (a note not every rank has names the ranks it comes from).

Gradient norms, the update and parameter norms need nothing: they are read from the gradient and the
parameters, which DDP keeps equal on every rank.

Under FSDP2 (``fully_shard``: parameters and gradients are DTensors, each rank holds one shard) gradient,
update and parameter norms are summed over the shards by one all-reduce of O(#tensors) numbers
(:func:`cockpit_lite.distributed.norms`); the per-sample squared norms need no parameter (the engine's
per-layer factors are the layer's inputs and output gradients of the rank's own examples, full tensors)
and are gathered as above; ||gbar||^2 (``mean_grad_sq_norm``, for the norm test) is the sum over ranks of
the squared norm of the rank's shard of the reduce-scattered gradient, sent with the payload. What
projects g_i onto a sharded direction (g_i . gbar, projections onto the update or any direction, TracIn
probes' cross products) would need g_i or the direction gathered onto every rank (parameter-sized
traffic): left out with a note (``distributed.SHARDED_LEFT_OUT``) naming the needs, so the instruments
that asked say why.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cockpit_lite import distributed
from cockpit_lite.compat import foreach_copy_, stacked_norms
from cockpit_lite.distributed import DISTRIBUTED, Ranks
from cockpit_lite.needs import Need, Needs
from cockpit_lite.providers import register_provider
from cockpit_lite.providers.base import Context, Provider
from cockpit_lite.step import StepRecord

#: the projection key under which g_i . gbar (gbar: the all-reduced gradient) is asked of the engine
GBAR = "__distributed_gbar__"
LOCAL_ONLY = (
    "{what} across ranks would need each rank's per-sample gradients on the others (parameter-sized "
    "traffic): left out under data-parallel training"
)


def _rows(values: list[np.ndarray | None], sizes: list[int], scale: list[float]) -> np.ndarray | None:
    """One global vector from each rank's (n_k,) values times its scale; None if a rank has none."""
    if any(v is None or len(v) != n for v, n in zip(values, sizes, strict=True)):
        return None
    return np.concatenate([np.asarray(v, dtype=np.float64) * s for v, s in zip(values, scale, strict=True)])


@register_provider
class DistributedProvider(Provider):
    """``record.get("distributed")`` (:class:`~cockpit_lite.distributed.Ranks`) and the global record."""

    PROVIDES = frozenset({DISTRIBUTED})
    ALWAYS = True  # the loss of every step is averaged over ranks
    ORDER = 1000  # after the per-sample provider: its vectors are gathered

    def __init__(self, context: Context):
        super().__init__(context)
        #: whether the ranks' cockpits merge: agreed at the first tracked step, when every rank's cockpit
        #: is built (a rank whose construction failed after this provider's never joins; the others time out)
        self.merged: bool | None = None if distributed.world_size() > 1 else False
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.gbar = False
        #: FSDP2: parameters are DTensors (checked at construction: one mesh of every rank, Shard placements)
        self.sharded = context.sharded
        #: FSDP2: this rank's ||shard of p.grad||^2 per tensor at the end of backward (optimizer's units)
        self.gbar_sq: dict[str, float] | None = None
        self.left_out: list[tuple[str, frozenset]] = []
        self.buffers: dict[str, torch.Tensor] | None = None
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.idle = self.merged is False and not self.sharded  # one process, plain parameters

    def begin_step(self, record: StepRecord, needs: Needs) -> None:
        self.gbar, self.snapshot, self.gbar_sq, self.left_out = False, None, None, []
        if self.merged is None:
            self.merged = distributed.join(self.context.warn)
            if self.sharded:
                distributed.UNMERGED_SHARDS[:] = [
                    not self.merged,
                    "under FSDP2 a Cockpit on some ranks only cannot measure the sharded gradients, updates and "
                    "parameters (their norms sum over every rank's shard): build the same Cockpit on every rank",
                ]
        if self.sharded:  # merged or not: a sharded direction reaches no per-sample projection
            self._leave_out_sharded(needs)
        if not self.merged:
            return
        record.provided[DISTRIBUTED] = Ranks(self.rank, self.world)
        if not self.sharded and Need.PER_SAMPLE_DOT_MEAN in needs.flags:
            # the engine's own g_i . gbar would use this rank's gradient: project onto the global one
            needs.flags.discard(Need.PER_SAMPLE_DOT_MEAN)
            needs.directions[GBAR] = self._gbar
            self.gbar = True

    def _leave_out_sharded(self, needs: Needs) -> None:
        """FSDP2: no g_i . v onto a sharded direction v; ||gbar||^2 from the shards (``on_backward_end``)."""
        if Need.PER_SAMPLE_DOT_MEAN in needs.flags:
            needs.flags.discard(Need.PER_SAMPLE_DOT_MEAN)
            self.gbar = True
            what = "g_i . gbar (the inner-product and orthogonality tests)"
            self.left_out.append((what, frozenset({Need.PER_SAMPLE_DOT_MEAN})))
        if needs.directions:
            keys = ", ".join(sorted(needs.directions))
            needs.directions.clear()
            self.left_out.append((f"projections g_i . v onto {keys}", frozenset({Need.PER_SAMPLE_PROJECTIONS})))
        if Need.PER_SAMPLE_CROSS in needs.flags:
            needs.flags.discard(Need.PER_SAMPLE_CROSS)
            self.left_out.append(("cross products with probes' gradients", frozenset({Need.PER_SAMPLE_CROSS})))

    @torch.no_grad()
    def _shard_sq_norm(self, record: StepRecord) -> dict[str, float]:
        """||shard_k(p.grad)||^2 of this rank per tensor, in the optimizer's units (before the loop clips)."""
        named = [(n, distributed.local(p.grad).detach()) for n, p in self.context.params.items() if p.grad is not None]
        if not named:
            return {}
        sq = stacked_norms([g for _, g in named]).double().square().cpu().tolist()
        scale = record.backward_scale
        div = scale * scale if scale not in (None, 0.0) else 1.0
        return {n: v / div for (n, _), v in zip(named, sq, strict=True)}

    def _gbar(self, record: StepRecord) -> dict[str, torch.Tensor] | None:
        return self.snapshot

    @torch.no_grad()
    def _take_snapshot(self, record: StepRecord) -> None:
        """gbar in the optimizer's units: p.grad after DDP's all-reduce, before the loop clips it."""
        named = [(n, p.grad) for n, p in self.context.params.items() if p.grad is not None]
        if self.buffers is None:
            self.buffers = {n: torch.empty_like(p) for n, p in self.context.params.items()}
        dst = [self.buffers[n] for n, _ in named]
        foreach_copy_(dst, [g.detach() for _, g in named])
        scale = record.backward_scale
        if scale not in (None, 0.0, 1.0):
            for d in dst:
                d.div_(scale)
        self.snapshot = {n: self.buffers[n] for n, _ in named}

    def on_backward_end(self, record: StepRecord) -> None:
        if self.gbar and self.sharded:
            self.gbar_sq = self._shard_sq_norm(record)
        elif self.gbar:  # the last backward of the step leaves the all-reduced gradient
            self._take_snapshot(record)

    def on_before_step(self, record: StepRecord) -> None:
        if self.gbar and self.sharded:
            if self.gbar_sq is None:
                self.gbar_sq = self._shard_sq_norm(record)
        elif self.gbar and self.snapshot is None:  # no end-of-backward seen this step
            self._take_snapshot(record)

    def end_step(self) -> None:
        self.snapshot = None

    def on_after_step(self, record: StepRecord) -> None:
        if not self.merged:
            for what, needs in self.left_out:
                record.add_note(distributed.SHARDED_LEFT_OUT.format(what=what), needs)
            return
        with self.context.costs.region("distributed"):
            record.host.flush()  # the per-sample provider's vectors wait there: this rank's values first
            try:
                payload = self._payload(record)
            except Exception as e:  # still join the collective: the other ranks wait for it
                payload = {"error": f"{type(e).__name__}: {e}"}
            self._merge(record, distributed.all_gather_objects(payload))

    def _payload(self, record: StepRecord) -> dict[str, Any]:
        """This rank's part of the step: O(n_k) numbers."""
        gbar = record.projections.pop(GBAR, None)
        return {
            "n": record.batch_size,
            "loss": record.loss,
            "reduction": record.reduction,
            "micro": list(record.micro_batches),
            "per_sample_loss": record.per_sample_loss,
            "sq": record.per_sample_sq_norms_by_param,
            "sq_total": record.per_sample_sq_norms,
            "dot": gbar if self.gbar and not self.sharded else None,
            # over the parameters with per-sample statistics, as the B-vectors are
            "gbar_sq": None
            if self.gbar_sq is None
            else sum(v for n, v in self.gbar_sq.items() if n not in (record.per_sample_uncovered or {})),
            "projections": dict(record.projections),
            "indices": record.indices,
            "dataset_size": record.dataset_size,
            "gram": record.per_sample_gram is not None or record.per_sample_gram_by_param is not None,
            "grads": record.per_sample_grads is not None,
            "notes": list(zip(record.notes, record.note_needs, strict=True)),
        }

    def _merge(self, record: StepRecord, parts: list[dict[str, Any]]) -> None:
        self._merge_notes(record, parts)
        bad = [f"rank {k}: {p['error']}" for k, p in enumerate(parts) if "error" in p]
        if bad:
            self._clear(record)
            record.add_note(f"the ranks' statistics could not be merged ({'; '.join(bad)})", frozenset())
            return
        sizes = [p["n"] for p in parts]
        losses = [p["loss"] for p in parts]
        record.loss = float(np.mean(losses)) if all(v is not None for v in losses) else None
        if any(n is None or n <= 0 for n in sizes):
            self._clear(record)
            record.add_note("a rank saw no examples this step: per-sample statistics are left out", frozenset())
            return
        n = sum(sizes)
        reduction = record.reduction
        r = distributed.factors(sizes, reduction)
        record.batch_size = n
        record.micro_batches = [b for p in parts for b in p["micro"]]
        record.provided[DISTRIBUTED] = Ranks(self.rank, self.world, tuple(sizes), tuple(r))

        record.per_sample_loss = _rows([p["per_sample_loss"] for p in parts], sizes, r)
        sq_scale = [f * f for f in r]
        if all(p["sq"] is None for p in parts):
            record.per_sample_sq_norms_by_param = None
            record.per_sample_sq_norms = _rows([p["sq_total"] for p in parts], sizes, sq_scale)
        elif any(p["sq"] is None for p in parts):
            record.per_sample_sq_norms_by_param = record.per_sample_sq_norms = None
        else:
            names = list(dict.fromkeys(name for p in parts for name in p["sq"]))
            zeros = [np.zeros(k) for k in sizes]  # a rank whose examples gave a layer no gradient
            by_param = {
                name: _rows([p["sq"].get(name, z) for p, z in zip(parts, zeros, strict=True)], sizes, sq_scale)
                for name in names
            }
            record.per_sample_sq_norms_by_param = by_param if all(v is not None for v in by_param.values()) else None
            record.per_sample_sq_norms = (
                np.sum(list(by_param.values()), axis=0) if record.per_sample_sq_norms_by_param else None
            )
        if self.gbar and self.sharded:
            shards = [p["gbar_sq"] for p in parts]
            # p.grad = gbar (mean) or N gbar (sum): ||gbar||^2 = sum_k ||shard_k||^2 (/ N^2)
            total = sum(shards) / (1.0 if reduction == "mean" else float(n * n)) if None not in shards else None
            record.per_sample_dot_mean, record.mean_grad_sq_norm = None, total
        elif self.gbar:
            dot_scale = r if reduction == "mean" else [f / n for f in r]
            record.per_sample_dot_mean = _rows([p["dot"] for p in parts], sizes, dot_scale)
            record.mean_grad_sq_norm = (
                float(record.per_sample_dot_mean.mean()) if record.per_sample_dot_mean is not None else None
            )
        keys = list(dict.fromkeys(k for p in parts for k in p["projections"]))
        projections = {k: _rows([p["projections"].get(k) for p in parts], sizes, r) for k in keys}
        record.projections = {k: v for k, v in projections.items() if v is not None}

        indices = [p["indices"] for p in parts]
        if all(i is not None and len(i) == k for i, k in zip(indices, sizes, strict=True)):
            record.indices = np.concatenate([np.asarray(i, dtype=np.int64) for i in indices])
        else:
            record.indices = None
        dataset_sizes = [p["dataset_size"] for p in parts if p["dataset_size"] is not None]
        record.dataset_size = max(dataset_sizes) if dataset_sizes else None

        if any(p["gram"] for p in parts):
            record.per_sample_gram = record.per_sample_gram_by_param = None
            record.add_note(
                LOCAL_ONLY.format(what="Gram entries g_i . g_j"),
                frozenset({Need.PER_SAMPLE_GRAM, Need.PER_SAMPLE_GRAM_BY_PARAM}),
            )
        for what, needs in self.left_out:
            record.add_note(distributed.SHARDED_LEFT_OUT.format(what=what), needs)
        if any(p["grads"] for p in parts):
            record.per_sample_grads = None
            record.add_note(LOCAL_ONLY.format(what="Materialised g_i"), frozenset({Need.PER_SAMPLE_GRADS}))

    def _clear(self, record: StepRecord) -> None:
        """No per-sample field may describe one rank's examples as if they were the global batch."""
        for name in (
            "per_sample_loss",
            "per_sample_sq_norms",
            "per_sample_sq_norms_by_param",
            "per_sample_dot_mean",
            "mean_grad_sq_norm",
            "per_sample_gram",
            "per_sample_gram_by_param",
            "per_sample_grads",
            "indices",
        ):
            setattr(record, name, None)
        record.projections = {}

    def _merge_notes(self, record: StepRecord, parts: list[dict[str, Any]]) -> None:
        """Every rank's notes; a note some ranks lack says which ranks it comes from."""
        seen: dict[str, tuple[set[int], frozenset]] = {}
        for k, p in enumerate(parts):
            for text, needs in p.get("notes", ()):
                ranks, acc = seen.get(text, (set(), frozenset()))
                seen[text] = (ranks | {k}, acc | needs)
        record.notes, record.note_needs = (), ()
        for text, (ranks, needs) in seen.items():
            who = "" if len(ranks) == len(parts) else f"rank {', '.join(map(str, sorted(ranks)))}: "
            record.add_note(who + text, needs)
