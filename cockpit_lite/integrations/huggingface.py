"""Hugging Face ``transformers.Trainer``: a cockpit attached by one callback.

    from cockpit_lite.integrations.huggingface import CockpitCallback

    callback = CockpitCallback(instruments="economy", logdir="runs/hf")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
    trainer.train()
    callback.cockpit.history["loss"]    # also cockpit_lite.load("runs/hf")

What the callback does at each point of the Trainer's loop (``Trainer._inner_training_loop``):

- ``on_train_begin``: the model and the (accelerate-wrapped) optimizer exist; a :class:`~cockpit_lite.Cockpit`
  is attached to them (``AcceleratedOptimizer`` is unwrapped by the core). No ``loss_fn``: the cockpit
  follows the model, whose own loss (``out.loss``, normalised by ``num_items_in_batch`` under gradient
  accumulation) is the tensor backward starts from; per-sample losses are derived from the logits and
  labels where they reproduce it. With ``gradient_accumulation_steps = k`` the k micro-batches of an
  optimizer step are one cockpit step of all their examples (a sample is a sequence; g_i = N x its share
  of ``p.grad``, N the step's sequences). The Trainer's ``max_grad_norm`` clipping runs between backward
  and ``optimizer.step()``: the cockpit sees it as received-norm clipping (``clip/global/norm`` is the
  norm the Trainer logs as ``grad_norm``, ``grad_norm`` the clipped one the optimizer gets). Learning
  rates are read from the optimizer's parameter groups in its step pre-hook, i.e. the scheduler's value
  for that step (the ``learning_rate`` the Trainer logs).
- Dataset indices (TracIn): the index sampler of the Trainer's training ``DataLoader`` (inside
  accelerate's ``DataLoaderShard``) is wrapped in a recorder for the run, so every index list it yields is
  kept in order; each micro-batch the Trainer trains on (``on_step_begin`` for the first of an optimizer
  step, ``on_substep_end`` before each further one) takes the next list. The batches are unchanged (the
  sampler is iterated exactly as before). Resuming skips the batches the Trainer skips.
- ``on_log``: verdicts the cockpit records (``verdict/...``) are added to the Trainer's log under
  ``cockpit/verdict/...``, and with the Trainer's closing log of ``train()`` every instrument's current
  verdicts under ``cockpit/verdicts``; both reach ``trainer.state.log_history`` (and so
  ``trainer_state.json``) and the callbacks after this one (the progress bar's printout).
- ``on_save``: the cockpit's ``state_dict()`` is saved as ``cockpit_state.pt`` in the checkpoint folder;
  its step count also goes into ``trainer_state.json`` (``ExportableState``). ``train(resume_from_checkpoint=...)``
  loads both, so the step count, Alpha's pending step, TracIn's sums etc. continue.
- ``on_train_end``: the cockpit is closed (final records, e.g. TracIn's) and the sampler restored.
"""

from __future__ import annotations

import functools
import json
import os
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from cockpit_lite.attach import instruments_of
from cockpit_lite.cockpit import Cockpit
from cockpit_lite.errors import warn
from cockpit_lite.instrument import Instrument
from cockpit_lite.sinks.base import Sink
from cockpit_lite.sinks.jsonl import FILENAME as JSONL_FILENAME
from cockpit_lite.tracking import LoaderTap, sampling_loader

#: the file in each checkpoint folder that holds the cockpit's state_dict()
STATE_FILE = "cockpit_state.pt"


class TrainerIndices(LoaderTap):
    """The dataset indices of the batches the Trainer's training loader yields, in order.

    A :class:`~cockpit_lite.tracking.LoaderTap` on the torch DataLoader inside accelerate's adapters,
    open for the run (:meth:`restore` closes it), with one queue for the epoch: iterators built later (one
    per epoch, a persistent worker iterator's reset, accelerate's ``skip_first_batches`` on resume, which
    wraps the recorder) record what they draw. The Trainer trains on the batches in the order they were
    drawn; :meth:`next_batch` hands the next list to ``feed`` before each micro-batch.
    """

    def __init__(self, loader: Any, feed: Callable[[np.ndarray | None, int | None], None], resolve_subsets: bool):
        self.feed, self.skip = feed, 0
        super().__init__(sampling_loader(loader), resolve_subsets, fresh_each_pass=False)
        if self.why is not None:
            self.why = f"the Trainer's training loader: {self.why}"

    def new_epoch(self, skip: int = 0) -> None:
        """A new epoch's iterator is about to be built; its first ``skip`` index lists are never trained on."""
        self.queue.clear()
        self.skip = skip

    def next_batch(self) -> None:  # type: ignore[override]
        """The Trainer is about to train on its next micro-batch: feed that batch's dataset indices."""
        while self.skip and self.queue:
            self.queue.popleft()
            self.skip -= 1
        self.feed(*(super().next_batch() if not self.skip else (None, None)))

    def restore(self) -> None:
        self.close()


