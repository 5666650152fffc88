"""The per-sample needs: ||g_i||^2, g_i . gbar, Gram entries, materialised g_i, projections onto
directions known after the step, and the per-layer views for cross products (TracIn probes).

One provider drives the per-sample engine (:mod:`cockpit_lite.persample.engine`): it opens the engine's
session for the step, tells it the batch and the gradient scale from the loss, checks once that the
per-sample gradients add up to ``p.grad``, and turns the engine's immutable per-step result into the
record's numpy fields with one transfer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cockpit_lite.compat import BatchNormBase, without_grad
from cockpit_lite.losses import reduction_of
from cockpit_lite.model_io import any_grad
from cockpit_lite.needs import Need, Needs
from cockpit_lite.persample.checks import DeferredCheck
from cockpit_lite.persample.coupled import CHUNK_NEEDS, SQ_NEEDS, CoupledPath, CoupledRecorder, couples_examples
from cockpit_lite.persample.engine import ALL_PARAMS, PER_SAMPLE_NEEDS, PerSampleEngine, PerSampleResult
from cockpit_lite.providers import register_provider
from cockpit_lite.providers.base import Context, LossCall, ModelCall, Provider
from cockpit_lite.providers.grad_norms import grad_norms
from cockpit_lite.step import StepRecord

#: on steps of a train-mode BatchNorm model, squared norms and Gram entries every this many tracked steps
NORMS_EVERY = 10

MISMATCH = (
    "the per-sample gradients of {listed} do not add up to the gradient autograd accumulated "
    "(in brackets: ||sum_i g_i||^2 over ||p.grad||^2, scaled by the loss's batch factor; 1 if they "
    "did). These parameters get gradient from outside the module calls the per-sample engine "
    "sees: a term added to the loss outside the loss module (a regulariser), a functional use of "
    "the weight (F.linear(x, layer.weight)), or a hook that rescales gradients; or their layer "
    "computes its output in a way the engine does not follow. Their per-sample statistics describe "
    "only the loss module's term through their module; compute the other term inside the loss "
    "module, or call the module, to have them counted."
)
#: a backward that reached several model calls: their examples cannot yet be told apart in one backward
SHARED_BACKWARD = (
    "one backward reached {calls} calls of the model (a loss over several model calls, e.g. "
    "lf(model(x1), y1) + lf(model(x2), y2)): the per-sample engine splits gradients within one model call, "
    "and would take the examples of these calls for the same ones; per-sample statistics are left out for "
    "this step. Call the model once on the joined batch, or call backward once per model call (gradient "
    "accumulation), to have them"
)
#: a backward with no model call since the last one: through a call whose gradients were already taken
REPEATED_BACKWARD = (
    "a second backward through the same model call (loss_a.backward(retain_graph=True); loss_b.backward()): "
    "the per-sample engine takes a call's gradients at its first backward, and the step's per-sample "
    "gradients are the sums of both; per-sample statistics are left out for this step. Add the losses and "
    "call backward once to have them"
)
#: on every later step: what the check found (it runs once)
MISMATCHED = (
    "the per-sample gradients of {names} did not add up to their gradient when checked at step {step}: "
    "their per-sample statistics describe only part of it (that step's note says more)"
)


@register_provider
class PerSampleProvider(Provider):
    PROVIDES = PER_SAMPLE_NEEDS
    USES = frozenset({Need.LOSS})  # batch size and reduction
    ORDER = 900  # last: directions are evaluated on the record the other providers filled (the update)

    def __init__(self, context: Context):
        super().__init__(context)
        self.engine = self._engine()
        self.needs = Needs()
        #: (step, parameter names) of a failed gradient-sum check: said again on every later step
        self.mismatch: tuple[int, str] | None = None
        #: FSDP2 (parameters are DTensors): the coupled path's replay at theta_t is refused (see _coupled)
        self.sharded = context.sharded
        self.coupled, self.path, self.recorder, self.coupled_steps, self.values = False, None, None, 0, None
        #: the BatchNorm layers at attach (the engine's layers are those at attach too): whether one of them
        #: couples the examples is asked every step without walking the model
        self._norms = [m for m in context.network.modules() if isinstance(m, BatchNormBase)]
        #: the coupled path's squared norms every this many of its steps; under an overhead budget on every
        #: step they are asked (the budget measures their cost and thins the steps itself)
        self.norms_every = NORMS_EVERY if context.budget is None else 1

    def _engine(self) -> PerSampleEngine:
        context = self.context
        engine = PerSampleEngine(
            context.network,
            costs=context.costs,
            params={id(p) for p in context.params.values()},
            warn=context.warn,
            model_hooks=False,  # (driven from on_forward, on_output and rest_step)
        )
        engine.may_sleep = not context.compiled
        engine.walks_uses = not (context.compiled or context.sharded)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:  # p.grad is averaged over ranks: no sum to check
                engine.checks_left = 0
        return engine

    def params_changed(self) -> None:
        # the layers served are those holding the trained parameters: a new engine for the new set (its
        # gradient-sum check runs again on its first step); the coupled path too
        self.engine.close()
        self.engine = self._engine()
        self.path = self.recorder = None
        self.mismatch = None

    def end_step(self) -> None:
        self.engine.stop()

    def close(self) -> None:
        self.engine.close()

    def begin_step(self, record: StepRecord, needs: Needs) -> None:
        self.coupled = self._coupled_step(needs)
        self.needs = needs
        self.backward_done = False
        self.backwards = 0
        #: a model call whose backward has not come yet (the next call replaces it if none comes: abandoned)
        self.call_open = False
        #: the model calls backward reached by the end of the last backward (``record.reached``)
        self.reached_before: frozenset[int] = frozenset()
        self.mean = self.context.reduction == "mean"
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.engine.begin(needs)
        if self.coupled:
            self.engine.stop()  # the examples interact: no layer's rows are per-example shares
            return
        if self.engine.checking and any_grad(self.context.params):
            self.engine.skip_check()  # p.grad will hold more than this step's gradient

    def _factor(self, batch: int) -> float:
        return float(batch) if self.mean else 1.0

    def _coupled_step(self, needs: Needs) -> bool:
        """Whether this step goes through the coupled path (a train-mode BatchNorm in the model)."""
        if not needs.names() & PER_SAMPLE_NEEDS or not any(map(couples_examples, self._norms)):
            return False
        if self.path is None:
            self.path = CoupledPath(self.context.network, self.context.params, costs=self.context.costs)
            self.recorder = CoupledRecorder(self.context.network, hooks=False)
        self.recorder.reset()
        self.values = None
        return True

    def rest_step(self) -> None:
        self.engine.rest()

    def on_output(self, record: StepRecord, call: ModelCall) -> None:
        if self.coupled:
            self.recorder.after_forward(call.output)
        else:
            self.engine.forward_ends(call.output)

    def on_forward(self, record: StepRecord, call: ModelCall) -> None:
        if self.coupled:
            self.recorder.before_forward(call.args, call.kwargs)
            return
        if call.batch is None:
            self.engine.forward_begins(call.args, call.kwargs)
            return
        if self.backwards and not self.call_open:  # gradient accumulation: the next micro-batch of the same step
            self.engine.next_micro_batch(call.batch, self._factor(call.batch), self.mean)
        else:
            # the first call, or one after a call no backward followed: that call was abandoned (what it
            # captured gets no gradient and is no part of the step), or its loss is taken with this one's
            # (one backward over both: told at the end of that backward, see on_backward_end)
            if not self.backwards:
                self.engine.needs_changed()  # every provider's begin_step has run by now
            self.engine.set_batch(call.batch, self._factor(call.batch), self.mean)
        self.call_open = True
        self.engine.forward_begins(call.args, call.kwargs)

    def _uncovered(self, covered: set[str], record: StepRecord) -> dict[str, float]:
        """Parameters with a gradient the engine did not see, with their share of sum_p ||p.grad||^2
        (from the gradient norms of the step when the GradNorms provider computed them)."""
        for n, p in self.context.params.items():  # (a loop, not a generator: this runs every step)
            if n not in covered and p.grad is not None:
                break
        else:
            return {}
        norms = record.grad_norms if record.grad_norms is not None else grad_norms(self.context.params)
        total = sum(v * v for v in norms.values()) or 1.0
        return {n: v * v / total for n, v in norms.items() if n not in covered}

    def on_loss(self, record: StepRecord, call: LossCall) -> None:
        """A loss module declares its reduction; its batch is the micro-batch's unless it folds to it."""
        self.mean = reduction_of(call.module) == "mean"
        if self.coupled:
            return
        pred = call.args[0] if call.args else next(iter(call.kwargs.values()))
        rows = int(pred.shape[0]) if pred.dim() > 0 else 1
        batch = self.engine.batch
        if batch is None or (rows % batch and call.rows is None):
            # no model input seen, or it is not batch-first: the loss's rows (not a selection of the model's rows,
            # out[mask]: the examples left out get no gradient, and the batch stays the model's)
            batch = rows
        self.engine.set_batch(batch, self._factor(batch), self.mean)

    def on_backward_begin(self, record: StepRecord) -> None:
        if self.coupled:
            return
        if self.engine.batch is None:
            self.engine.fail(
                "backward ran but no model input with a batch axis was seen: call the model the Cockpit was "
                "given (its first tensor input's axis 0 is the batch)"
            )
            return
        scale = record.backward_scale  # GradScaler's loss scale: the optimizer sees p.grad / scale
        if scale is not None and scale != 1.0:
            if scale == 0.0 or not np.isfinite(scale):
                self.engine.fail(f"backward started from the loss times {scale}: per-sample statistics skipped")
            else:
                self.engine.rescale(1.0 / scale)
        if self.needs.early and not self.backwards:
            early = {}
            for key in self.needs.early:
                d = self.needs.directions[key](record) if key in self.needs.directions else None
                if d is not None:
                    early[key] = d
            self.engine.project_early(early)

    def on_backward_end(self, record: StepRecord) -> None:
        self.backward_done = True
        if self.backwards and not self.call_open and not self.coupled:
            self.engine.fail(REPEATED_BACKWARD)
        self.backwards += 1
        self.call_open = False
        reached, self.reached_before = record.reached - self.reached_before, record.reached
        if len(reached) > 1 and not self.coupled:
            self.engine.fail(SHARED_BACKWARD.format(calls=len(reached)))
        self.engine.finish_backward()
        if self.engine.checking:
            self._check_sums(record)
        accumulated = self.engine.accumulating or (self.coupled and self.recorder.calls > 1)
        if accumulated and Need.PER_SAMPLE_DOT_MEAN in self.needs.flags:
            # gbar of an accumulated step: p.grad after its last backward (before any clipping by the loop)
            scale = record.backward_scale or 1.0
            self.snapshot = {n: p.grad.detach() / scale for n, p in self.context.params.items() if p.grad is not None}

    def _check_sums(self, record: StepRecord) -> None:
        """Warn if the per-sample gradients do not add up to p.grad (see PerSampleEngine.check_sums)."""
        if self.engine.batch is None:
            self.engine.skip_check()
            return
        scale = record.backward_scale if record.backward_scale is not None else 1.0
        factor = (1.0 / self.engine.batch if self.mean else 1.0) * scale  # this micro-batch: p.grad = factor sum g_i
        grads = {n: p.grad.detach() for n, p in self.context.params.items() if p.grad is not None}
        bad = self.engine.check_sums(grads, factor)
        if bad:
            listed = ", ".join(f"{' and '.join(names)} ({r:.3g})" for names, r in bad.items())
            msg = MISMATCH.format(listed=listed)
            self.context.warn(msg)
            record.add_note(msg, self.PROVIDES)
            self.mismatch = (record.step, ", ".join(n for names in bad for n in names))

    def on_before_step(self, record: StepRecord) -> None:
        if self.coupled:
            # theta_t: the coupled path evaluates there after the step (not under FSDP2: see _coupled)
            self.values = None if self.sharded else self.path.snapshot()
            return
        if not self.backward_done:  # no end-of-backward callback fired this step
            self.engine.finish_backward()
            self.engine.skip_check()  # the loop may have changed p.grad since backward
        elif self.call_open:
            # a model call after the last backward got none (a forward with gradients on, evaluated and never
            # trained on): no part of the step
            self.engine.abandon_micro_batch()
        eng = self.engine
        eng.before_step(self.snapshot)  # views kept only to join micro-batches are used and released now
        if eng.active and eng.failure is None:
            record.per_sample_uncovered = self._uncovered(eng.covered, record)
            if record.per_sample_uncovered:
                missing = sorted(record.per_sample_uncovered)
                unseen = [n for n in missing if n not in eng.left_out]  # (the others were left out with a reason)
                moved = eng.rehome(unseen) if unseen else {}  # (left out on this step, served from the next: said)
                moved.update(eng.serve_at_parent())  # (left out for their rows: their parent, from the next step)
                unseen = [n for n in unseen if n not in moved]
                if unseen:
                    self.context.warn(
                        f"parameters {unseen} have gradients but no per-sample contribution was seen: used outside "
                        "their module's forward (a functional use of the weight, F.linear(x, layer.weight)), or their "
                        "module called through a method that skips its hooks; per-sample statistics exclude them"
                    )
                share = sum(record.per_sample_uncovered.values())
                why: dict[str, list[str]] = {}  # (the reasons layers were left out for: to the run, with the step)
                for n in missing:
                    if n in eng.left_out:
                        why.setdefault(eng.left_out[n], []).append(n)
                record.add_note(
                    f"per-sample statistics cover all parameters but {missing} ({share:.1%} of ||p.grad||^2)"
                    + "".join(f"; {', '.join(names)}: {reason}" for reason, names in why.items()),
                    self.PROVIDES,
                )
        if self.mismatch is not None and self.mismatch[0] != record.step and eng.active:
            record.add_note(MISMATCHED.format(step=self.mismatch[0], names=self.mismatch[1]), self.PROVIDES)
        if Need.PER_SAMPLE_CROSS in self.needs.flags:
            eng.decide_checks()  # the views are read before the step's transfer: their conditions now
            if eng.failure is None:
                record.views = eng.kept_views()
                record.engine = eng

    @without_grad
    def on_after_step(self, record: StepRecord) -> None:
        record.views = None  # per-layer factors are not kept past the step
        directions = {}
        for key, fn in self.needs.directions.items():
            d = fn(record)
            if d is not None:
                directions[key] = d
        if self.coupled:
            self._coupled(record, directions)
            return
        result = self.engine.result(directions, self.snapshot)
        self.snapshot = None
        if result.failure is not None:
            record.add_note(result.failure, self.PROVIDES)
            return
        for note in result.notes:
            record.add_note(note, self.PROVIDES)
        self._fill(record, result)

    def _coupled(self, record: StepRecord, directions: dict) -> None:
        """A train-mode BatchNorm step: the coupled path (persample/coupled.py). Projections (g_i . gbar,
        directions) every tracked step; squared norms and Gram entries, which cost B backward passes,
        every ``NORMS_EVERY``-th such step (a note on the others). Under gradient accumulation each
        micro-batch (one model call, one backward) is replayed with its own batch statistics and the
        statistics are joined over the step's N examples (``CoupledPath.joined_statistics``)."""
        rec = self.recorder
        if self.sharded:
            rec.reset()
            record.add_note(
                "train-mode BatchNorm under FSDP2 (fully_shard): the coupled path would replay the model's "
                "forward at the sharded parameters, outside FSDP's gathering; per-sample statistics are left out",
                self.PROVIDES,
            )
            return
        reached = [c for c in rec.captures if c.reached]  # a call the loop abandoned is no part of the step
        if not reached or len(reached) != self.backwards or self.values is None:
            record.add_note(
                "train-mode BatchNorm: the coupled path needs one backward per model call it reaches (this step: "
                f"{len(reached)} such calls, {self.backwards} backward passes); per-sample statistics are left out "
                "for this step",
                self.PROVIDES,
            )
            return
        flags = set(self.needs.flags)
        norms_step = self.coupled_steps % self.norms_every == 0
        self.coupled_steps += 1
        if not norms_step and flags & CHUNK_NEEDS:
            flags -= CHUNK_NEEDS
            record.add_note(
                f"train-mode BatchNorm: squared per-sample norms and Gram entries (B backward passes through the "
                f"batch) are computed every {self.norms_every}th tracked step; this one has projections only",
                frozenset(CHUNK_NEEDS),
            )
        n = sum(self.path.batch_of(c) for c in reached)
        scale = (float(n) if self.mean else 1.0) / (record.backward_scale or 1.0)  # g_i = s J_i^T c_i
        with torch.enable_grad():
            if len(reached) == 1:
                (c,) = reached
                result = self.path.statistics(
                    c.args, c.kwargs, c.output_grads, scale, flags, directions,
                    state=c.state, outputs=c.outputs, values=self.values,
                )  # fmt: skip
            else:
                gbar = self.snapshot  # p.grad after the last backward: gbar, or N gbar for a summed loss
                if gbar is not None and not self.mean:
                    gbar = {k: v / n for k, v in gbar.items()}
                result = self.path.joined_statistics(
                    reached, scale, flags, directions, values=self.values, mean_grad=gbar
                )
        self.snapshot = None
        rec.reset()
        self.values = None
        for note in getattr(result, "notes", ()):
            record.add_note(note, self.PROVIDES)
        self._fill(record, result)

    def _fill(self, record: StepRecord, result: PerSampleResult) -> None:
        """The result's B-vectors (squared norms, g_i . gbar, projections), Gram entries and the values of
        its conditions join the step's host batch, to reach the record with the step's other numbers by
        one transfer (:meth:`_rows`); g_i (device tensors) now, withdrawn if a condition fails."""
        flags = self.needs.flags
        names = list(result.sq_norms) if flags & SQ_NEEDS else []
        dot_mean = result.dot_mean if Need.PER_SAMPLE_DOT_MEAN in flags else None
        keys = list(result.projections)
        grams = list(result.gram) if flags & {Need.PER_SAMPLE_GRAM, Need.PER_SAMPLE_GRAM_BY_PARAM} else []
        rows = [result.sq_norms[n] for n in names] + ([dot_mean] if dot_mean is not None else [])
        rows += [result.projections[k] for k in keys] + [result.gram[n] for n in grams]
        rows += [c.values for c in result.checks]
        if rows:
            by_param = Need.PER_SAMPLE_GRAM_BY_PARAM in flags
            layout = _Layout(names, dot_mean is not None, keys, grams, by_param, result.checks)
            record.host.defer(rows, lambda values: self._rows(record, layout, values))
        if Need.PER_SAMPLE_GRADS in flags and result.grads:
            record.per_sample_grads = dict(result.grads)

    def _rows(self, record: StepRecord, layout: _Layout, values: list[np.ndarray]) -> None:
        """Fill the record from the host values of :meth:`_fill`'s rows (in its order), unless one of
        the result's conditions fails: then what it concerns is left out, with its note."""
        n_checks = len(layout.checks)
        checks, values = (values[-n_checks:], values[:-n_checks]) if n_checks else ([], values)
        dropped: set[str] = set()
        for check, host in zip(layout.checks, checks, strict=True):
            note = check.decide(host)
            if note is not None:
                self.context.warn(note)
                record.add_note(note, self.PROVIDES)
                dropped |= {"*"} if check.drops is None else set(check.drops)
        if "*" in dropped:
            record.per_sample_grads = None
            return
        names, keys, grams = layout.names, layout.keys, layout.grams
        sq, rest = values[: len(names)], values[len(names) :]
        if names == [ALL_PARAMS]:  # the total alone was asked for
            record.per_sample_sq_norms = sq[0]
        elif names:
            record.per_sample_sq_norms_by_param = dict(zip(names, sq, strict=True))
            record.per_sample_sq_norms = np.add.reduce(sq, axis=0)  # (np.sum without its wrapper)
        if layout.dot:
            if "dot_mean" not in dropped:
                record.per_sample_dot_mean = rest[0]
                record.mean_grad_sq_norm = float(np.add.reduce(rest[0])) / len(rest[0])
            rest = rest[1:]
        for key, proj in zip(keys, rest[: len(keys)], strict=True):
            record.projections[key] = proj
        if grams:
            by_param = dict(zip(grams, rest[len(keys) :], strict=True))
            record.per_sample_gram = np.add.reduce(list(by_param.values()), axis=0)
            if layout.gram_by_param:
                record.per_sample_gram_by_param = by_param


@dataclass(frozen=True)
class _Layout:
    """Where each of :meth:`PerSampleProvider._fill`'s rows sits in the host values."""

    names: list[str]
    dot: bool
    keys: list[str]
    grams: list[str]
    gram_by_param: bool  # (the step's need: the record's values are made during the next step with overlap)
    checks: tuple[DeferredCheck, ...]
