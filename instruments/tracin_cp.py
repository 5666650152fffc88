"""TracInCP: TracIn from checkpoints (Pruthi et al. 2020, REFERENCE.md section 5), and the
``Checkpoints`` instrument that saves them during training.

    TracInCP(z, z') = sum_k eta_k g_k(z) . g_k(z')          self-influence: sum_k eta_k ||g_k(z)||^2

over the saved checkpoints k (parameters theta_k and the learning rate eta_k stored with them), with
g_k(.) the gradient of the example's loss (as a batch of one) at theta_k, taken with the model in
eval mode and over every trainable parameter. This is Captum's ``TracInCP`` convention (no batch
factor 1/b; pass ``lr_scale=1/b`` to put the scores on the scale of the per-step TracIn).

Computed without one autograd call per example: per batch of examples one forward and one backward
to the layer outputs, then per layer the cross-Gram of the factor pairs (``cockpit_lite.persample.cross``).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cockpit_lite.instruments.tracin import top_table
from torch import nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from cockpit_lite import Instrument
from cockpit_lite.distributed import is_main, is_sharded
from cockpit_lite.errors import CockpitWarning
from cockpit_lite.persample.cross import Projector, ViewCollector, cross
from cockpit_lite.records import to_value
from cockpit_lite.sinks.jsonl import JsonLines
from cockpit_lite.unwrap import unwrap

CHECKPOINT_DIR = "checkpoints"


class Checkpoints(Instrument):
    """Save theta_t (the model's ``state_dict`` before step t) with the learning rate of step t.

    Files: ``<directory>/step_<t>.pt`` (default directory: ``<logdir>/checkpoints``), each a dict with
    ``state_dict``, ``learning_rate`` (first parameter group, Captum's key), ``lrs`` (every group),
    ``param_lrs`` ({parameter name: lr}), ``step``, ``batch_size``, ``reduction``.

    Args:
        every / schedule: which steps to save (step 0 included), e.g. ``every=len(loader)`` for one
            checkpoint per epoch.
        directory: where to save; default ``<logdir>/checkpoints`` of the cockpit.
        final: also save the parameters after the last step when the cockpit closes, with the
            learning rates the optimizer holds then (those the next step would use).
    Cost: one ``torch.save`` of the parameters per saved step; nothing on other steps.
    """

    READS_VALUES_IN_HOOKS = False  # (its hook reads parameters and fields filled at once: no flush for it)

    KEY = "checkpoints"
    TAGS = {"tracin/checkpoints": "number of checkpoints saved so far"}
    SUMMARY = (("tracin/checkpoints", "checkpoints saved"),)
    ORDER = 81.0

    def __init__(self, every: int = 1, directory: str | os.PathLike | None = None, final: bool = True, **kw):
        super().__init__(every=every, **kw)
        self.directory = Path(directory) if directory is not None else None
        self.final = final
        self.paths: list[Path] = []
        self._model: nn.Module | None = None
        self._names: dict[int, str] = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._last: tuple[int, list[float], int | None, str | None] | None = None
        self._warned = False
        self._steps = 0

    @property
    def key(self) -> str:
        return self.name or "checkpoints"

    def requires(self, step: int):
        self._steps = step + 1  # called at every step: the final checkpoint is labelled by the step count
        return super().requires(step)

    def on_attach(self, model, optimizer):
        self._model, self._optimizer = model, optimizer
        self._names = {id(p): n for n, p in model.named_parameters()}

    # --- state (resuming a run) -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``paths`` (the files saved so far, as strings), ``last`` ([step, lrs, batch size, reduction]
        of the last saved step, for the final checkpoint; None before any) and ``steps`` (the step count
        that labels the final checkpoint). Files are named by step, so numbering continues by itself."""
        last = None if self._last is None else [self._last[0], list(self._last[1]), self._last[2], self._last[3]]
        return {"paths": [str(p) for p in self.paths], "last": last, "steps": self._steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. The directory is this instance's (or the new logdir's): files saved
        before the checkpoint stay where they are and are still counted in ``tracin/checkpoints``."""
        last = state["last"]
        self.paths = [Path(p) for p in state["paths"]]
        if last is None:
            self._last = None
        else:
            step, lrs, batch, reduction = last
            self._last = (int(step), [float(v) for v in lrs], None if batch is None else int(batch), reduction)
        self._steps = int(state["steps"])

    def _param_lrs(self, lrs: list[float]) -> dict[str, float]:
        out = {}
        for gi, g in enumerate(self._optimizer.param_groups):
            for p in g["params"]:
                if id(p) in self._names and gi < len(lrs):
                    out[self._names[id(p)]] = lrs[gi]
        return out

    def _save(self, step: int, lrs: list[float], batch: int | None, reduction: str | None) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"step_{step:08d}.pt"
        state = {
            "state_dict": {k: v.detach().cpu().clone() for k, v in self._model.state_dict().items()},
            "learning_rate": lrs[0] if lrs else 1.0,
            "lrs": list(lrs),
            "param_lrs": self._param_lrs(lrs),
            "step": step,
            "batch_size": batch,
            "reduction": reduction,
        }
        tmp = path.with_suffix(".tmp")
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        except BaseException as e:  # a full disk: no half-written .tmp left behind
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(e, Exception):  # torch's own words name no file ("unexpected pos 1152 vs 1046")
                raise OSError(f"the checkpoint {path} could not be written ({type(e).__name__}: {e})") from e
            raise
        self.paths.append(path)

    def on_before_step(self, record):
        if any(is_sharded(p) for p in record.params.values()):
            self.note(
                "Checkpoints under FSDP2 (fully_shard): each rank holds a shard of the parameters; saving them "
                "whole would gather every parameter onto rank 0 at every saved step. Left out: save sharded "
                "checkpoints with torch.distributed.checkpoint and give TracInCP the consolidated state dicts"
            )
            return
        if not is_main():  # data-parallel: the ranks hold equal parameters; rank 0 alone saves them
            return
        if self.directory is None and record.logdir is not None:
            self.directory = Path(record.logdir) / CHECKPOINT_DIR
        if self.directory is None:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    "cockpit-lite: Checkpoints has nowhere to save: give the Cockpit a logdir=... or "
                    "Checkpoints(directory=...)",
                    CockpitWarning,
                    stacklevel=2,
                )
            return
        self._save(record.step, record.lrs, record.batch_size, record.reduction)
        self._last = (record.step, list(record.lrs), record.batch_size, record.reduction)

    def compute(self, record):
        if self._last is not None and self._last[0] == record.step:
            return {self.tag("tracin/checkpoints"): len(self.paths)}
        return {}

    def on_close(self):
        if self.final and self._last is not None and self._model is not None:
            _, _, batch, reduction = self._last
            lrs = [float(g["lr"]) for g in self._optimizer.param_groups if "lr" in g]
            try:
                self._save(self._steps, lrs, batch, reduction)
            except Exception as e:
                warnings.warn(f"cockpit-lite: saving the final checkpoint failed: {e}", CockpitWarning, stacklevel=2)
        return {}


def checkpoint_paths(where: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Checkpoint files in step order: from a run's logdir, its checkpoints directory, or a list."""
    if isinstance(where, (str, os.PathLike)):
        d = Path(where)
        if (d / CHECKPOINT_DIR).is_dir():
            d = d / CHECKPOINT_DIR
        paths = sorted(d.glob("step_*.pt"))
        if not paths:
            raise FileNotFoundError(f"no checkpoints step_*.pt in {d}: train with the Checkpoints instrument")
        return paths
    return [Path(p) for p in where]


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=True)


def captum_loader(model: nn.Module, path: str) -> float:
    """A ``checkpoints_load_func`` for Captum's TracInCP that loads our checkpoints and returns the
    stored learning rate (Captum's default loader returns 1.0 for files it did not write)."""
    state = load_checkpoint(path)
    model.load_state_dict(state["state_dict"])
    return float(state["learning_rate"])


Data = tuple[Any, Any] | Dataset | DataLoader


class TracInCP:
    """Train x test influence and self-influence from checkpoints.

    Args:
        model: the architecture (its parameters are overwritten by each checkpoint while computing and
            restored afterwards, with its train/eval mode).
        loss_fn: the loss module (reduction "mean" or "sum"; each example's loss is taken as a batch of one).
        checkpoints: a run's logdir, a checkpoints directory, or a list of checkpoint files.
        batch_size: examples per forward/backward.
        lr_scale: multiplies every stored learning rate (e.g. 1/b for the per-step TracIn scale).
        eval_mode: put the model in eval mode (default; Captum does not, which changes BatchNorm and
            dropout models' gradients).
        projection_dim / projection_seed: optional random projection of the factors for the
            train x test influence (self-influence stays exact); see docs/tracin.md for the error.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        checkpoints: str | os.PathLike | Sequence[str | os.PathLike],
        batch_size: int = 256,
        lr_scale: float = 1.0,
        eval_mode: bool = True,
        projection_dim: int | None = None,
        projection_seed: int = 0,
    ):
        # checkpoints hold the bare module's state (the cockpit unwraps DDP/DataParallel/torch.compile)
        self.model, self.loss_fn = unwrap(model)[0], loss_fn
        self.paths = checkpoint_paths(checkpoints)
        self.batch_size = batch_size
        self.lr_scale = lr_scale
        self.eval_mode = eval_mode
        self.projector = Projector(projection_dim, projection_seed) if projection_dim is not None else None
        self.collector = ViewCollector(self.model)
        self.trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self._warned: set[str] = set()

    # --- data ---------------------------------------------------------------------------------------
    def _batches(self, data: Data) -> Iterator[tuple[Any, Any]]:
        device = next(self.model.parameters()).device
        move = lambda t: t.to(device) if torch.is_tensor(t) else t  # noqa: E731
        if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data, Dataset):
            x, y = data
            n = len(y)
            for s in range(0, n, self.batch_size):
                xs = (
                    tuple(t[s : s + self.batch_size] for t in x)
                    if isinstance(x, (tuple, list))
                    else x[s : s + self.batch_size]
                )
                yield (
                    (tuple(move(t) for t in xs) if isinstance(xs, tuple) else move(xs)),
                    move(y[s : s + self.batch_size]),
                )
            return
        if isinstance(data, Dataset):
            data = DataLoader(data, batch_size=self.batch_size, shuffle=False)
        if isinstance(data, DataLoader) and not isinstance(data.sampler, SequentialSampler):
            warnings.warn(
                "cockpit-lite: TracInCP got a DataLoader that does not iterate in order: scores follow "
                "its iteration order, not dataset indices",
                CockpitWarning,
                stacklevel=3,
            )
        for batch in data:
            *xs, y = batch
            x = xs[0] if len(xs) == 1 else tuple(xs)
            yield (tuple(move(t) for t in x) if isinstance(x, tuple) else move(x)), move(y)

    # --- checkpoints --------------------------------------------------------------------------------
    def _checkpoints(self) -> Iterator[dict[str, float]]:
        """Load each checkpoint into the model (eval mode) and yield {parameter name: eta_k}."""
        model = self.model
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        modes = {m: m.training for m in model.modules()}
        device = next(model.parameters()).device
        try:
            for path in self.paths:
                state = load_checkpoint(path, map_location=device)
                model.load_state_dict(state["state_dict"])
                if self.eval_mode:
                    model.eval()
                lr = float(state.get("learning_rate", 1.0))
                plr = state.get("param_lrs") or {}
                yield {n: float(plr.get(n, lr)) * self.lr_scale for n in self.trainable}
        finally:
            model.load_state_dict(saved)
            for m, mode in modes.items():
                m.training = mode

    def _views(self, x, y):
        views, _ = self.collector(x, y, self.loss_fn)
        covered = {n for v in views.values() for n in v.names}
        missing = sorted(set(self.trainable) - covered)
        if missing:
            msg = f"TracInCP: parameters {missing} got no per-example gradient (unused by the loss?); they add 0"
            if msg not in self._warned:
                self._warned.add(msg)
                warnings.warn(f"cockpit-lite: {msg}", CockpitWarning, stacklevel=3)
        return views

    # --- results ------------------------------------------------------------------------------------
    @torch.no_grad()
    def self_influence(self, train: Data) -> np.ndarray:
        """sum_k eta_k ||g_k(z)||^2 for every example z of ``train`` (in its order)."""
        total: np.ndarray | None = None
        for lrs in self._checkpoints():
            parts = []
            for x, y in self._batches(train):
                views = self._views(x, y)
                s = None
                for view in views.values():
                    for n, sq in view.sq_norms().items():
                        term = sq.double() * lrs.get(n, 0.0)
                        s = term if s is None else s + term
                parts.append(s.cpu().numpy())
            cur = np.concatenate(parts)
            total = cur if total is None else total + cur
        return total

    @torch.no_grad()
    def influence(self, train: Data, test: Data) -> np.ndarray:
        """(N_train, N_test): sum_k eta_k g_k(z_i) . g_k(z'_j)."""
        total: np.ndarray | None = None
        for lrs in self._checkpoints():
            test_parts = [self._views(x, y) for x, y in self._batches(test)]
            rows = []
            for x, y in self._batches(train):
                views = self._views(x, y)
                cols = []
                for tv in test_parts:
                    acc = None
                    for names, view in views.items():
                        other = tv.get(names)
                        if other is None:
                            continue
                        for n, c in cross(view, other, self.projector).items():
                            term = c.double() * lrs.get(n, 0.0)
                            acc = term if acc is None else acc + term
                    cols.append(acc.cpu().numpy())
                rows.append(np.concatenate(cols, axis=1))
            cur = np.concatenate(rows, axis=0)
            total = cur if total is None else total + cur
        return total

    def proponents(self, train: Data, test: Data, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Per test example, the k training examples with the largest influence: (indices, scores),
        each (N_test, k)."""
        t = top_table(self.influence(train, test).T, k, largest=True)
        return t["index"], t["score"]

    def opponents(self, train: Data, test: Data, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        t = top_table(self.influence(train, test).T, k, largest=False)
        return t["index"], t["score"]

    def write(
        self,
        logdir: str | os.PathLike,
        self_influence: np.ndarray | None = None,
        influence: np.ndarray | None = None,
        top_k: int = 20,
        step: int | None = None,
    ) -> dict[str, Any]:
        """Append the results to the run in ``logdir`` (readable by ``cockpit_lite.load``) under
        ``tracin/cp/...``; returns the records written. ``step`` defaults to the last checkpoint's."""
        records: dict[str, Any] = {"tracin/cp/checkpoints": len(self.paths)}
        if self_influence is not None:
            records["tracin/cp/self_influence"] = self_influence
            records["tracin/cp/self_influence/top"] = top_table(self_influence, top_k)
        if influence is not None:
            records["tracin/cp/proponents"] = top_table(influence.T, top_k, largest=True)
            records["tracin/cp/opponents"] = top_table(influence.T, top_k, largest=False)
        if step is None:
            step = int(load_checkpoint(self.paths[-1]).get("step", 0))
        sink = JsonLines(logdir)
        sink.open(None)
        try:
            sink.write(step, {k: to_value(v) for k, v in records.items()})
        finally:
            sink.close()
        return records
