"""Need.LOSS and Need.PER_SAMPLE_LOSS: the loss the step optimizes and each example's share of it.

The batch loss is the tensor ``backward()`` is called on (summed over the step's backward passes that
reach the model, divided by GradScaler's scale), whatever computed it: a loss module, a functional loss
in the loop, a loss inside the model. Where no backward root is seen, the loss module's output or the
model's own loss (``out.loss``, a 0-dim output) stands in. A backward that never reaches the model's
outputs, and a loss-module call whose backward does not (a GAN's discriminator loss on a detached sample,
between the generator's forward and its step), are another network's: no part of the step's loss or
per-sample losses (a warning says so once). Per-sample losses l_i, with L = mean_i l_i ("mean") or
sum_i l_i ("sum") over every example of the step, come from the first exact source there is:

1. a loss module: its unreduced losses (:func:`cockpit_lite.losses.per_sample_losses`), rows of a
   flattened token loss folded back to their sequences (:func:`~cockpit_lite.losses.fold_rows`);
2. a ``loss_fn`` callable given to the Cockpit: ``loss_fn(output, *args, **kwargs)``;
3. a model that returns its own cross-entropy loss: derived from its logits and labels and kept only
   if they reproduce the returned loss (:func:`~cockpit_lite.losses.derived_losses`).

Otherwise a note says so. Under gradient accumulation each micro-batch k of B_k examples, whose
backward starts from w_k L_k (e.g. ``(loss / 4).backward()``), contributes l_i = (N / B_k) w_k l_i^(k)
with N the step's examples, so that the step's loss sum_k w_k L_k is mean_i l_i.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn

from cockpit_lite.compat import nll_prediction, nll_terms
from cockpit_lite.hooks import on_gradient
from cockpit_lite.losses import (
    DerivedLosses,
    derived_losses,
    fold_rows,
    nll_losses,
    per_sample_losses,
    reduction_of,
    rows_to_examples,
    scalar_loss,
)
from cockpit_lite.model_io import selected_rows
from cockpit_lite.needs import Need, Needs
from cockpit_lite.providers import register_provider
from cockpit_lite.providers.base import BackwardRoot, LossCall, ModelCall, Provider
from cockpit_lite.step import StepRecord

CHANGED = (
    "no per-sample losses on this step: the model's loss no longer matches the definition (shift, ignored "
    "targets, normaliser) found on earlier steps; the next step looks for it again"
)
NO_PER_SAMPLE = (
    "no per-sample losses: the loss is not computed by a loss module the cockpit watches, and the model's "
    "output does not let them be derived exactly; pass Cockpit(..., loss_fn=nn.CrossEntropyLoss()) if the "
    "loop calls one, or loss_fn=lambda output, *args, **kwargs: per-example losses (B,)"
)

NOT_THEIR_SUM = (
    "no per-sample losses on this step: the loss module was called {calls} times for one model call and the "
    "loss backward started from ({root:.6g}) is not the {kind} of their per-example sums ({found:.6g}): a "
    "weighted or partial combination, which the per-example losses cannot be split by"
)

OTHER_NETWORK = (
    "a loss between the model's forward and the optimizer step (a backward pass, or a call of the loss module) did "
    "not reach the model's outputs: another network's loss, as a GAN's discriminator's between the generator's "
    "forward and its step. It is no part of the step's loss or per-sample losses (said once; it holds for every "
    "such step)"
)

ACCUMULATED_CALLS = (
    "no per-sample losses on this step: the loss module was called {calls} times for one model call under "
    "gradient accumulation, where each micro-batch is weighed by the loss backward started from: a weighted "
    "combination of the calls could not be told from their sum"
)


@register_provider
class LossProvider(Provider):
    """``record.loss``, ``record.batch_size`` (examples of the step), ``record.micro_batches``,
    ``record.reduction`` and ``record.per_sample_loss``."""

    PROVIDES = frozenset({Need.LOSS, Need.PER_SAMPLE_LOSS})
    ORDER = 0
    ALWAYS = True  # the loss of every tracked step is recorded; per-sample losses only when asked
    #: the convention of a model's own loss that matched (``DerivedLosses`` keys): tried alone next time
    convention: tuple[tuple, ...] | None = None

    def begin_step(self, record: StepRecord, needs: Needs) -> None:
        self.per_sample = Need.PER_SAMPLE_LOSS in needs.flags
        self.batches: list[int] = []
        # l_i^(k) per micro-batch, L_k = mean (or sum) of them (candidates for a model's own loss)
        self.parts: list[torch.Tensor | DerivedLosses | None] = []
        self.values: list[torch.Tensor | None] = []  # L_k as the loss module or the model returned it
        #: (root value, GradScaler scale) per backward; until the step's gradients are final (:meth:`_settle_roots`)
        #: also the micro-batch it followed, the NLL losses found at its node and the number of its backward
        self.roots: list[tuple] = []
        #: loss-module calls whose backward tells whether they are the model's (``LossCall.reaches`` None):
        #: (micro-batch, what :meth:`_take` takes of it, [number of the backward its output's gradient came in])
        self.told: list[tuple[int, tuple, list]] = []
        self.backwards = 0  #: backward passes begun this step
        self.reaching: set[int] = set()  #: those that reached the model's outputs (their end was seen)
        self.calls: list[int] = []  # the model call each micro-batch came from
        #: loss-module calls per micro-batch (several: their per-example losses are added up, checked at the end)
        self.loss_calls: list[int] = []
        record.reduction = self.context.reduction

    def on_forward(self, record: StepRecord, call: ModelCall) -> None:
        if call.batch is None:
            return
        self.batches.append(call.batch)
        self.parts.append(None)
        self.values.append(None)
        self.calls.append(call.index)
        self.loss_calls.append(0)
        record.micro_batches = list(self.batches)
        record.batch_size = sum(self.batches)

    def _keep_reached(self, record: StepRecord) -> None:
        """Drop the model calls backward never reached (an iteration the loop abandoned)."""
        if not record.reached or len(self.calls) != len(self.batches):
            return
        keep = [k for k, c in enumerate(self.calls) if c in record.reached]
        if len(keep) == len(self.calls):
            return
        self.batches = [self.batches[k] for k in keep]
        self.parts = [self.parts[k] for k in keep]
        self.values = [self.values[k] for k in keep]
        self.calls = [self.calls[k] for k in keep]
        self.loss_calls = [self.loss_calls[k] for k in keep]
        record.micro_batches = list(self.batches)
        record.batch_size = sum(self.batches)
        record.add_note(
            "a model call of this step got no backward (an iteration abandoned after a non-finite loss?): "
            "it is no part of the step",
            frozenset(),
        )

    def on_output(self, record: StepRecord, call: ModelCall) -> None:
        if not self.batches:
            return
        loss = scalar_loss(call.output)
        if loss is not None and self.values[-1] is None:
            self.values[-1] = loss.detach()
        if not self.per_sample or self.parts[-1] is not None:
            return
        fn = self.context.loss_fn
        if callable(fn) and not isinstance(fn, nn.Module):
            with torch.no_grad():
                losses = torch.as_tensor(fn(call.output, *call.args, **call.kwargs)).detach().reshape(-1)
            if losses.numel() != call.batch:
                raise ValueError(f"loss_fn returned {losses.numel()} values for a batch of {call.batch}: return (B,)")
            self.parts[-1] = losses
        elif fn is None:
            self.parts[-1] = derived_losses(call.output, call.args, call.kwargs, call.batch, self.convention)

    def on_loss(self, record: StepRecord, call: LossCall) -> None:
        record.reduction = reduction_of(call.module)
        pred = call.args[0] if call.args else next(iter(call.kwargs.values()))
        if not self.batches:  # a loss module called without a model forward seen: its batch is the step's
            self.on_forward(
                record, ModelCall(call.args, call.kwargs, int(pred.shape[0]) if pred.dim() else 1, index=-1)
            )
        # (detached values only: nothing of the call's graph is kept)
        taken = (
            call.output.detach(),
            int(pred.shape[0]) if pred.dim() > 0 else 1,
            per_sample_losses(call.module, call.args, call.kwargs, call.output) if self.per_sample else None,
            call.rows,
        )
        if call.reaches is None:  # whether it is the model's loss is told by its backward: taken at the step
            mark: list[int | None] = [None]  # (the number of the backward its output's gradient came in)
            on_gradient(call.output, functools.partial(self._mark, mark))
            self.told.append((len(self.batches) - 1, taken, mark))
            return
        self._take(record, len(self.batches) - 1, *taken)

    def _mark(self, mark: list, grad: torch.Tensor) -> None:
        mark[0] = self.backwards

    def _take(
        self,
        record: StepRecord,
        at: int,
        value: torch.Tensor,
        rows: int,
        losses: torch.Tensor | None,
        selected: torch.Tensor | None = None,
    ) -> None:
        """Count a loss-module call into micro-batch ``at``: its loss ``value``, the ``rows`` of its prediction,
        its per-row losses (None where per-sample losses are not asked for) and, where the prediction is a
        selection of the model's rows (``out[mask]``), that selection."""
        again = self.loss_calls[at] > 0  # (another loss-module call for the same model call: added up)
        self.loss_calls[at] += 1
        self.values[at] = self.values[at] + value if again and self.values[at] is not None else value
        if selected is not None and losses is not None:
            # as the batch's, B / n times under a mean over the n selected (g_i = B x example i's share of p.grad)
            losses = rows_to_examples(losses, selected, self.batches[at], record.reduction or "mean")
            if losses is not None and record.reduction == "mean":
                losses = losses * (self.batches[at] / max(len(selected), 1))  # (None: a note at the step)
        elif selected is None and rows % self.batches[at]:
            # the model's input is not batch-first: the loss's rows are the examples
            self.batches[at] = rows
            record.micro_batches = list(self.batches)
            record.batch_size = sum(self.batches)
        if losses is not None:
            part = fold_rows(losses, self.batches[at], record.reduction)
            last = self.parts[at]
            self.parts[at] = last + part if again and torch.is_tensor(last) and last.shape == part.shape else part

    def on_backward_root(self, record: StepRecord, root: BackwardRoot) -> None:
        if len(root.tensors) == 1 and torch.is_tensor(root.tensors[0]) and root.tensors[0].dim() == 0:
            last = self.parts[-1] if self.per_sample and self.parts else False
            found = None
            if (last is None or isinstance(last, DerivedLosses)) and root.nodes:
                # a cross-entropy / NLL in the loop (or the model): its per-example losses from its saved
                # inputs (read now: backward frees them); for a model's own loss one more candidate, kept if
                # it reproduces that loss
                terms = nll_terms(root.nodes[0])
                # (a loss over out[mask]: each row's loss to its example)
                rows = selected_rows(nll_prediction(root.nodes[0]), self.calls[-1]) if terms is not None else None
                found = nll_losses(terms, self.batches[-1], rows) if terms is not None else None
            # (the Cockpit begins the backward right after its root: on_backward_begin numbers it)
            self.roots.append((root.tensors[0], root.scale, len(self.parts) - 1, found, self.backwards + 1))

    def on_backward_begin(self, record: StepRecord) -> None:
        self.backwards += 1

    def on_backward_end(self, record: StepRecord) -> None:
        self.reaching.add(self.backwards)  # (an end is seen only for a backward that reached the model)

    def _reached(self, backward: int | None) -> bool:
        """Whether backward number ``backward`` reached the model: its end was seen, or no end was seen this
        step (a loop whose backward the cockpit cannot see end: every backward counts, as it must)."""
        return backward is not None and (backward in self.reaching or not self.reaching)

    def _settle(self, record: StepRecord) -> None:
        """The step's gradients are final: take the loss-module calls whose backward reached the model, drop the
        others (another network's loss), then the backward roots likewise (:meth:`_settle_roots`)."""
        told, self.told = self.told, []
        dropped = False
        for at, taken, (backward,) in told:
            if self._reached(backward):
                self._take(record, at, *taken)
            else:
                dropped = True
        dropped = self._settle_roots(record) or dropped
        if dropped:
            self.context.warn(OTHER_NETWORK)

    def _settle_roots(self, record: StepRecord) -> bool:
        """Keep the backward roots whose backward reached the model, and take the NLL losses found at theirs
        as their micro-batch's per-example losses. True if some were dropped."""
        roots = self.roots
        kept = [r for r in roots if self._reached(r[4])]
        self.roots = [(value, scale) for value, scale, *_ in kept]
        for _, _, at, found, _ in kept:
            if found is None or at < 0:
                continue
            last = self.parts[at]
            if isinstance(last, DerivedLosses):
                self.parts[at] = last.add(("nll",), found)
            elif last is None:
                self.parts[at] = found
                if self.values[at] is None:
                    self.values[at] = found.mean() if record.reduction == "mean" else found.sum()
        return len(kept) < len(roots)

    def on_before_step(self, record: StepRecord) -> None:
        """The step's tensors (backward roots, the losses the modules returned where wanted, per-sample
        losses) join the step's host batch; :meth:`_finish` fills the record from their values."""
        self._settle(record)
        self._keep_reached(record)
        scales = [s for _, s in self.roots]
        # L_k as the modules returned them: wanted without a backward root, or to weigh micro-batches
        want = not self.roots or (self.per_sample and len(self.parts) > 1)
        given = [k for k, v in enumerate(self.values) if v is not None] if want else []
        parts = list(self.parts) if self.per_sample and self.batches else []
        if parts and any(p is None for p in parts):
            record.add_note(NO_PER_SAMPLE, frozenset({Need.PER_SAMPLE_LOSS}))
            parts = []
        flat = [t for p in parts for t in ([p.rows, p.ok] if isinstance(p, DerivedLosses) else [p])]
        tensors = [v for v, _ in self.roots] + [self.values[k] for k in given] + flat
        if not tensors:
            return
        n_values, batches, combined = len(self.values), list(self.batches), max(self.loss_calls, default=0)

        def finish(host: list[np.ndarray]) -> None:  # host: roots, then the given L_k, then the parts
            n_roots, n_given = len(scales), len(given)
            roots = [(float(v), s) for v, s in zip(host[:n_roots], scales, strict=True)]
            values: list[float | None] = [None] * n_values
            for k, v in zip(given, host[n_roots : n_roots + n_given], strict=True):
                values[k] = float(v)
            chosen = self._chosen(record, parts, host[n_roots + n_given :])
            if combined > 1 and chosen and not self._their_sum(record, roots, chosen, combined):
                chosen = []
            self._finish(record, roots, values, chosen, batches)

        record.host.defer(tensors, finish)

    @staticmethod
    def _their_sum(record: StepRecord, roots: list, parts: list[np.ndarray], calls: int) -> bool:
        """Several loss-module calls for one model call (a loss over two heads; two backward passes
        through one forward): their per-example losses were added up, which is the step's loss per
        example only if the loss backward started from is their sum (with the module's reduction over the
        examples). Checked against the backward roots (none: nothing to check against); else a note."""
        if not roots:
            return True
        if len(parts) != 1:  # (micro-batches are weighed by their roots: a weighted sum would pass unseen)
            record.add_note(ACCUMULATED_CALLS.format(calls=calls), frozenset({Need.PER_SAMPLE_LOSS}))
            return False
        found = float(parts[0].mean() if record.reduction == "mean" else parts[0].sum())
        root = sum(v / s for v, s in roots)
        if math.isclose(found, root, rel_tol=1e-4, abs_tol=1e-6):
            return True
        kind = "mean" if record.reduction == "mean" else "sum"
        record.add_note(
            NOT_THEIR_SUM.format(calls=calls, root=root, kind=kind, found=found), frozenset({Need.PER_SAMPLE_LOSS})
        )
        return False

    def _chosen(self, record: StepRecord, parts: list, host: list[np.ndarray]) -> list[np.ndarray]:
        """The parts' host values, with each model's own loss's candidates replaced by the row that
        reproduces the loss (no part at all, and a note, where none does)."""
        out, at = [], 0
        for p in parts:
            if not isinstance(p, DerivedLosses):
                out.append(host[at])
                at += 1
                continue
            found = p.choose(host[at], host[at + 1])
            at += 2
            if found is None:
                record.add_note(CHANGED if self.convention else NO_PER_SAMPLE, frozenset({Need.PER_SAMPLE_LOSS}))
                self.convention = None
                return []
            # (the NLL node's losses are found again at each backward: only a derived convention is kept)
            self.convention = (found[0],) if found[0] != ("nll",) else None
            out.append(found[1])
        return out

    def _finish(self, record: StepRecord, roots: list, values: list, parts: list, batches: list[int]) -> None:
        if roots:
            record.loss = sum(v / s for v, s in roots)
        elif any(v is not None for v in values):
            record.loss = sum(v for v in values if v is not None) / (len(values) if record.reduction == "mean" else 1)
        if record.loss is not None and not math.isfinite(record.loss):
            # (every statistic of the step descends from it: the note concerns every instrument)
            record.add_note(f"non-finite loss {record.loss}: this step's statistics follow from it", frozenset())
        if parts:
            record.per_sample_loss = self._per_sample(record, roots, values, parts, batches)

    @staticmethod
    def _per_sample(
        record: StepRecord, roots: list, values: list, parts: list, batches: list[int]
    ) -> np.ndarray | None:
        if len(parts) == 1:
            return parts[0]
        # micro-batches: weight w_k = root_k / L_k (the factor the loop scaled L_k by before backward)
        if len(roots) != len(parts) or any(v is None or v == 0.0 for v in values):
            record.add_note(
                "per-sample losses of this step's micro-batches are left out: the factor each micro-batch's "
                "loss was scaled by before backward could not be read",
                frozenset({Need.PER_SAMPLE_LOSS}),
            )
            return None
        n = sum(batches)
        mean = record.reduction == "mean"
        out = [
            part * (root / scale / value) * ((n / b) if mean else 1.0)
            for part, (root, scale), value, b in zip(parts, roots, values, batches, strict=True)
        ]
        return np.concatenate(out)
