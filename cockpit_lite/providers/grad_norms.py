"""Need.GRAD_NORMS and Need.BACKWARD_GRAD_NORMS: ||p.grad|| per tensor, as the optimizer receives it
(after the loop's clipping) and right after backward (before it)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from cockpit_lite import host
from cockpit_lite.needs import Need, Needs
from cockpit_lite.providers import register_provider
from cockpit_lite.providers.base import Provider
from cockpit_lite.step import StepRecord


def stored_values(g: torch.Tensor) -> torch.Tensor:
    """The entries of ``g`` that can be nonzero: ``g`` itself if dense; for a sparse gradient
    (``nn.Embedding(sparse=True)``, SparseAdam) the values of its coalesced form (duplicate indices
    summed first), whose 2-norm is ||g||_2."""
    if g.layout == torch.strided:
        return g
    if g.layout == torch.sparse_coo:
        return g.coalesce().values()
    return g.values()  # compressed layouts (CSR, CSC, BSR, BSC) store no duplicates


def grad_norms(
    params: dict[str, torch.nn.Parameter],
    batch: host.HostBatch | None = None,
    then: Callable[[Mapping[str, float]], None] | None = None,
) -> Mapping[str, float]:
    """||p.grad|| by name for every parameter with a gradient: one fused norm, its values by one transfer
    now, or with the step's host ``batch`` (then ``then(norms)``: :func:`cockpit_lite.host.norms`); under
    FSDP2 from the local shards and one all-reduce of the squared norms (:func:`distributed.norms`).
    Sparse gradients count by their stored values (:func:`stored_values`)."""
    names, tensors = [], []
    graph = False  # (a gradient with a graph: create_graph=True)
    for n, p in params.items():
        g = p.grad
        if g is not None:
            names.append(n)
            tensors.append(g if g.layout == torch.strided else stored_values(g))
            graph = graph or g.requires_grad
    if graph:
        with torch.no_grad():
            return host.norms(batch, names, tensors, then)
    return host.norms(batch, names, tensors, then)


@register_provider
class GradNormsProvider(Provider):
    """``record.grad_norms`` in the step pre-hook; ``record.backward_grad_norms`` at the end of
    backward, divided by the factor backward started from (the AMP loss scale)."""

    PROVIDES = frozenset({Need.GRAD_NORMS, Need.BACKWARD_GRAD_NORMS})

    def begin_step(self, record: StepRecord, needs: Needs) -> None:
        self.after_backward = Need.BACKWARD_GRAD_NORMS in needs.flags
        self.before_step = Need.GRAD_NORMS in needs.flags

    def on_backward_end(self, record: StepRecord) -> None:
        if not self.after_backward:
            return
        scale = record.backward_scale
        if scale in (None, 0.0, 1.0) or not math.isfinite(scale):
            # taken now (before the loop clips p.grad), its values with the step's other numbers
            record.backward_grad_norms = grad_norms(self.context.params, record.host)
            return

        def unscaled(norms: Mapping[str, float]) -> None:
            record.backward_grad_norms = {n: v / scale for n, v in norms.items()}

        grad_norms(self.context.params, record.host, unscaled)  # (the field is filled with the values)

    def on_before_step(self, record: StepRecord) -> None:
        if not self.before_step:
            return
        with self.context.costs.region("grad_norms"):
            # (checked for non-finite values when they reach the host, with the step's other numbers)
            record.grad_norms = grad_norms(self.context.params, record.host, lambda n: self._check(record, n))
        if not record.grad_norms:
            record.add_note("no parameter has a gradient: was loss.backward() called?", self.PROVIDES)

    def _check(self, record: StepRecord, norms: Mapping[str, float]) -> None:
        """A note for every instrument when some ||p.grad|| is not finite."""
        if not math.isfinite(sum(norms.values())):  # (one sum: the usual step pays no loop)
            bad = [n for n, v in norms.items() if not math.isfinite(v)]
            record.add_note(
                f"p.grad holds non-finite values ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}): this "
                "step's statistics follow from them",
                frozenset(),
            )
