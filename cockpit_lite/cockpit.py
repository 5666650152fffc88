"""The Cockpit: a hook driver. It turns PyTorch hooks into lifecycle events, runs the providers of the
needs the scheduled instruments asked for, hands the read-only step record to the instruments and
their records to one emitter (docs/design.md draws the flow).

    model forward pre-hook   begin_step: the instruments scheduled for this step say what they need
    loss forward hook        on_loss, and a hook on the loss's output for the start of backward
    backward reaches loss    on_backward_begin (the factor backward started from: AMP's loss scale)
    end of backward          on_backward_end, then instruments' on_after_backward
    step pre-hook            on_before_step (p.grad as the optimizer gets it), then instruments'
    step post-hook           on_after_step, then instruments' compute -> records -> emitter -> sinks
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from cockpit_lite import attach, signals
from cockpit_lite.budget import Budget, check_fraction
from cockpit_lite.compat import (
    BackwardWatch,
    dynamo_hook_guards,
    grad_scaler_factor,
    queue_backward_callback,
    read_loss_scale,
)
from cockpit_lite.distributed import world_size
from cockpit_lite.emitter import Emitter
from cockpit_lite.errors import warn
from cockpit_lite.hooks import SharedHook, on_gradient
from cockpit_lite.instrument import Instrument
from cockpit_lite.lifecycle import Guard, Step, guarded
from cockpit_lite.losses import check_loss
from cockpit_lite.model_io import (
    batch_of,
    grad_marks,
    mark_output,
    moved_since,
    selected_rows,
    step_closure,
    tensors_of,
    zeroed_since,
)
from cockpit_lite.parts import PartCalls
from cockpit_lite.pause import is_paused
from cockpit_lite.profiling import COST_EVERY, Costs, Profiler, check_every
from cockpit_lite.providers import BackwardRoot, Context, LossCall, ModelCall, registered_providers
from cockpit_lite.records import History
from cockpit_lite.sinks.base import RunContext, Sink
from cockpit_lite.unwrap import unwrap, unwrap_optimizer

#: said once where the parameters moved between a backward and the next forward without an optimizer step
MOVED = (
    "the parameters moved between a backward and the next forward with the gradients zeroed and no step of the "
    "optimizer the cockpit watches: SAM's ascent step (first_step), or a step the cockpit does not see. The step "
    "is taken from the passes after the move (SAM: its loss and gradients at the perturbed point, which the "
    "optimizer steps with). If no step is ever recorded, give the cockpit the optimizer whose step() runs"
)


#: said once where the optimizer steps but the model's forward is never called and no part of it holds its parameters
NO_FORWARD = (
    "optimizer.step() ran, but the forward of the model the cockpit was given ({model}) was never called, nor a "
    "submodule holding the trained parameters: the cockpit begins a step at that forward, so nothing is recorded. "
    "Give the cockpit the module the loop calls, or announce each batch with cockpit.model_called(args) and "
    "cockpit.model_returned(args, None, output)"
)
#: said once where the loop calls the model's parts, never its forward
PARTS = (
    "the forward of the model the cockpit was given ({model}) is never called: the loop calls its parts "
    "(model.encoder(x), then model.head(h)). From step {step} on, each step's first call of a part holding trained "
    "parameters is taken as the model's call (the batch is axis 0 of its input, backward is seen where it reaches "
    "that call's outputs); the steps before are not recorded. Give the cockpit a module whose forward the loop "
    "calls to have every step, and a forward that train-mode BatchNorm can be replayed through"
)


class Cockpit:
    """Attach instruments to an unchanged training loop.

    Args:
        model: the network; its forward marks the start of a step.
        optimizer: any ``torch.optim.Optimizer``; its ``step()`` ends a step. Or a list of optimizers that
            step the model's parameters together (Muon beside AdamW): each steps once per step, the
            first's ``step()`` begins the step's end, the last one's ends it.
        loss_fn: optional. The ``torch.nn`` loss module the loop calls (it declares its reduction and gives
            per-sample losses), or a callable ``loss_fn(output, *model_args, **model_kwargs)`` returning
            the per-sample losses (B,) of a model call. Without it the cockpit follows the model: the
            batch is axis 0 of the model's input, backward is seen at the model's outputs, the loss
            is the tensor ``backward()`` is called on, per-sample losses are derived where exact.
        instruments: a preset name (``"economy"``, ``"minimal"``, ``"full"``), or a list of
            instruments (or registered instrument names).
        logdir: records stream to ``logdir/cockpit.jsonl``; with no ``sinks`` given, also to TensorBoard.
            One directory per run: if ``logdir`` already holds a run, this one is written beside it, into
            the first free ``<logdir>-2``, ``<logdir>-3``, ... (a warning names it; ``cockpit.logdir``
            holds it), unless ``resume=True``.
        sinks: further sinks (``cockpit_lite.sinks.TensorBoard``, ``Dashboard``, ...). The JSON lines
            of ``logdir`` are always written first; ``sinks=[]`` means JSON lines only.
        profile: ``True`` or a ``torch.profiler.schedule(...)``: ``torch.profiler`` traces of the
            training steps, written into ``logdir`` or, without one, where the TensorBoard sink writes.
            ``True`` records steps 2-4. Every instrument's work is labelled ``cockpit_lite/<name>``.
        reduction: ``"mean"`` (default: p.grad = mean_i g_i) or ``"sum"`` (p.grad = sum_i g_i), for a
            loss the cockpit cannot see; a loss module's own reduction takes precedence.
        resume: continue the run already in ``logdir`` (and in the sinks' directories), appending to it:
            for a run restarted from a checkpoint with :meth:`load_state_dict`. Records of steps the run
            wrote before are replaced by the new ones when read back with ``load()``.
        budget: None, or the largest share of wall time the cockpit may take (0 < budget < 1, e.g.
            ``0.05``): after a warm-up of 4 + 6n steps (n instruments) that measures each instrument
            alone (three times), the cheap instruments run every step and the costly ones together on the steps that
            keep the measured share <= budget over every window of 100 steps (:mod:`cockpit_lite.budget`,
            docs/budget.md). An instrument runs only where both its own schedule and the budget allow.
            The schedule is recorded (``budget/plan``, ``budget/interval``, ``budget/share``), and
            :meth:`verdicts` say how many steps a thinned instrument ran on. Not under DDP yet.
        overlap: make each step's records during the next step, once its forward has been launched
            (docs/design.md, "Overlap"): the step's one transfer to the host is launched without waiting
            for it, so on a GPU the device never waits for the cockpit, and the host's work on the records
            (instruments' ``compute``, the sinks) runs while the device computes the next step. The
            numbers are the same; each step's records are written one step later, the last one by
            :meth:`close` (or :meth:`state_dict`). Nothing is gained on a CPU. Under DDP the per-sample
            vectors are gathered at the step, as without it. Not with ``budget=`` yet.
        cost_every: the cockpit's own cost (``cost/<name>_ms`` of each instrument and part, ``cost/cockpit_ms``,
            ``cost/driver_ms``, ``cost/sinks_ms`` and their shares) is measured on the first 3 tracked steps, then
            every ``cost_every``-th step (default 10), on every step whose work differs from the last step's (an
            instrument with ``every=`` running), on every step while a torch profiler records, and on every step
            with ``budget=`` (which schedules by it). ``cost/step_ms``, the step's wall time, is recorded on
            every tracked step. ``cost_every=1`` measures every step (reading the clock around each part of the
            cockpit's work costs tens of microseconds a step: docs/profiling.md).

    Construction is atomic: if it raises, nothing stays attached. Use as a context manager, or call
    :meth:`close` when done; both remove every hook and close every file.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        loss_fn: nn.Module | Callable[..., torch.Tensor] | None = None,
        instruments: str | Iterable[Instrument | str] = "economy",
        logdir: str | os.PathLike | None = None,
        sinks: Sequence[Sink] | None = None,
        profile: bool | Callable[[int], Any] = False,
        reduction: str = "mean",
        resume: bool = False,
        budget: float | None = None,
        overlap: bool = False,
        cost_every: int = COST_EVERY,
    ):
        self._warned: set[str] = set()
        self._closed, self.step, self._step = False, 0, None
        #: a grad-enabled forward of the model was seen (steps begin with it: a loss call outside a step is not its)
        self._forward_seen = False
        self._unseen_steps = 0  #: optimizer steps while no forward of the model was ever seen (NO_FORWARD)
        #: the loop calls the model's parts, never its forward: their calls stand for it (``_no_forward``)
        self._parts: PartCalls | None = None
        self.overlap = bool(overlap)
        #: overlap=True: the step launched last, and its skipped iterations, whose records are still to make
        self._late: tuple[Step, int] | None = None
        with contextlib.ExitStack() as undo:
            #: the user's module inside DDP/DataParallel/torch.compile wrappers: names and hooks see it
            self.network, compiled = unwrap(model)
            if compiled:  # compiled code must guard on the layer hooks (restored on close)
                undo.enter_context(dynamo_hook_guards())
            given = tuple(optimizer) if isinstance(optimizer, (list, tuple)) else (optimizer,)
            #: the optimizers whose steps end a step, each once (one unless a list was given); unwrapped:
            #: LightningOptimizer, accelerate's AcceleratedOptimizer
            self._stepping = tuple(unwrap_optimizer(o) for o in given)
            self.params = attach.check_model_optimizers(self.network, self._stepping)
            self._look_at_trainable()
            # several optimizers are read as one (attach.Optimizers)
            optimizer = attach.Optimizers(self._stepping) if len(self._stepping) > 1 else self._stepping[0]
            #: ids of those optimizers (their step hooks' identity check; those that stepped so far: ``Step.stepped``)
            self._stepping_ids = frozenset(map(id, self._stepping))
            check_loss(loss_fn)
            if reduction not in ("mean", "sum"):
                raise ValueError(f"reduction={reduction!r}: say 'mean' (p.grad = mean_i g_i) or 'sum'")
            fraction = check_fraction(budget)
            if fraction is not None and overlap:
                raise ValueError(
                    "budget= and overlap=True together are not supported yet: the budget schedules each step from "
                    "the costs of the step before, which overlap=True measures only during the next one. Use one"
                )
            if fraction is not None and world_size() > 1:
                raise ValueError(
                    "budget= is not supported under DDP yet: each rank would choose its own steps from its own "
                    "timings. Use budget=None, or every=/schedule= on the costly instruments"
                )
            self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
            self.instruments = attach.instruments_of(instruments)
            self.logdir = attach.run_dir_of(logdir, resume, self._warn)
            self.sinks = attach.sinks_of(self.logdir, sinks)
            attach.own_run_dirs(self.sinks, logdir, self.logdir, resume, self._warn)
            profiling = profile is not False and profile is not None
            trace_dir = attach.profile_dir(self.logdir, self.sinks) if profiling else None
            #: every step's costs are measured under a budget (it schedules by them)
            self.history, self.costs = History(), Costs(1 if fraction is not None else check_every(cost_every))
            self._measured: int | None = None  #: the last step reported, if its costs were measured
            self._first_param = next(iter(self.params.values()), None)
            self._guard = Guard(self._warn, self.costs)
            context = Context(
                self.network, optimizer, self.params, loss_fn, self.costs, reduction, self._warn, fraction, compiled
            )
            # the model's pre-hook before the providers' hooks: the step (and what it asks of the per-sample
            # engine) is set up before the engine's own pre-hook reads the input
            hooks = [model.register_forward_pre_hook(SharedHook(self._on_model_forward), with_kwargs=True)]
            undo.callback(self._guard.each, hooks, "remove")
            self.providers = [cls(context) for cls in registered_providers()]
            #: the overhead budget (None without ``budget=``): its schedule narrows the instruments'
            self.budget = Budget(fraction, self._warn, self.costs) if fraction is not None else None
            if self.budget is not None:
                undo.callback(self.budget.attach(self.instruments))
            undo.callback(self._guard.each, self.providers, "close")
            for inst in self.instruments:
                inst.on_attach(self.network, optimizer)
            hooks += [
                model.register_forward_hook(SharedHook(self._on_model_output), with_kwargs=True),
                *(o.register_step_pre_hook(SharedHook(self._on_before_step)) for o in self._stepping),
                *(o.register_step_post_hook(SharedHook(self._on_after_step)) for o in self._stepping),
                BackwardWatch(SharedHook(self._on_backward_root)),
            ]
            if isinstance(loss_fn, nn.Module):
                hooks.append(loss_fn.register_forward_hook(SharedHook(self._on_loss), with_kwargs=True))
            run = RunContext(logdir=self.logdir, history=self.history, instruments=tuple(self.instruments))
            self.emitter = Emitter(self.history, [], self._warn)
            undo.callback(self.emitter.close)
            for sink in self.sinks:
                sink.open(run)
                self.emitter.sinks.append(sink)  # closed by the emitter from now on
            self.profiler = Profiler(trace_dir, None if profile is True else profile) if trace_dir else None
            undo.callback(self._close_profiler)
            self._fields = dict(params=self.params, loss_fn=loss_fn, logdir=self.logdir)
            #: trainable parameters the optimizer does not hold: said once if they get gradients (``_gradients_final``)
            self._others = attach.untracked(self.network, self.params)
            undo.callback(signals.release, signals.on_sigterm(self.close))  # SIGTERM closes the run first
            self._undo = undo.pop_all()

    # --- the public API --------------------------------------------------------------------------------
    def __enter__(self) -> Cockpit:
        self._check_open("with cockpit:")
        return self

    def _check_open(self, use: str) -> None:
        if self._closed:
            raise RuntimeError(
                f"{use} on a closed Cockpit: it has removed its hooks and closed its files. Create a new "
                "Cockpit to track another run (resume=True with the same logdir continues this one)"
            )

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def engine(self) -> Any:
        """The per-sample engine (held by the per-sample provider)."""
        return next(p.engine for p in self.providers if hasattr(p, "engine"))

    def close(self) -> None:
        """Let instruments write final records, then remove every hook and close every sink."""
        if self._closed:
            return
        self._finish_late()
        self._closed = True
        final: dict[Any, Any] = {}
        for inst in self.instruments:
            final.update(self._guard.instrument(inst, "on_close") or {})
        if self.budget is not None:
            final.update(self.budget.records())
        if final:
            self.emitter.emit(max(self.step - 1, 0), final)
        st, self._step = self._step, None  # a hook already on a tensor that fires later finds no step
        if st is not None:
            st.end()
        if self._parts is not None:
            self._parts.close()
        self._undo.close()

    def track(self, loader: Iterable, resolve_subsets: bool = False) -> Iterator:
        """Yield exactly the batches of ``loader`` while recording the dataset indices of each one
        (``record.indices``, e.g. for TracIn); see :func:`cockpit_lite.tracking.track`."""
        from cockpit_lite.tracking import track

        self._check_open("cockpit.track()")
        feed = next(p.feed for p in self.providers if hasattr(p, "feed"))
        return track(feed, loader, resolve_subsets=resolve_subsets)

    def verdicts(self) -> list[str]:
        """Plain-language statements from every instrument that makes them (e.g. the learning rate).
        Under an overhead budget, a verdict of an instrument the budget thins ends with the number of
        steps it rests on: "(from 37 of 1200 steps: the overhead budget ran <key> on these only)"."""
        self._finish_late()
        out = []
        for inst in self.instruments:
            said = self._guard.instrument(inst, "verdicts") or []
            thinned = self.budget.thinned(inst.key) if self.budget is not None else None
            if thinned is not None:
                ran, steps = thinned
                why = f"the overhead budget ran {inst.key} on these only"
                said = [f"{v} (from {ran} of {steps} steps: {why})" for v in said]
            out.extend(said)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The step count and every instrument's state (by key), to resume a run from a checkpoint; with
        ``budget=``, the budget's measurements and schedule (``"budget"``)."""
        self._finish_late()  # (overlap=True: the last step's records first, as its compute changes state)
        states = {i.key: i.state_dict() for i in self.instruments}
        state = {"version": 1, "step": self.step, "checks_left": self.engine.checks_left, "instruments": states}
        if self.budget is not None:
            state["budget"] = self.budget.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a run: the step count and the state of every instrument with the same key."""
        self._check_open("cockpit.load_state_dict()")
        if state.get("version") != 1:
            raise ValueError(f"not a cockpit state of version 1 (got {state.get('version')!r}): save it anew")
        self._finish_late()
        self.step = int(state["step"])
        self.engine.checks_left = int(state.get("checks_left", self.engine.checks_left))
        saved = state.get("instruments", {})
        for key in sorted(set(saved) - {i.key for i in self.instruments}):
            self._warn(f"the saved state of instrument {key!r} matches no instrument of this cockpit: ignored")
        for inst in self.instruments:
            if inst.key in saved:
                inst.load_state_dict(saved[inst.key])
            elif inst.state_dict():
                self._warn(f"no saved state for instrument {inst.key!r}: it starts afresh at step {self.step}")
        if self.budget is not None and state.get("budget") is not None:
            self.budget.load_state_dict(state["budget"])
        elif self.budget is not None:
            self._warn(f"no saved overhead budget in the state: it warms up afresh from step {self.step}")
        elif state.get("budget") is not None:
            self._warn("the state holds an overhead budget but this cockpit has none (budget=None): ignored")

    # --- for frameworks that call the model in parts (cockpit_lite.integrations) ------------------------
    def model_called(self, args: tuple, kwargs: Mapping[str, Any] | None = None) -> None:
        """A call of the model begins that its forward pre-hook does not see (a framework's training step
        calling the model's parts, or a call that began before this cockpit was built): ``args`` and
        ``kwargs`` are the call's inputs (the batch is axis 0 of the first tensor)."""
        self._check_open("cockpit.model_called()")
        self._on_model_forward(self.model, tuple(args), dict(kwargs or {}))

    def model_returned(self, args: tuple, kwargs: Mapping[str, Any] | None, output: Any) -> None:
        """The call announced by :meth:`model_called` returned ``output`` (backward is seen from it)."""
        self._check_open("cockpit.model_returned()")
        self._on_model_output(self.model, tuple(args), dict(kwargs or {}), output)

    @guarded
    def gradients_final(self) -> None:
        """``p.grad`` now holds what the optimizer will use: the step pre-hook's event, for a step whose
        pre-hooks ran before this cockpit was built, or a closure's. Never raises."""
        self._gradients_final()

    # --- plumbing --------------------------------------------------------------------------------------
    def _warn(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            warn(msg, stacklevel=4)

    def _close_profiler(self) -> None:
        if self.profiler is not None:
            self._guard.each([self.profiler], "close")

    def _begin(self) -> Step:
        # a CUDA model's costs are timed on its device timeline (profiling.py): followed each step, as
        # a model may be moved to the GPU after the cockpit was built (Lightning)
        self.costs.follow(self._first_param)
        changed = None
        if attach.trainable_state(self._held, self._groups) != self._trainable:
            changed = self._follow_params()
        gates = (self.budget.gates, self.budget.allowed) if self.budget is not None else None
        self._step = Step(self.step, self.instruments, self.providers, self._guard, gates, **self._fields)
        if changed and self._step.record is not None:
            self._step.record.add_note(changed, frozenset())
        return self._step

    def _no_forward(self) -> None:
        """The optimizer stepped with no forward of the model seen, twice (a cockpit built inside a step misses
        the first): the loop calls the model's parts. From then on each step's first call of a part holding
        trained parameters is the model's call (:class:`~cockpit_lite.parts.PartCalls`), said once; where no
        part holds them, a warning and a note record on disk say that nothing can be recorded."""
        self._unseen_steps += 1
        if self._unseen_steps != 2:
            return
        name = type(self.model).__name__
        parts = PartCalls(self.network, {id(p) for p in self.params.values()}, self)
        if len(parts.handles) > 1:  # (beside the root's own pre-hook)
            self._parts = parts
            self._warn(PARTS.format(model=name, step=self.step))
            return
        parts.close()
        self._warn(NO_FORWARD.format(model=name))
        self._emit(self.step, {"note/cockpit": NO_FORWARD.format(model=name)})

    def _look_at_trainable(self) -> None:
        """Keep every parameter the optimizers hold, frozen ones too, their ``param_groups`` lists and what
        decides which of them train, compared at each step's start (``_follow_params`` on a change)."""
        self._held = attach.held(self.network, self._stepping)
        self._groups = tuple(o.param_groups for o in self._stepping)
        self._trainable = attach.trainable_state(self._held, self._groups)

    def _follow_params(self) -> str | None:
        """The trainable parameters the optimizers hold changed since the last step (a frozen backbone
        unfrozen, a layer frozen, ``add_param_group``): the cockpit tracks the new set from this step on
        (``self.params`` changed in place: the providers and records share it; each provider is told).
        Returns what to say (also warned), or None where nothing trainable is left (the old set is kept)."""
        self._look_at_trainable()
        try:
            now = attach.check_model_optimizers(self.network, self._stepping)
        except ValueError:  # (every parameter frozen: nothing to follow; the steps say no gradient came)
            return None
        before = dict(self.params)
        if now.keys() == before.keys():
            return None
        self.params.clear()
        self.params.update(now)
        self._others = attach.untracked(self.network, self.params)
        self._guard.each(self.providers, "params_changed")
        added, removed = [n for n in now if n not in before], [n for n in before if n not in now]

        def listed(names: list[str]) -> str:
            return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

        parts = [f"{len(added)} start training ({listed(added)})"] if added else []
        parts += [f"{len(removed)} stopped ({listed(removed)})"] if removed else []
        said = (
            f"the parameters the optimizer trains changed: {'; '.join(parts)}. Every statistic follows the "
            f"{len(now)} trained tensors from that step on (Distance measures a tensor that starts training from "
            "its value then)"
        )
        self._warn(said)  # (once per change: a loop toggling the same tensors step by step is told twice)
        return said.replace("changed:", f"changed at step {self.step}:", 1).replace("from that step", "from this step")

    def _observe_budget(self, st: Step, cockpit_ms: float, wall_ms: float, hooks_ms: float) -> None:
        """Hand the budget the step's cost and wall time, both with the sinks' time for its records, and
        its hooks' own time."""
        assert self.budget is not None
        written = self.emitter.sinks_ms
        sinks_ms = written[1] if written is not None and written[0] == st.number else 0.0
        ran = [i.key for i in st.active if i.scheduled(st.number)]
        quiet = st.skip or not st.active
        self.budget.observe(st.number, cockpit_ms + sinks_ms, wall_ms + sinks_ms, ran, hooks_ms, quiet)

    # --- hooks: when things happen ---------------------------------------------------------------------
    @guarded
    def _on_model_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if is_paused() or module is not self.model or not torch.is_grad_enabled():  # not an evaluation
            return
        st = self._step
        skipped, moved = 0, False
        if st is not None and st.backward_done and zeroed_since(self.params, st.grad_marks):
            # backward ran, grads were zeroed, no step came: a retry (the loop or AMP skipped the step), unless
            # the parameters moved with no optimizer of the cockpit's stepping (SAM's ascent step: the step is
            # the passes from the perturbed point on)
            moved = not st.stepped and moved_since(st.grad_marks)
            if moved:
                self._warn(MOVED)
            skipped = st.skipped + st.abandoned_calls() + (0 if moved else 1)
            st.end()
            st = None
        if st is None:
            st = self._begin()
            st.skipped = skipped
            if moved and st.record is not None:
                st.record.perturbed = True
            read_loss_scale()  # (GradScaler's scale while the device is idle: none read at backward)
        self._forward_seen = True
        st.forwards.append(batch_of(args, kwargs))
        if st.active:
            st.event("on_forward", ModelCall(args, kwargs, st.forwards[-1], index=len(st.forwards) - 1))

    def _finish_late(self) -> None:
        """overlap=True: make and write the records of the step launched last (at the first of the next
        step's model output, end of backward, step; or at close). Never raises."""
        late, self._late = self._late, None
        if late is None:
            return
        st, skipped = late
        try:
            self._report(st, st.finish(), skipped)
        except Exception as e:
            self._warn(f"the records of step {st.number} failed ({type(e).__name__}: {e}); training is unaffected")

    def _report(self, st: Step, records: dict[Any, Any], skipped: int) -> None:
        """Write a completed step's records (with the budget's), and hand the budget its costs."""
        if skipped:
            records["skipped"] = skipped
        late = self.emitter.late_sink_cost()  # (the sinks' time of the last step written: kept if it was measured)
        if self._measured is not None and all(step == self._measured for step, _ in late):
            records.update(late)
        # the hooks' own time since the last step's records (this step's hooks so far, the last one's after its
        # records; docs/profiling.md)
        driver = self.costs.take_driver()
        measured = "cost/cockpit_ms" in records  # (a step the cost cadence measured: Costs.measures)
        self._measured = st.number if measured else None
        step_ms = records.get("cost/step_ms")
        if measured:
            records["cost/driver_ms"] = driver
            if step_ms:
                records["cost/driver_share"] = driver / step_ms
        if self.budget is not None:
            records.update(self.budget.records())
        self._emit(st.number, records)
        if self.budget is not None:
            self._observe_budget(st, records["cost/cockpit_ms"], records["cost/step_ms"], driver)

    def _emit(self, step: int, records: dict[Any, Any]) -> None:
        """Hand records to the emitter; the sinks' time (``cost/sinks_ms``, reported on its own) is no part
        of the hook's ``cost/driver_ms``."""
        self.emitter.emit(step, records)
        written = self.emitter.sinks_ms
        if written is not None:
            self.costs.timed_ms += written[1]

    @guarded
    def _on_model_output(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._late is not None and module is self.model and not is_paused():
            self._finish_late()  # the next step's forward is on the device: the host's work overlaps it
        st = self._step
        if st is None or is_paused() or module is not self.model or st.skip or not st.forwards:
            return
        index = len(st.forwards) - 1
        if not st.active:  # only whether backward reaches it (an abandoned iteration is counted as skipped)
            for t in tensors_of(output):
                if t.requires_grad:
                    on_gradient(t, functools.partial(Step.reach, st, index))
            return
        st.event("on_output", ModelCall(args, kwargs, st.forwards[-1], output, index))
        for t in tensors_of(output):  # backward is seen where it reaches the model's outputs
            if t.requires_grad:
                on_gradient(t, functools.partial(self._on_output_grad, index))
                st.hooked.append(weakref.ref(t))
                st.hooked_call = index
                mark_output(t, index)

    @guarded
    def _on_loss(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if is_paused() or module is not self.loss_fn:
            return
        if self._step is None and self._forward_seen:
            # between an optimizer step and the model's next forward, in a loop whose steps begin with the
            # model's forward: another network's loss (a GAN's discriminator after the generator's step)
            return
        st = self._step or self._begin()
        if st.skip or not st.active or not torch.is_tensor(output) or not output.requires_grad:
            return  # nothing tracked, or an evaluation under no_grad
        with self.costs.region("loss"):
            pred = args[0] if args else None  # (by keyword: hooked, as a dead reference is None too)
            # on a model output with a hook: its backward reaches that hook, which tells it (one hook less)
            on_output = pred is not None and any(ref() is pred for ref in st.hooked)
            # else, where the model call's outputs carry hooks, they tell whether the loss's backward reaches
            # the model (a GAN's discriminator loss on a detached sample does not): the provider marks the call
            told = not on_output and bool(st.forwards) and st.hooked_call == len(st.forwards) - 1
            rows = selected_rows(getattr(pred, "grad_fn", None), st.hooked_call) if told else None
            st.event("on_loss", LossCall(module, args, kwargs, output, None if told else True, rows))
            if not on_output and not told:  # (the model's outputs carry no hook: the loss's tells backward)
                on_gradient(output, functools.partial(self._on_output_grad, None))

    @guarded
    def _on_backward_root(self, tensors: Any, grad_tensors: Any) -> None:
        """``backward()`` is called: a backward pass of the step begins (before any gradient hook)."""
        st = self._step
        if st is None or is_paused() or not st.active or st.skip:
            return
        if type(tensors) is torch.Tensor and grad_tensors is None:  # loss.backward(): no sequences to walk
            scale = grad_scaler_factor(tensors)
            st.amp_scale = 1.0 if scale is None else scale
            root = BackwardRoot((tensors.detach(),), (None,), st.amp_scale, (tensors.grad_fn,))
        else:
            roots = (tensors,) if torch.is_tensor(tensors) else tuple(tensors)
            grads = (grad_tensors,) if grad_tensors is None or torch.is_tensor(grad_tensors) else tuple(grad_tensors)
            st.amp_scale = next((f for f in map(grad_scaler_factor, roots) if f is not None), 1.0)
            detach = lambda t: t.detach() if torch.is_tensor(t) else t  # noqa: E731
            nodes = tuple(getattr(t, "grad_fn", None) for t in roots)
            root = BackwardRoot(tuple(map(detach, roots)), tuple(map(detach, grads)), st.amp_scale, nodes)
        st.event("on_backward_root", root)
        self._begin_backward(st)

    def _begin_backward(self, st: Step) -> None:
        st.in_backward, st.queued = True, False
        st.record.backward_scale = st.amp_scale
        st.event("on_backward_begin")

    def _on_output_grad(self, index: int | None, grad: torch.Tensor) -> None:
        """Backward reached an output of model call ``index`` (None: the loss module's): queue the
        end-of-backward callback (and, for a backward not started by ``backward()``, begin it here)."""
        st = self._step
        if st is None or not st.active or st.skip or is_paused():
            return
        if index is not None:
            st.reach(index)
            st.record.reached = st.record.reached | {index}
        try:
            if not st.in_backward:
                st.amp_scale = 1.0
                self._begin_backward(st)
            if not st.queued:
                st.queued = True
                queue_backward_callback(self._on_backward_end)
        except Exception as e:
            self._warn(f"backward_begin failed ({type(e).__name__}: {e}); training is unaffected")

    @guarded
    def _on_backward_end(self, after_reducer: bool = False) -> None:
        if self._late is not None and not is_paused():
            self._finish_late()
        st = self._step
        if st is not None and st.active:
            if not after_reducer and world_size() > 1:  # DDP averages p.grad in a callback queued during backward
                queue_backward_callback(functools.partial(self._on_backward_end, True))
                return
            st.backward_done, st.in_backward, st.queued = True, False, False
            if self._parts is not None:
                self._parts.arm()  # (a next micro-batch's first call of a part is its model call)
            st.grad_marks = grad_marks(self.params)  # (a later forward tells a retry from accumulation by them)
            self.costs.call("after_backward", st.event, "on_backward_end")

    @guarded
    def _on_before_step(self, optimizer: Any, args: tuple, kwargs: dict) -> Any:
        if is_paused() or id(optimizer) not in self._stepping_ids:
            return None
        st = self._step
        if st is not None and st.stepped:  # (several optimizers: the gradients were final at the first one's step)
            return None
        if kwargs.get("closure") is not None:
            return args, {**kwargs, "closure": self._wrap_closure(kwargs["closure"])}
        if len(args) > 1 and callable(args[1]):  # step(closure): the closure's forward and backward follow
            return (args[0], self._wrap_closure(args[1]), *args[2:]), kwargs
        self._gradients_final()
        return None

    def _gradients_final(self) -> None:
        self._finish_late()
        if self._others and self._step is not None and self._step.record is not None:
            self._say_others(self._step.record)
        if self._step is not None and self._step.active and not self._step.skip:
            self.costs.call("before_step", self._step.event, "on_before_step")

    def _say_others(self, record: Any) -> None:
        """Parameters the optimizer does not hold got gradients (another optimizer steps them): said once, with a
        note on this step's records (every instrument's: the note concerns no need in particular)."""
        names = [n for n, p in self._others if p.grad is not None]
        if names:
            self._others = []
            msg = attach.untracked_note(names, len(self.params))
            self._warn(msg)
            record.add_note(msg, frozenset())

    def _wrap_closure(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        """``optimizer.step(closure)`` (Lightning's automatic optimization, LBFGS): see
        :func:`cockpit_lite.model_io.step_closure`."""
        return step_closure(closure, self.gradients_final)

    @guarded
    def _on_after_step(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        st = self._step
        if not self._forward_seen and self._parts is None and not is_paused() and id(optimizer) in self._stepping_ids:
            self._no_forward()
        if self._parts is not None:
            self._parts.arm()  # (the next step's first call of a part is its model call)
        if st is None or is_paused() or id(optimizer) not in self._stepping_ids:
            if st is None and not is_paused() and id(optimizer) == id(self._stepping[-1]):
                self.step += 1  # (a step no record was begun for: steps count the optimizer's steps)
            return
        if len(self._stepping) > 1:  # several optimizers: the step ends when the last of them has stepped
            st.stepped.add(id(optimizer))
            if len(st.stepped) < len(self._stepping):
                return
        self._finish_late()
        self._step = None
        self.step += 1
        try:
            skipped = st.skipped + st.abandoned_calls()
            if not st.skip and st.active:
                if self.overlap:
                    st.launch()  # the records are made during the next step (_finish_late)
                    self._late = (st, skipped)
                else:
                    self._report(st, st.complete(), skipped)
            else:
                extra = {"skipped": skipped} if skipped else {}
                if self.budget is not None and (extra or self.budget.waiting()):
                    extra.update(self.budget.records())
                if extra:
                    self._emit(st.number, extra)
                driver = self.costs.take_driver()  # (an untracked step's hooks: not in the next step's records)
                if self.budget is not None:
                    self._observe_budget(st, self.costs.total(), st.elapsed_ms(), driver)
        finally:
            st.end()
            if self.profiler is not None:
                try:
                    t0 = time.perf_counter()
                    self.profiler.step()  # (torch.profiler's own work, traces written: no part of cost/driver_ms)
                    self.costs.timed_ms += (time.perf_counter() - t0) * 1e3
                except Exception as e:
                    self._warn(f"torch.profiler failed ({e}); profiling stops, training goes on")
                    self.profiler = None