def _never_raises(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` (a function of the callback) that warns instead of raising: nothing the cockpit does may
    stop training."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as e:
            self._warn(f"the Trainer callback's {method.__name__} failed ({type(e).__name__}: {e}); training goes on")
            return None

    return wrapper


def _size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def _json_able(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in kwargs.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[k] = v
    return out


class CockpitCallback(TrainerCallback, ExportableState):
    """Track a ``transformers.Trainer`` run with a cockpit (module docstring: what is seen where).

    Args:
        instruments: a preset name (``"economy"``, ``"minimal"``, ``"full"``) or a list of instruments or
            registered names, as for :class:`~cockpit_lite.Cockpit`.
        logdir: the cockpit's run directory (``logdir/cockpit.jsonl``, TensorBoard by default).
        sinks, profile, loss_fn, reduction: passed to :class:`~cockpit_lite.Cockpit`. Without ``loss_fn`` the
            model's own loss is followed (the usual case: Hugging Face heads given ``labels``).
        clipping: when the Trainer clips (``max_grad_norm > 0``) and no ``Clipping`` instrument is given,
            add ``Clipping(max_norm=args.max_grad_norm, kinds="global")`` (one pass over the gradients):
            ``clip/global/{norm,received_norm,received_ratio,coef,would_clip,frac_clipped}``.
        log_verdicts: add the cockpit's verdicts to the Trainer's log (``on_log``).
        resolve_subsets: dataset indices beneath ``torch.utils.data.Subset`` wrappers (as for ``track``).
        overlap: make each step's records during the next step (``Cockpit(..., overlap=True)``): on a GPU
            the device never waits for the cockpit; records arrive one step later, the last at the end of
            training.

    After ``on_train_begin``, :attr:`cockpit` is the attached Cockpit (it stays readable after training:
    ``callback.cockpit.history``).
    """

    #: weak references to the instances user code built, newest last (see :meth:`__new__`)
    _built: ClassVar[list[weakref.ref]] = []

    def __new__(cls, *args: Any, _restored: bool = False, **kwargs: Any) -> CockpitCallback:
        # With TrainingArguments(restore_callback_states_from_checkpoint=True) the Trainer replaces each
        # callback by type(callback)(**saved_args). Instruments are objects, not JSON: the saved args carry
        # _restored=True, and the instance the user built last (the one being replaced) is returned, so
        # the user's instruments and reference stay valid.
        if _restored:
            live = next((inst for ref in reversed(cls._built) if (inst := ref()) is not None), None)
            if live is not None:
                return live
        return super().__new__(cls)

    def __init__(
        self,
        instruments: str | Iterable[Instrument | str] = "economy",
        logdir: str | os.PathLike | None = None,
        sinks: Sequence[Sink] | None = None,
        profile: bool | Callable[[int], Any] = False,
        loss_fn: Any = None,
        reduction: str = "mean",
        clipping: bool = True,
        log_verdicts: bool = True,
        resolve_subsets: bool = False,
        overlap: bool = False,
        _restored: bool = False,
    ):
        if _restored and getattr(self, "_configured", False):
            return  # __new__ returned the live instance: keep it as it is
        self._configured = True
        self.instruments, self.logdir, self.sinks, self.profile = instruments, logdir, sinks, profile
        self.loss_fn, self.reduction, self.clipping = loss_fn, reduction, clipping
        self.log_verdicts, self.resolve_subsets, self.overlap = log_verdicts, resolve_subsets, overlap
        self._args = _json_able(
            {
                "instruments": instruments,
                "logdir": os.fspath(logdir) if logdir is not None else None,
                "reduction": reduction,
                "clipping": clipping,
                "log_verdicts": log_verdicts,
                "resolve_subsets": resolve_subsets,
                "overlap": overlap,
            }
        )
        #: the attached cockpit (from ``on_train_begin`` on)
        self.cockpit: Cockpit | None = None
        self.indices: TrainerIndices | None = None
        self._trainer_args: Any = None
        self._trainer_state: Any = None
        self._skip_first_epoch = 0
        self._forwarded: dict[str, int] = {}
        self._warned: set[str] = set()
        if not _restored:
            type(self)._built = [r for r in type(self)._built if r() is not None] + [weakref.ref(self)]

    # --- ExportableState: what trainer_state.json holds -------------------------------------------------
    def state(self) -> dict:
        """``args``: the JSON-able arguments (and ``_restored``, see :meth:`__new__`); ``attributes``: the
        cockpit's step count, where its state file is written and the length of its JSON lines then."""
        attributes: dict[str, Any] = {"cockpit_step": 0}
        if self.cockpit is not None and self._trainer_args is not None and self._trainer_state is not None:
            folder = self._checkpoint_folder(self._trainer_args, self._trainer_state.global_step)
            run = self.cockpit.logdir
            attributes = {
                "cockpit_step": self.cockpit.step,
                "cockpit_state_file": os.path.join(os.path.abspath(folder), STATE_FILE),
                "cockpit_logdir": self._args.get("logdir"),  # as given; the run may be in <logdir>-2
                "cockpit_run_dir": os.path.abspath(run) if run is not None else None,
                "cockpit_jsonl_bytes": _size(os.path.join(run, JSONL_FILENAME)) if run is not None else None,
            }
        return {"args": {**self._args, "_restored": True}, "attributes": attributes}

    @staticmethod
    def _checkpoint_folder(args: Any, global_step: int) -> str:
        return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{global_step}")

    @_never_raises
    def _saved(self, state: Any) -> dict | None:
        """This callback's attributes in the checkpoint the Trainer resumed from (None if not resuming)."""
        if state.global_step <= 0:  # a fresh TrainerState: not resuming
            return None
        entry = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(entry, list):
            mine = [e for e in entry if e.get("args", {}).get("logdir") == self._args.get("logdir")]
            entry = mine[0] if len(mine) == 1 else None
        attrs = entry.get("attributes") if isinstance(entry, dict) else None
        return attrs if attrs and attrs.get("cockpit_step") else None

    def _warn(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            warn(msg, stacklevel=4)

    # --- the Trainer's events -----------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        """Attach the cockpit. Configuration errors raise here, as ``Cockpit(...)`` does; what follows the
        attachment (resuming, the index recorder) only warns."""
        if self.cockpit is not None:  # a second train() call: a new run
            self._close()
        self._trainer_args, self._trainer_state = args, state
        saved = self._saved(state)
        run = self._resumed_run_dir(saved) if saved is not None else None
        if run is not None:
            self._cut_jsonl(run, saved.get("cockpit_jsonl_bytes"))
        instruments = instruments_of(self.instruments)
        if self.clipping and args.max_grad_norm and args.max_grad_norm > 0:
            from cockpit_lite.instruments.clipping import Clipping

            if not any(isinstance(i, Clipping) for i in instruments):
                instruments.append(Clipping(max_norm=args.max_grad_norm, kinds="global"))
        self.cockpit = Cockpit(
            model,
            optimizer,
            self.loss_fn,
            instruments=instruments,
            logdir=run if run is not None else self.logdir,
            sinks=self.sinks,
            profile=self.profile,
            reduction=self.reduction,
            resume=run is not None,  # continue the checkpoint's run; else a logdir holding a run gets <logdir>-2
            overlap=self.overlap,
        )
        self._after_attach(args, state, train_dataloader, saved)

    @_never_raises
    def _after_attach(self, args: Any, state: Any, train_dataloader: Any, saved: dict | None) -> None:
        if args.gradient_accumulation_steps > 1:
            self._declare_accumulation()
        if saved is not None:
            self._load(args, state, saved)
        self._forwarded = {}
        feed = next(p.feed for p in self.cockpit.providers if hasattr(p, "feed"))
        self.indices = TrainerIndices(train_dataloader, feed, self.resolve_subsets) if train_dataloader else None
        if self.indices is not None and self.indices.why is not None and self._wants_indices():
            self._warn(f"no dataset indices for TracIn: {self.indices.why}")
        self._skip_first_epoch = self._skipped_batches(args, state, train_dataloader) if saved is not None else 0

    def _declare_accumulation(self) -> None:
        """Every optimizer step has several micro-batches: the first step keeps its micro-batches'
        factors too (g_i . gbar, Gram entries and projections from step 0 on)."""
        self.cockpit.engine.expect_accumulation()

    def _wants_indices(self) -> bool:
        from cockpit_lite.instruments.tracin import TracIn

        return any(isinstance(i, TracIn) for i in self.cockpit.instruments)

    @staticmethod
    def _skipped_batches(args: Any, state: Any, loader: Any) -> int:
        """The batches the Trainer skips at the start of the epoch it resumes in (as ``_init_training_state``
        computes them)."""
        if args.ignore_data_skip or loader is None:
            return 0
        try:
            n = len(loader)
        except TypeError:
            return 0
        k = args.gradient_accumulation_steps
        per_epoch = max(n // k + int(n % k > 0), 1)
        return (state.global_step % per_epoch) * k

    def _resumed_run_dir(self, saved: dict) -> str | None:
        """The directory of the run a checkpoint belongs to, if this callback writes where that run did
        (the same ``logdir`` given): the resumed run continues it (``resume=True``). None otherwise: a
        new ``logdir`` is a new run directory."""
        run = saved.get("cockpit_run_dir")
        if run is None or self.logdir is None or saved.get("cockpit_logdir") is None or not os.path.isdir(run):
            return None
        if os.path.abspath(os.fspath(self.logdir)) != os.path.abspath(saved["cockpit_logdir"]):
            return None
        return run

    @_never_raises
    def _cut_jsonl(self, run: str, size: int | None) -> None:
        """Cut the run's ``cockpit.jsonl`` back to its length at the checkpoint, so that it reads back as the
        uninterrupted run's (docs/quickstart.md, "Resuming a run"): the interrupted run may have written
        steps after the checkpoint, and records at its close, that the resumed run does not write again."""
        path = os.path.join(run, JSONL_FILENAME)
        if size is not None and os.path.exists(path) and os.path.getsize(path) > size:
            with open(path, "r+b") as f:
                f.truncate(size)

    def _load(self, args: Any, state: Any, saved: dict) -> None:
        step = int(saved["cockpit_step"])
        here = os.path.join(self._checkpoint_folder(args, state.global_step), STATE_FILE)
        candidates = [saved.get("cockpit_state_file"), here]
        path = next((p for p in candidates if p and os.path.exists(p)), None)
        try:
            loaded = torch.load(path, weights_only=True) if path is not None else None
            fits = loaded is not None and int(loaded.get("step", -1)) == step
        except Exception:  # unreadable: as if absent
            fits = False
        if not fits:
            self._warn(
                f"the checkpoint holds no {STATE_FILE} of step {step} (looked at {[c for c in candidates if c]}): "
                "the cockpit continues the step count, its instruments start afresh"
            )
            loaded = {"version": 1, "step": step, "instruments": {}}
        self.cockpit.load_state_dict(loaded)

    @_never_raises
    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.indices is not None:
            self.indices.new_epoch(self._skip_first_epoch)
        self._skip_first_epoch = 0

    @_never_raises
    def on_step_begin(self, args, state, control, **kwargs):
        if self.indices is not None:
            self.indices.next_batch()  # the first micro-batch of the optimizer step

    @_never_raises
    def on_substep_end(self, args, state, control, **kwargs):
        if self.indices is not None:
            self.indices.next_batch()  # a further micro-batch of the same optimizer step follows

    @_never_raises
    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.cockpit is None or not self.log_verdicts or logs is None:
            return
        extra: dict[str, Any] = {}
        for tag in self.cockpit.history.tags("verdict/"):
            step, text = self.cockpit.history.latest(tag)
            if isinstance(text, str) and self._forwarded.get(tag) != step:
                extra[f"cockpit/{tag}"] = text
                self._forwarded[tag] = step
        if "train_runtime" in logs or "train_loss" in logs:  # the Trainer's closing log of train()
            verdicts = self.cockpit.verdicts()
            if verdicts:
                extra["cockpit/verdicts"] = verdicts
        if not extra:
            return
        last = state.log_history[-1] if state.log_history else None
        if isinstance(last, dict) and last.get("step") == state.global_step and all(k in last for k in logs):
            last.update(extra)  # the entry the Trainer appended for these logs just before on_log
        logs.update(extra)

    @_never_raises
    def on_save(self, args, state, control, **kwargs):
        if self.cockpit is None or not args.should_save:
            return
        folder = self._checkpoint_folder(args, state.global_step)
        if os.path.isdir(folder):
            torch.save(self.cockpit.state_dict(), os.path.join(folder, STATE_FILE))
        else:
            self._warn(f"no checkpoint folder {folder}: the cockpit's state is not saved with this checkpoint")

    @_never_raises
    def on_train_end(self, args, state, control, **kwargs):
        self._close()

    def _close(self) -> None:
        if self.indices is not None:
            self.indices.restore()
            self.indices = None
        if self.cockpit is not None:
            self.cockpit.close()
