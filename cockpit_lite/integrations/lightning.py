"""Lightning: the Cockpit as one callback of ``lightning.Trainer``.

    from cockpit_lite.integrations.lightning import CockpitCallback
    trainer = L.Trainer(max_steps=1000, callbacks=[CockpitCallback(instruments="economy", logdir="runs/pl")])

What the callback does, by Lightning hook (docs/integrations.md, "Lightning"):

    setup("fit")          the train dataloader is tapped when the Trainer prepares it
                          (``Strategy.process_dataloader``, before its iterator exists): each batch's
                          dataset indices are recorded without changing a batch (TracIn)
    load_state_dict       a checkpoint's cockpit state is kept until the Cockpit exists
    on_train_start        (optimizers exist, a checkpoint is restored) the first forward is awaited
    first forward         the Cockpit is built on the module training_step calls (below) and the
                          Trainer's optimizer; the saved state is loaded
    on_train_batch_start  the batch's dataset indices go to the Cockpit
    on_train_end          final records (verdicts) are written, the Cockpit closes, verdicts are printed
    on_exception/teardown the Cockpit closes, the dataloader gets its own sampler back

Automatic optimization (``optimizer.step(closure)``, with ``accumulate_grad_batches`` and
``gradient_clip_val``) and manual optimization (``self.manual_backward``, ``opt.step()``) are what the
Cockpit's hooks see in any loop: Lightning's closure is tracked by the core, clipping happens between
backward and the optimizer's step pre-hook and so shows as the received norm (``clip/global/received_norm``
against ``clip/global/norm``), micro-batches before a step are one step over all their examples.
Lightning's own logger is not touched: the cockpit writes its own ``logdir``.

The module: the LightningModule if ``training_step`` calls ``self(x)``; the submodule it calls if that
one holds every trained parameter (``self.model(x)``); otherwise (``self.encoder(x)``, then
``self.head(h)``) the LightningModule, with each batch's first submodule call handed to the Cockpit as
the LightningModule's call (see :class:`_Attach`).
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from cockpit_lite import attach
from cockpit_lite.cockpit import Cockpit
from cockpit_lite.errors import warn
from cockpit_lite.hooks import SharedHook
from cockpit_lite.instrument import Instrument
from cockpit_lite.model_io import step_closure
from cockpit_lite.needs import Need
from cockpit_lite.parts import PartCalls
from cockpit_lite.pause import is_paused
from cockpit_lite.persample.coupled import coupling_modules
from cockpit_lite.records import History
from cockpit_lite.sinks.base import Sink
from cockpit_lite.sinks.jsonl import FILENAME
from cockpit_lite.tracking import LoaderTap
from cockpit_lite.unwrap import unwrap_optimizer

STATE_VERSION = 1


def _guarded(fn: Callable) -> Callable:
    """Callback hooks after the Cockpit exists: a failure is one warning, never the Trainer's."""

    @functools.wraps(fn)
    def wrapper(self: CockpitCallback, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except Exception as e:
            self._warn(f"CockpitCallback.{fn.__name__} failed ({type(e).__name__}: {e}); training is unaffected")
            return None

    return wrapper


def expect_accumulation(cockpit: Cockpit, batches: int) -> None:
    """Lightning steps the optimizer once every ``batches`` batches (``accumulate_grad_batches``): say
    so to the per-sample engine before the first step, so that the first step's micro-batches are
    joined too (:meth:`~cockpit_lite.persample.engine.PerSampleEngine.expect_accumulation`)."""
    if batches > 1:
        cockpit.engine.expect_accumulation()


class _Attach(PartCalls):
    """Finds the module ``training_step`` calls, at the first forward of training, and hands the Cockpit
    the calls its own hooks cannot see.

    Armed at the start of each training batch (and after each backward), it waits for the batch's first
    grad-enabled forward of the LightningModule or of a submodule holding trainable parameters. At the
    first such call of the run the Cockpit is built (``build(module)``) on

    - the LightningModule, if ``training_step`` calls it (``self(x)``);
    - the submodule called, if it holds every trained parameter (``self.model(x)``): its forward is the
      one the per-sample engine replays (train-mode BatchNorm) and TracIn probes go through;
    - else (``self.encoder(x)`` then ``self.head(h)``) the LightningModule, and in every batch the first
      such call's inputs and outputs are handed to the Cockpit's model hooks as the LightningModule's
      (:class:`~cockpit_lite.parts.PartCalls`): the step begins with that batch, and backward is seen where
      it reaches that call's outputs.

    In the first two cases the Cockpit's own hooks see every later call and this object removes its
    hooks once the Cockpit has the first call.
    """

    def __init__(self, root: nn.Module, trained: set[int], build: Callable[[nn.Module], Cockpit]):
        super().__init__(root, trained)
        self.build = build
        self._first = False  #: the call being taken is the one the Cockpit was built at

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.cockpit is None and self.armed and not is_paused() and torch.is_grad_enabled():
            holds_all = self.trained <= {id(p) for p in module.parameters()}
            # a configuration error raises here, as Cockpit(...) does
            self.cockpit = self.build(module if module is self.root or holds_all else self.root)
            self._first = True
        super()._pre(module, args, kwargs)

    def _take(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        first, self._first = self._first, False
        if first and self.cockpit.model is module:
            # the Cockpit's forward pre-hook was registered after this call began: give it the call; its
            # forward hook, registered before the call returns, sees the output
            self.cockpit.model_called(args, kwargs)
            self.close()
            return
        super()._take(module, args, kwargs)
        coupling = coupling_modules(self.root) if first and module is not self.root else []
        if coupling:
            warn(
                f"training_step calls parts of the LightningModule ({type(module).__name__} first), neither the "
                "module itself nor one submodule holding every trained parameter; its train-mode BatchNorm "
                f"layers ({', '.join(coupling)}) couple the examples, and their per-sample statistics need the "
                "whole forward as one call to replay: call self(x) (with forward computing what training_step "
                "does) or one submodule holding all the layers",
                stacklevel=5,
            )


class CockpitCallback(Callback):
    """Track a Lightning ``Trainer.fit`` with a :class:`~cockpit_lite.Cockpit`.

    Args:
        instruments: a preset name (``"economy"``, ``"minimal"``, ``"full"``) or a list of instruments,
            as for ``Cockpit``. ``TracIn`` gets the dataset indices from the Trainer's train dataloader.
        logdir: where the run is written (``cockpit.jsonl``, TensorBoard by default), beside whatever
            Lightning's logger writes.
        sinks, loss_fn, reduction, profile: passed to ``Cockpit``.
        resolve_subsets: dataset indices beneath ``torch.utils.data.Subset`` wrappers of the train
            dataset (as for ``cockpit.track``).
        clipping: when the Trainer clips by norm (``gradient_clip_val``) and no ``Clipping`` instrument
            is given, add ``Clipping(max_norm=gradient_clip_val, kinds="global")`` (one pass over the
            gradients): the norm before clipping, the norm received, whether the step was clipped.
        overlap: make each step's records during the next step (``Cockpit(..., overlap=True)``): on a GPU
            the device never waits for the cockpit; records arrive one step later, the last at the end of
            training.

    The Cockpit tracks the LightningModule's parameters that the Trainer's first optimizer holds (with
    several optimizers, the first; a warning says so: a GAN with ``[g_opt, d_opt]`` is watched at its
    generator, the discriminator's losses and backward passes left out of the generator's steps). Its
    state (step count, every instrument's state) is saved in Lightning checkpoints and restored by
    ``trainer.fit(..., ckpt_path=...)``; records the interrupted run wrote after the checkpoint are cut
    from ``cockpit.jsonl``, so no step appears twice.

    After training: ``callback.cockpit`` (closed; ``.history``), ``callback.history``,
    ``callback.verdicts`` (also written into the run as ``verdict/...`` and printed).
    """

    def __init__(
        self,
        instruments: str | Iterable[Instrument | str] = "economy",
        logdir: str | os.PathLike | None = None,
        sinks: Sequence[Sink] | None = None,
        loss_fn: nn.Module | Callable[..., torch.Tensor] | None = None,
        reduction: str = "mean",
        profile: bool | Callable[[int], Any] = False,
        resolve_subsets: bool = False,
        clipping: bool = True,
        overlap: bool = False,
    ):
        if not isinstance(instruments, str):
            instruments = list(instruments)
        attach.instruments_of(instruments)  # an unknown name fails here, not at the start of training
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r}: say 'mean' (p.grad = mean_i g_i) or 'sum'")
        self.instruments, self.sinks, self.loss_fn = instruments, sinks, loss_fn
        self.logdir = os.fspath(logdir) if logdir is not None else None
        self.reduction, self.profile, self.resolve_subsets = reduction, profile, resolve_subsets
        self.clipping, self.overlap = clipping, overlap
        #: the Cockpit of the current (or last) fit; closed once training ends
        self.cockpit: Cockpit | None = None
        #: the instruments' verdicts at the end of training
        self.verdicts: list[str] = []
        self._open = False
        self._attach: _Attach | None = None
        self._first_step: Any = None  # the optimizer's step pre-hook until the Cockpit exists
        self._pending: tuple[Any, int | None] | None = None  # indices of a batch before the Cockpit exists
        self._why_no_indices: str | None = None
        self._saved: dict[str, Any] | None = None  # from a checkpoint, until the Cockpit exists
        self._final: dict[str, Any] | None = None  # the state when the Cockpit closed
        self._taps: dict[int, LoaderTap] = {}
        self._restore_loaders: Callable[[], None] | None = None
        self._warned: set[str] = set()

    # --- public --------------------------------------------------------------------------------------
    @property
    def history(self) -> History | None:
        """The records of the current (or last) fit, as ``cockpit.history``."""
        return self.cockpit.history if self.cockpit is not None else None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(logdir=self.logdir)

    def state_dict(self) -> dict[str, Any]:
        """``{"version", "cockpit": Cockpit.state_dict(), "logdir", "run_dir", "jsonl_bytes"}``: the
        Cockpit's state, the ``logdir`` given, the run directory it wrote (``<logdir>-2`` where
        ``logdir`` held a run) and how long its ``cockpit.jsonl`` was (to cut what a resumed run writes
        again). Plain values and tensors: ``torch.load(weights_only=True)`` reads it."""
        if self._open and self.cockpit is not None:
            return self._state(self.cockpit)
        return self._final or self._saved or {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(
                f"the checkpoint's CockpitCallback state has version {state_dict.get('version')!r}, not "
                f"{STATE_VERSION}: remove it from checkpoint['callbacks'] to resume with the cockpit started afresh"
            )
        self._saved = dict(state_dict)

    # --- Lightning hooks -----------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and self._restore_loaders is None:
            self._wrap_process_dataloader(trainer)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = trainer.optimizers
        if not optimizers:
            raise ValueError("CockpitCallback: the Trainer has no optimizer (configure_optimizers returned none)")
        if len(optimizers) > 1:
            self._warn(
                f"{len(optimizers)} optimizers: the cockpit tracks the first ({type(optimizers[0]).__name__}) and "
                "the parameters it holds (a GAN: list the generator's optimizer first to watch the generator); the "
                "others' losses are no part of its steps (a backward that does not reach the tracked module's outputs "
                "is another network's)"
            )
        optimizer = unwrap_optimizer(optimizers[0])
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        trained = {id(p) for p in pl_module.parameters() if p.requires_grad and id(p) in held}
        if not trained:
            raise ValueError(
                "CockpitCallback: the Trainer's first optimizer holds none of the LightningModule's trainable "
                "parameters: build it in configure_optimizers from self.parameters()"
            )
        self.cockpit, self._open, self._final, self._pending = None, False, None, None
        iterates = "dataloader_iter" in inspect.signature(pl_module.training_step).parameters
        self._why_no_indices = "training_step(dataloader_iter) fetches its own batches" if iterates else None
        self._attach = _Attach(pl_module, trained, functools.partial(self._build, trainer))
        self._first_step = optimizer.register_step_pre_hook(SharedHook(self._before_first_step))

    def _before_first_step(self, optimizer: Any, args: tuple, kwargs: dict) -> Any:
        """``optimizer.step(closure)`` before the Cockpit exists (automatic optimization without
        accumulation): the Cockpit is built by the forward inside the closure, after the step's
        pre-hooks ran, so its own pre-hook cannot see that ``p.grad`` is final; wrapped here as the
        Cockpit wraps closures (:func:`cockpit_lite.model_io.step_closure`)."""
        if self.cockpit is not None or is_paused():
            return None
        closure = kwargs.get("closure")
        if closure is not None:
            return args, {**kwargs, "closure": step_closure(closure, self._gradients_final)}
        if len(args) > 1 and callable(args[1]):
            return (args[0], step_closure(args[1], self._gradients_final), *args[2:]), kwargs
        return None

    def _gradients_final(self) -> None:
        if self._open:
            try:
                self.cockpit.gradients_final()  # the step pre-hook's event, which the new Cockpit missed
            except Exception as e:
                self._warn(f"before_step failed ({type(e).__name__}: {e}); training is unaffected")

    def _build(self, trainer: Any, model: nn.Module) -> Cockpit:
        """The Cockpit, on ``model`` (the module training_step calls), at the first forward of training.
        Resuming from a checkpoint with the same ``logdir``, it continues the checkpoint's run directory
        (``resume=True``; also where that run had gone to ``<logdir>-2``), cut back to the checkpoint;
        otherwise a ``logdir`` that holds a run gets a new run directory beside it (``Cockpit``'s rule)."""
        saved, self._saved = self._saved, None
        run = self._resumed_run(saved) if saved is not None else None
        if run is not None and trainer.is_global_zero:
            self._cut_log(run, saved.get("jsonl_bytes"))
        cockpit = Cockpit(
            model,
            trainer.optimizers[0],
            self.loss_fn,
            instruments=self._instruments(trainer),
            logdir=run if run is not None else self.logdir,
            sinks=self.sinks,
            profile=self.profile,
            reduction=self.reduction,
            resume=run is not None,
            overlap=self.overlap,
        )
        try:
            if saved is not None:
                cockpit.load_state_dict(saved["cockpit"])
            else:
                cockpit.step = trainer.global_step  # steps are numbered as Lightning numbers them
            expect_accumulation(cockpit, trainer.accumulate_grad_batches)  # the one declaration site
        except BaseException:
            cockpit.close()
            raise
        self.cockpit, self._open = cockpit, True
        if self._first_step is not None:  # built inside a step's closure: that hook's wrapper stays on
            self._first_step.remove()
            self._first_step = None
        if self._pending is not None:
            self._feed(*self._pending)  # the indices of the batch whose forward builds the Cockpit
            self._pending = None
        return cockpit

    @_guarded
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._attach is None:
            return
        idx, size = self._indices(trainer)
        if self._open:
            self._feed(idx, size)
        else:
            self._pending = (idx, size)
        self._attach.arm()

    @_guarded
    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        if self._attach is not None:
            self._attach.arm()  # a loop with another forward/backward in the same batch: its next first call

    @_guarded
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._attach is not None:
            self._attach.disarm()

    @_guarded
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish()
        for v in self.verdicts:
            rank_zero_info(f"cockpit-lite: {v}")

    @_guarded
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._finish()
        self._release_loaders()

    @_guarded
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._finish()
        self._release_loaders()

    # --- plumbing ------------------------------------------------------------------------------------
    def _warn(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            warn(msg, stacklevel=4)

    def _state(self, cockpit: Cockpit) -> dict[str, Any]:
        """The Cockpit's state, the ``logdir`` given, the run directory written and its JSON lines' length."""
        run = os.path.abspath(cockpit.logdir) if cockpit.logdir is not None else None
        path = os.path.join(run, FILENAME) if run is not None else None
        return {
            "version": STATE_VERSION,
            "cockpit": cockpit.state_dict(),
            "logdir": os.path.abspath(self.logdir) if self.logdir is not None else None,
            "run_dir": run,
            "jsonl_bytes": os.path.getsize(path) if path is not None and os.path.exists(path) else None,
        }

    def _instruments(self, trainer: Any) -> list[Instrument]:
        instruments = attach.instruments_of(self.instruments)
        clip, algorithm = trainer.gradient_clip_val, trainer.gradient_clip_algorithm
        if self.clipping and clip and clip > 0 and algorithm in (None, "norm"):
            from cockpit_lite.instruments.clipping import Clipping  # the core imports no concrete instrument

            if not any(isinstance(i, Clipping) for i in instruments):
                instruments.append(Clipping(max_norm=float(clip), kinds="global"))
        return instruments

    def _resumed_run(self, saved: Mapping[str, Any]) -> str | None:
        """The checkpoint's run directory, if this callback writes to the same ``logdir`` and it exists."""
        run = saved.get("run_dir")
        if self.logdir is None or run is None or not os.path.isdir(run):
            return None
        return run if saved.get("logdir") == os.path.abspath(self.logdir) else None

    @staticmethod
    def _cut_log(run: str, size: int | None) -> None:
        """Resuming: the lines the interrupted run wrote after the checkpoint (steps that are run again,
        its close records) are cut from ``cockpit.jsonl``."""
        path = os.path.join(run, FILENAME)
        if size is not None and os.path.exists(path) and os.path.getsize(path) > size:
            os.truncate(path, size)

    def _finish(self) -> None:
        if self._first_step is not None:
            self._first_step.remove()
            self._first_step = None
        if self._attach is not None:
            self._attach.close()
            self._attach = None
        if not self._open:
            return
        self._open = False
        cockpit = self.cockpit
        self._final = self._state(cockpit)  # before close: close writes the final records
        cockpit.close()
        self.verdicts = cockpit.verdicts()

    def _wrap_process_dataloader(self, trainer: Any) -> None:
        """Tap the train dataloader(s) as the Trainer prepares them: ``Strategy.process_dataloader`` is
        the last step before Lightning builds the first epoch's iterator (before ``on_train_start``)."""
        strategy = trainer.strategy
        had, before = "process_dataloader" in vars(strategy), vars(strategy).get("process_dataloader")
        inner = strategy.process_dataloader

        def process_dataloader(dataloader: object) -> object:
            out = inner(dataloader)
            if trainer.training:  # not the validation loaders
                try:
                    if id(out) not in self._taps:
                        self._taps[id(out)] = LoaderTap(out, resolve_subsets=self.resolve_subsets)
                except Exception as e:
                    self._warn(f"the train dataloader could not be tapped for dataset indices ({e})")
            return out

        strategy.process_dataloader = process_dataloader

        def restore() -> None:
            if vars(strategy).get("process_dataloader") is process_dataloader:
                if had:
                    strategy.process_dataloader = before
                else:
                    del strategy.process_dataloader

        self._restore_loaders = restore

    def _release_loaders(self) -> None:
        for tap in self._taps.values():
            tap.close()
        self._taps.clear()
        if self._restore_loaders is not None:
            self._restore_loaders()
            self._restore_loaders = None

    def _indices(self, trainer: Any) -> tuple[Any, int | None]:
        """The next train batch's dataset indices (None if unknown) and the dataset's size."""
        if self._why_no_indices is not None:
            return None, None
        loader = trainer.train_dataloader
        tap = self._taps.get(id(loader)) if loader is not None else None
        if tap is None:
            why = "several train dataloaders" if isinstance(loader, (Mapping, Sequence)) else "it was not tapped"
            idx, size = None, None
        else:
            why = tap.why
            idx, size = tap.next_batch()
        if idx is None and why is not None:
            self._why_no_indices = why
        return idx, size

    def _feed(self, idx: Any, size: int | None) -> None:
        if idx is None and self._why_no_indices is not None and self._wants_indices():
            why = self._why_no_indices
            self._warn(f"no dataset indices for the Trainer's train dataloader ({why}): TracIn skips its steps")
        feed = next(p.feed for p in self.cockpit.providers if hasattr(p, "feed"))
        feed(idx, size)

    def _wants_indices(self) -> bool:
        cockpit = self.cockpit
        for inst in cockpit.instruments:
            try:
                needs = inst.requires(cockpit.step)
            except Exception:
                continue
            if needs is not None and Need.INDICES in needs.names():
                return True
        return False
