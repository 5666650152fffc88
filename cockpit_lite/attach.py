"""What the Cockpit checks and builds when it attaches: arguments, instruments, sinks, profiler place.
Under ``torch.distributed`` only rank 0 gets sinks and a profiler: one run, written once."""

from __future__ import annotations

import collections
import operator
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from cockpit_lite import distributed
from cockpit_lite.instrument import Instrument
from cockpit_lite.registry import resolve
from cockpit_lite.rundir import run_dir
from cockpit_lite.sinks.base import Sink
from cockpit_lite.sinks.jsonl import JsonLines


def check_model_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, nn.Parameter]:
    """The trainable parameters of ``model`` that ``optimizer`` holds, by name; clear errors otherwise."""
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
    distributed.refuse_sharded(model, params)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if not held & {id(p) for p in params.values()}:
        raise ValueError(
            "the optimizer holds none of the model's parameters (was it built for another model, or "
            "before the model was copied/moved?). Build it from this model: "
            "torch.optim.SGD(model.parameters(), ...)."
        )
    return {n: p for n, p in params.items() if id(p) in held}


def held(model: nn.Module, optimizers: Sequence[Any]) -> list[nn.Parameter]:
    """Every parameter of ``model`` that one of ``optimizers`` holds, trainable or not (a frozen one may be
    unfrozen later), in the model's order."""
    ids = {id(p) for o in optimizers for g in o.param_groups for p in g["params"]}
    return [p for _, p in model.named_parameters() if id(p) in ids]


_REQUIRES_GRAD = operator.attrgetter("requires_grad")


def trainable_state(model_params: Sequence[nn.Parameter], group_lists: Sequence[list]) -> tuple:
    """What decides the tracked parameters, cheap to compare step by step (C-level passes, no Python frame
    per item: a generator over the groups measured 5 us a step in the training loop): each held parameter's
    ``requires_grad`` and the number of groups in each optimizer's ``param_groups`` list (``add_param_group``
    appends to it; a parameter appended to an existing group's list by hand is not seen)."""
    return tuple(map(_REQUIRES_GRAD, model_params)), tuple(map(len, group_lists))


class Optimizers:
    """Several optimizers that step one model's parameters together (Muon beside AdamW, SparseAdam beside
    Adam), read as one: their parameter groups in order, their states together. Each steps once per step;
    the cockpit hooks each (``Cockpit(model, [opt_a, opt_b])``)."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        self.optimizers = tuple(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> Mapping:
        return collections.ChainMap(*(o.state for o in self.optimizers))

    def __repr__(self) -> str:
        return f"Optimizers({', '.join(type(o).__name__ for o in self.optimizers)})"


def check_model_optimizers(model: nn.Module, optimizers: Sequence[Any]) -> dict[str, nn.Parameter]:
    """:func:`check_model_optimizer` for several optimizers: the parameters each holds, together; a
    parameter two of them hold is refused (both would step it)."""
    if not optimizers:
        raise ValueError("an empty list of optimizers: give the optimizer (or optimizers) that step the model")
    params: dict[str, nn.Parameter] = {}
    for o in optimizers:
        held = check_model_optimizer(model, o)
        twice = sorted(set(held) & set(params))
        if twice:
            raise ValueError(
                f"parameters {twice} are held by two of the optimizers: each parameter must be stepped by one of them"
            )
        params.update(held)
    order = {n: k for k, (n, _) in enumerate(model.named_parameters())}
    return dict(sorted(params.items(), key=lambda item: order[item[0]]))


def untracked(model: nn.Module, params: dict[str, nn.Parameter]) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters of ``model`` the optimizer does not hold (those ``params`` leave out)."""
    held = {id(p) for p in params.values()}
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]


def untracked_note(names: list[str], tracked: int) -> str:
    """What to say when parameters the optimizer does not hold get gradients (a second optimizer steps
    them, as Muon beside AdamW, or SparseAdam beside Adam): every statistic covers the optimizer's only."""
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (
        f"{len(names)} parameter tensors get gradients but the optimizer the cockpit was given does not hold them "
        f"({shown}): they are in no statistic (norms, updates, per-sample statistics cover its {tracked} tensors "
        "only). If another optimizer steps them, give the cockpit every optimizer: Cockpit(model, [opt_a, opt_b])"
    )


def instruments_of(spec: str | Iterable[Instrument | str]) -> list[Instrument]:
    """Resolve a preset name or a list of instruments/names; every key must be unique."""
    instruments = resolve(spec)
    keys = [i.key for i in instruments]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"two instruments share the key(s) {dupes}: give one of them name='...'")
    return instruments


def sinks_of(logdir: str | None, sinks: Sequence[Sink] | None) -> list[Sink]:
    """The sinks of a run: JSON lines first whenever there is a logdir; TensorBoard by default."""
    if sinks is None and logdir is not None:
        from cockpit_lite.sinks.tensorboard import TensorBoard  # imports tensorboard: only when used

        sinks = [TensorBoard(logdir)]
    out = list(sinks or [])
    for s in out:
        if not isinstance(s, Sink):
            raise TypeError(f"sinks must be cockpit_lite.sinks.Sink objects, got {type(s).__name__}")
    if logdir is not None and not any(isinstance(s, JsonLines) for s in out):
        out.insert(0, JsonLines(logdir))
    if not distributed.is_main():  # under torch.distributed rank 0 writes the one run of every rank
        return []
    return out


def run_dir_of(logdir: str | os.PathLike | None, resume: bool, warn: Callable[[str], None]) -> str | None:
    """The directory this run writes to (:func:`cockpit_lite.rundir.run_dir`), said when it is not ``logdir``."""
    if logdir is None:
        return None
    if not distributed.is_main():  # it writes nothing: no sibling to choose (rank 0 may have begun writing)
        return os.fspath(logdir)
    out = run_dir(logdir, resume)
    if out != os.fspath(logdir):
        warn(
            f"{os.fspath(logdir)} already holds a run: this run is written to {out} (one directory per run); "
            "pass resume=True to continue the run that is there"
        )
    return out


def own_run_dirs(
    sinks: Sequence[Sink],
    asked: str | os.PathLike | None,
    logdir: str | None,
    resume: bool,
    warn: Callable[[str], None],
) -> None:
    """Point every sink that writes files at a directory of this run only: those given the cockpit's
    ``logdir`` follow it to where the run goes; those with another directory get one of their own."""
    for sink in sinks:
        own = getattr(sink, "logdir", None)
        if own is None:
            continue
        if asked is not None and os.path.normpath(os.fspath(own)) == os.path.normpath(os.fspath(asked)):
            sink.logdir = logdir
        elif logdir is None or os.path.normpath(os.fspath(own)) != os.path.normpath(logdir):
            sink.logdir = run_dir_of(own, resume, warn)


def profile_dir(logdir: str | None, sinks: Sequence[Sink]) -> str | None:
    """Where ``profile=`` writes its traces: the logdir, else where a sink writes (TensorBoard's logdir);
    None on a rank other than 0 (it writes nothing)."""
    if not distributed.is_main():
        return None
    if logdir is not None:
        return logdir
    for s in sinks:
        d = getattr(s, "logdir", None)
        if d is not None:
            return os.fspath(d)
    raise ValueError(
        "profile= writes trace files next to the run: give Cockpit(..., logdir='runs/exp1') or a sink with a "
        "logdir, e.g. sinks=[TensorBoard('runs/exp1')]"
    )
