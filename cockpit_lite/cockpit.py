"""The Cockpit: attaches to a model, optimizer and loss module by hooks alone and runs instruments.

Step lifecycle (one step = one ``optimizer.step()``; ``step`` counts them from 0):

    model forward pre-hook   a step begins: the instruments scheduled for it are asked what they need
    layer forward hooks      the per-sample engine keeps layer inputs (only if a need asks for it)
    loss forward hook        batch loss, batch size, reduction, per-sample losses
    backward                 output gradients arrive; each layer is reduced at once
    step pre-hook            gradients are final: gradient norms, parameter snapshot, on_before_step
    step post-hook           update known: deferred projections, instruments compute, records to sinks
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from cockpit_lite.errors import CockpitWarning
from cockpit_lite.hooks import SharedHook
from cockpit_lite.instrument import Instrument
from cockpit_lite.losses import check_loss_module, gradient_scale, per_sample_losses
from cockpit_lite.needs import Need, Needs
from cockpit_lite.pause import is_paused, paused  # noqa: F401  (re-exported)
from cockpit_lite.persample.engine import PerSampleEngine
from cockpit_lite.profiling import Costs, Profiler, label
from cockpit_lite.records import History, to_value
from cockpit_lite.registry import resolve
from cockpit_lite.sinks.base import RunContext, Sink
from cockpit_lite.sinks.jsonl import JsonLines
from cockpit_lite.step import StepRecord
from cockpit_lite.unwrap import unwrap


def _check_model_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, nn.Parameter]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters: there is nothing to diagnose. "
            "Attach the cockpit to the module whose parameters the optimizer trains."
        )
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if not held & {id(p) for p in params.values()}:
        raise ValueError(
            "the optimizer holds none of the model's parameters (was it built for another model, or "
            "before the model was copied/moved?). Build it from this model: "
            "torch.optim.SGD(model.parameters(), ...)."
        )
    return {n: p for n, p in params.items() if id(p) in held}


def _rows_to_numpy(tensors: Sequence[torch.Tensor]) -> np.ndarray | list[np.ndarray]:
    """float64 numpy copies of equally shaped tensors: one (n, ...) array from one transfer when they
    share a device, else a list."""
    try:
        return torch.stack(list(tensors)).double().cpu().numpy()
    except RuntimeError:  # different devices or shapes
        return [t.double().cpu().numpy() for t in tensors]


class Cockpit:
    """Attach instruments to an unchanged training loop.

    Args:
        model: the network; its forward marks the start of a step.
        optimizer: any ``torch.optim.Optimizer``; its ``step()`` ends a step.
        loss_fn: the ``torch.nn`` loss module the loop calls (reduction "mean" or "sum").
        instruments: a preset name (``"economy"``, ``"minimal"``, ``"full"``), or a list of
            instruments (or registered instrument names).
        logdir: if given, records stream to ``logdir/cockpit.jsonl`` as training runs; with no
            ``sinks`` given, also to TensorBoard event files in ``logdir``.
        sinks: further sinks (``cockpit_lite.sinks.TensorBoard``, ``Dashboard``, ...). The JSON lines
            of ``logdir`` are always written first; ``sinks=[]`` means JSON lines only.
        profile: ``True`` or a ``torch.profiler.schedule(...)``: run ``torch.profiler`` over the
            training steps and write ``*.pt.trace.json`` traces into ``logdir`` (needs ``logdir``).
            ``True`` records steps 2-4. Every instrument's work is labelled ``cockpit_lite/<name>``.

    Use as a context manager, or call :meth:`close` when done; both remove every hook.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: nn.Module,
        instruments: str | Iterable[Instrument | str] = "economy",
        logdir: str | os.PathLike | None = None,
        sinks: Sequence[Sink] | None = None,
        profile: bool | Callable[[int], Any] = False,
    ):
        #: the user's module without DDP/DataParallel/torch.compile wrappers: parameter names, per-layer
        #: hooks and instruments see it; the step begins with a forward of ``model`` as the loop calls it
        self.network, compiled = unwrap(model)
        if compiled:
            # code dynamo compiled before the cockpit attached never calls its layer hooks (by default it
            # does not guard on module hooks, and it reuses code across instances of a class): guard on
            # them from now on, and drop the compiled code so that the model recompiles once, hooks in
            torch._dynamo.config.skip_nnmodule_hook_guards = False
            torch._dynamo.reset()
        self.params = _check_model_optimizer(self.network, optimizer)
        check_loss_module(loss_fn)
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.instruments = resolve(instruments)
        keys = [i.key for i in self.instruments]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"two instruments share the key(s) {dupes}: give one of them name='...'")
        self.logdir = os.fspath(logdir) if logdir is not None else None
        if profile is not False and profile is not None and self.logdir is None:
            raise ValueError("profile= writes trace files into the logdir: give Cockpit(..., logdir='runs/exp1')")
        if sinks is None and self.logdir is not None:
            from cockpit_lite.sinks.tensorboard import TensorBoard  # imports tensorboard: only when used

            sinks = [TensorBoard(self.logdir)]
        self.sinks: list[Sink] = list(sinks or [])
        if self.logdir is not None and not any(isinstance(s, JsonLines) for s in self.sinks):
            self.sinks.insert(0, JsonLines(self.logdir))
        self.history = History()
        self.step = 0
        self.costs = Costs()
        self._sinks_ms: tuple[int, float] | None = None  # (step, ms) the sinks took for the last emit
        self._warned: set[str] = set()
        self._closed = False
        self._in_step = False
        self._backward_done = False
        self._active: list[Instrument] = []
        self._needs = Needs()
        self._record = StepRecord(step=0)
        self._snapshot: list[torch.Tensor] | None = None
        self._snapshot_buffers: list[torch.Tensor] | None = None
        self._skip = False
        self._t_step = 0.0
        #: set by :meth:`track`: dataset indices of the batch last yielded, and the dataset's length
        self._batch_indices: np.ndarray | None = None
        self._dataset_size: int | None = None

        # per-sample statistics of the parameters the optimizer trains, like every other record
        self.engine = PerSampleEngine(self.network, costs=self.costs, params={id(p) for p in self.params.values()})
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:  # p.grad is averaged over ranks: no sum to check
                self.engine.checks_left = 0
        self._hooks = [
            model.register_forward_pre_hook(SharedHook(self._on_model_forward)),
            loss_fn.register_forward_hook(SharedHook(self._on_loss), with_kwargs=True),
            optimizer.register_step_pre_hook(SharedHook(self._on_before_step)),
            optimizer.register_step_post_hook(SharedHook(self._on_after_step)),
        ]
        for inst in self.instruments:
            inst.on_attach(self.network, optimizer)
        self.context = RunContext(logdir=self.logdir, history=self.history, instruments=tuple(self.instruments))
        for sink in self.sinks:
            sink.open(self.context)
        self.profiler: Profiler | None = None
        if profile is not False and profile is not None:
            self.profiler = Profiler(self.logdir, None if profile is True else profile)

    # --- context management -------------------------------------------------------------------------------
    def __enter__(self) -> Cockpit:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook, let instruments write final records, flush and close the sinks."""
        if self._closed:
            return
        self._closed = True
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.engine.close()
        final: dict[Any, Any] = {}
        for inst in self.instruments:
            try:
                final.update(inst.on_close() or {})
            except Exception as e:
                self._warn(f"{inst.key}.on_close failed: {e}")
        if final:
            self._emit(max(self.step - 1, 0), final)
        if self.profiler is not None:
            try:
                self.profiler.close()
            except Exception as e:
                self._warn(f"writing the profiler trace failed: {e}")
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:
                self._warn(f"closing sink {type(sink).__name__} failed: {e}")

    def track(self, loader: Iterable, resolve_subsets: bool = False) -> Iterator:
        """Yield exactly the batches of ``loader`` while recording the dataset indices of each one
        (``record.indices`` for instruments that need ``Need.INDICES``, e.g. TracIn).

        See :func:`cockpit_lite.tracking.track` for what is supported.
        """
        from cockpit_lite.tracking import track

        return track(self, loader, resolve_subsets=resolve_subsets)

    def state_dict(self) -> dict[str, Any]:
        """The run's state to resume from a checkpoint: the step count and every instrument's state
        (by instrument key). Save it next to the model and optimizer with ``torch.save``."""
        return {
            "version": 1,
            "step": self.step,
            "instruments": {inst.key: inst.state_dict() for inst in self.instruments},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a run: the step count and the state of every instrument with the same key."""
        self.step = int(state["step"])
        saved = state.get("instruments", {})
        for inst in self.instruments:
            if inst.key in saved:
                inst.load_state_dict(saved[inst.key])

    def verdicts(self) -> list[str]:
        """Plain-language statements from every instrument that makes them (e.g. the learning rate)."""
        out = []
        for inst in self.instruments:
            out.extend(inst.verdicts())
        return out

    # --- hooks ------------------------------------------------------------------------------------------
    def _warn(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            warnings.warn(f"cockpit-lite: {msg}", CockpitWarning, stacklevel=3)

    def _begin_step(self) -> None:
        self._in_step = True
        self._skip = False
        self._t_step = time.perf_counter()
        self.costs.reset()
        self._active = []
        self._needs = Needs()
        for inst in self.instruments:
            try:
                needs = inst.requires(self.step)
            except Exception as e:
                self._warn(f"{inst.key}.requires failed: {e}")
                continue
            if needs or inst.scheduled(self.step):
                self._active.append(inst)
                self._needs.merge(needs)
        self._record = StepRecord(step=self.step, params=self.params, loss_fn=self.loss_fn, logdir=self.logdir)
        self._loss_calls = 0
        self._backward_done = False
        self.engine.begin(self._needs)
        if self.engine.checking and not self._grads_clear():
            self.engine.skip_check()  # p.grad will hold more than this step's gradient

    def _grads_clear(self) -> bool:
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        return not grads or not bool(torch.stack(torch._foreach_norm(grads)).any())

    def _on_model_forward(self, module, args) -> None:
        if is_paused() or module is not self.model:  # a deepcopy of the model carries our hooks
            return
        if self._in_step and self._backward_done and all(p.grad is None for p in self.params.values()):
            # a backward finished, the gradients were zeroed, and no optimizer.step() came: the step was
            # skipped (AMP's GradScaler found inf/NaN gradients). This forward is a new attempt.
            self._in_step = False
        if not self._in_step:
            self._begin_step()

    def _on_loss(self, module, args, kwargs, output) -> None:
        if is_paused() or module is not self.loss_fn:
            return
        if not self._in_step:
            self._begin_step()
        if self._skip or not self._active or not torch.is_tensor(output) or not output.requires_grad:
            return  # nothing tracked, or an evaluation under no_grad
        with self.costs.region("loss"):
            try:
                self._loss_calls += 1
                if self._loss_calls > 1:
                    self.engine.fail(
                        "the loss was computed more than once before optimizer.step() (gradient "
                        "accumulation?): per-sample statistics are skipped for such steps"
                    )
                pred = args[0] if args else next(iter(kwargs.values()))
                batch = int(pred.shape[0]) if pred.dim() > 0 else 1
                rec = self._record
                rec.batch_size = batch
                rec.reduction = module.reduction
                rec.loss = float(output.detach())
                if not math.isfinite(rec.loss):
                    rec.notes.append(f"non-finite loss {rec.loss}")
                self.engine.set_batch(batch, 1.0 / gradient_scale(module.reduction, batch))
                if Need.INDICES in self._needs.flags:
                    self._set_indices(rec, batch)
                if Need.PER_SAMPLE_LOSS in self._needs.flags:
                    rec.per_sample_loss = per_sample_losses(module, args, kwargs).double().cpu().numpy()
                if self._loss_calls == 1:
                    # fires when backward reaches the loss; from there, queue our end-of-backward callback
                    output.register_hook(self._on_backward_start)
            except Exception as e:
                self._warn(f"reading the loss failed ({e}); this step's loss statistics are skipped")

    def _set_indices(self, rec: StepRecord, batch: int) -> None:
        idx = self._batch_indices
        rec.dataset_size = self._dataset_size
        if idx is None:
            rec.notes.append("no dataset indices: iterate `for batch in cockpit.track(loader)` to record them")
        elif len(idx) != batch:
            rec.notes.append(
                f"the last batch from cockpit.track() holds {len(idx)} examples but the loss saw {batch}: "
                "dataset indices are skipped for this step"
            )
        else:
            rec.indices = idx

    def _on_backward_start(self, grad):
        """Backward reached the loss. ``grad`` is the factor it started with: 1 for ``loss.backward()``,
        the loss scale for AMP's ``scaler.scale(loss).backward()``; per-sample gradients and the
        gradient norms after backward are divided by it, so they stay those of the loss module."""
        try:
            scale = float(grad) if grad is not None and grad.numel() == 1 else None
        except Exception:
            scale = None
        self._record.backward_scale = scale
        if scale is not None and scale != 1.0:
            if scale == 0.0 or not math.isfinite(scale):
                self.engine.fail(f"backward started from the loss times {scale}: per-sample statistics skipped")
            elif self.engine.inv_scale is not None:
                self.engine.inv_scale /= scale
        torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)

    def _on_backward_end(self) -> None:
        """All gradients of this backward are accumulated; the loop has not touched them yet."""
        if not self._in_step or not self._active:
            return
        self._backward_done = True
        with self.costs.region("after_backward"):
            try:
                self._settle_backward()
                if self.engine.checking:
                    self._check_sums()
                if Need.BACKWARD_GRAD_NORMS in self._needs.flags:
                    norms = self._grad_norms()
                    scale = self._record.backward_scale
                    if scale not in (None, 0.0, 1.0) and math.isfinite(scale):
                        norms = {n: v / scale for n, v in norms.items()}
                    self._record.backward_grad_norms = norms
                for inst in self._active:
                    try:
                        inst.on_after_backward(self._record)
                    except Exception as e:
                        self._warn(f"{inst.key}.on_after_backward failed: {e}")
            except Exception as e:
                self._warn(f"end-of-backward work failed ({e})")

    def _check_sums(self) -> None:
        """Warn if the per-sample gradients do not add up to p.grad (see PerSampleEngine.check_sums)."""
        rec = self._record
        if rec.reduction is None or rec.batch_size is None:
            self.engine.skip_check()
            return
        scale = rec.backward_scale if rec.backward_scale is not None else 1.0
        factor = gradient_scale(rec.reduction, rec.batch_size) * scale
        grads = {n: p.grad.detach() for n, p in self.params.items() if p.grad is not None}
        bad = self.engine.check_sums(grads, factor)
        if bad:
            listed = ", ".join(f"{' and '.join(names)} ({r:.3g})" for names, r in bad.items())
            msg = (
                f"the per-sample gradients of {listed} do not add up to the gradient autograd accumulated "
                "(in brackets: ||sum_i g_i||^2 over ||p.grad||^2, scaled by the loss's batch factor; 1 if they "
                "did). These parameters get gradient from outside the module calls the per-sample engine "
                "sees: a term added to the loss outside the loss module (a regulariser), a functional use of "
                "the weight (F.linear(x, layer.weight)), or a hook that rescales gradients. Their per-sample "
                "statistics describe only the loss module's term through their module; compute the other "
                "term inside the loss module, or call the module, to have them counted."
            )
            self._warn(msg)
            rec.notes.append(msg)

    def _settle_backward(self) -> None:
        """Reduce layers whose outputs got no gradient in some call; hand the kept views over."""
        self.engine.finish_backward()
        if Need.PER_SAMPLE_CROSS in self._needs.flags:
            self._record.views = self.engine.kept_views()

    def _grad_norms(self) -> dict[str, float]:
        named = [(n, p.grad) for n, p in self.params.items() if p.grad is not None]
        if not named:
            return {}
        norms = torch.stack(torch._foreach_norm([g for _, g in named])).double().cpu().numpy()
        return {n: float(v) for (n, _), v in zip(named, norms, strict=True)}

    def _on_before_step(self, optimizer, args, kwargs) -> None:
        if is_paused() or optimizer is not self.optimizer:
            return
        # args are step()'s positional arguments, self included
        if any(callable(a) for a in args[1:]) or kwargs.get("closure") is not None:
            if not self._in_step:  # the closure's forward must not open a step of its own
                self._begin_step()
            self._skip = True
            self.engine.fail(
                "optimizer.step(closure) runs backward inside step(), after the cockpit's step "
                "pre-hook: such steps are not tracked (training is unaffected). Call loss.backward() "
                "before optimizer.step() to track them."
            )
            return
        if not self._in_step or not self._active:
            return
        with self.costs.region("before_step"):
            try:
                self._before_step()
            except Exception as e:
                self._warn(f"pre-step work failed ({e})")

    def _before_step(self) -> None:
        rec, flags = self._record, self._needs.flags
        if not self._backward_done:  # no end-of-backward callback fired this step
            self._settle_backward()
            self.engine.skip_check()  # the loop may have changed p.grad since backward
        rec.lrs = [float(g["lr"]) for g in self.optimizer.param_groups if "lr" in g]
        if Need.GRAD_NORMS in flags:
            with self.costs.region("grad_norms"):
                rec.grad_norms = self._grad_norms()
            if not rec.grad_norms:
                rec.notes.append("no parameter has a gradient: was loss.backward() called?")
        if self.engine.active and self.engine.failure is None:
            missing = [n for n, p in self.params.items() if p.grad is not None and n not in self.engine.covered]
            if missing:
                self._warn(
                    f"parameters {missing} have gradients but no per-sample contribution was seen (used "
                    "outside their module's forward?): per-sample statistics exclude them"
                )
        if Need.UPDATE in flags:
            with self.costs.region("snapshot"):
                if self._snapshot_buffers is None:  # allocated once: no page faults per step
                    self._snapshot_buffers = [torch.empty_like(p) for p in self.params.values()]
                torch._foreach_copy_(self._snapshot_buffers, [p.detach() for p in self.params.values()])
                self._snapshot = self._snapshot_buffers
        for inst in self._active:
            with self.costs.region(inst.key):
                try:
                    inst.on_before_step(rec)
                except Exception as e:
                    self._warn(f"{inst.key}.on_before_step failed: {e}")

    def _on_after_step(self, optimizer, args, kwargs) -> None:
        if not self._in_step or is_paused() or optimizer is not self.optimizer:
            return
        try:
            if not self._skip and self._active:
                self._after_step()
        except Exception as e:
            self._warn(f"post-step work failed ({e}); this step's records are incomplete")
        finally:
            self._in_step = False
            self._snapshot = None
            self._record.views = None  # per-layer factors are not kept past the step
            self.step += 1
            if self.profiler is not None:
                try:
                    self.profiler.step()
                except Exception as e:
                    self._warn(f"torch.profiler failed ({e}); profiling stops, training goes on")
                    self.profiler = None

    def _after_step(self) -> None:
        rec = self._record
        with self.costs.region("after_step"):
            if self._snapshot is not None:
                with torch.no_grad():
                    for p, buf in zip(self.params.values(), self._snapshot, strict=True):
                        torch.sub(p.detach(), buf, out=buf)  # the snapshot buffer now holds the update
                rec.update = dict(zip(self.params, self._snapshot, strict=True))
            self._collect_per_sample(rec)
        records: dict[Any, Any] = {}
        for inst in self._active:
            with self.costs.region(inst.key):
                try:
                    out = inst.compute(rec) or {}
                    records.update(out)
                except Exception as e:
                    self._warn(f"{inst.key}.compute failed at step {rec.step}: {type(e).__name__}: {e}")
        records.update(self._cost_records((time.perf_counter() - self._t_step) * 1e3))
        self._emit(rec.step, records)

    def _cost_records(self, step_ms: float) -> dict[Any, float]:
        """``cost/<name>_ms`` (exclusive wall time of each region this step) and ``cost/<name>_share``
        (that time / ``cost/step_ms``, the wall time from the model's forward to the records being
        ready); ``cost/cockpit_ms``/``_share`` sum every region. The sinks' time for the previous
        tracked step is recorded under that step as ``cost/sinks_ms``/``_share``."""
        out: dict[Any, float] = {"cost/step_ms": step_ms}
        share = (lambda ms: ms / step_ms) if step_ms > 0 else (lambda ms: math.nan)  # noqa: E731
        for name, ms in self.costs.ms.items():
            out[f"cost/{name}_ms"] = ms
            out[f"cost/{name}_share"] = share(ms)
        total = self.costs.total()
        out["cost/cockpit_ms"] = total
        out["cost/cockpit_share"] = share(total)
        if self._sinks_ms is not None:
            prev, ms = self._sinks_ms
            prev_step_ms = self.history.last("cost/step_ms")
            out[(prev, "cost/sinks_ms")] = ms
            if prev_step_ms:
                out[(prev, "cost/sinks_share")] = ms / prev_step_ms
            self._sinks_ms = None
        return out

    def _collect_per_sample(self, rec: StepRecord) -> None:
        eng, flags = self.engine, self._needs.flags
        if not self._needs.per_sample:
            return
        if eng.failure is not None:
            rec.notes.append(eng.failure)
            return
        with torch.no_grad():
            if self._needs.directions:
                dirs = {}
                for key, fn in self._needs.directions.items():
                    d = fn(rec)
                    if d is not None:
                        dirs[key] = d
                for key, proj in eng.project(dirs).items():
                    rec.projections[key] = proj.double().cpu().numpy()
            as_np = lambda t: t.double().cpu().numpy()  # noqa: E731
            names = list(eng.sq) if Need.PER_SAMPLE_SQ_NORMS in flags else []
            dot_mean = eng.dot_mean if Need.PER_SAMPLE_DOT_MEAN in flags else None
            parts = [eng.sq[n] for n in names] + ([dot_mean] if dot_mean is not None else [])
            rows = _rows_to_numpy(parts) if parts else []  # one transfer for all B-vectors
            if names:
                rec.per_sample_sq_norms_by_param = dict(zip(names, rows[: len(names)], strict=True))
                rec.per_sample_sq_norms = np.sum(rows[: len(names)], axis=0)
            if dot_mean is not None:
                rec.per_sample_dot_mean = rows[-1]
                rec.mean_grad_sq_norm = float(rows[-1].mean())
            if flags & {Need.PER_SAMPLE_GRAM, Need.PER_SAMPLE_GRAM_BY_PARAM} and eng.gram:
                by_param = {n: as_np(v) for n, v in eng.gram.items()}
                rec.per_sample_gram = np.sum(list(by_param.values()), axis=0)
                if Need.PER_SAMPLE_GRAM_BY_PARAM in flags:
                    rec.per_sample_gram_by_param = by_param
            if Need.PER_SAMPLE_GRADS in flags and eng.grads:
                rec.per_sample_grads = dict(eng.grads)

    def _emit(self, step: int, records: Mapping[Any, Any]) -> None:
        """Group records by step (keys may be ``tag`` or ``(step, tag)``) and hand them to the sinks."""
        by_step: dict[int, dict[str, Any]] = {}
        for key, value in records.items():
            s, tag = key if isinstance(key, tuple) else (step, key)
            try:
                by_step.setdefault(int(s), {})[tag] = to_value(value)
            except TypeError as e:
                self._warn(f"record {tag!r} dropped: {e}")
        t0 = time.perf_counter()
        for s in sorted(by_step):
            self.history.add(s, by_step[s])
            for sink in self.sinks:
                try:
                    with label(f"sink/{type(sink).__name__}"):
                        sink.write(s, by_step[s])
                except Exception as e:
                    self._warn(f"sink {type(sink).__name__} failed to write ({e}); it keeps trying")
        if by_step:
            self._sinks_ms = (max(by_step), (time.perf_counter() - t0) * 1e3)
