"""What the Cockpit checks and builds when it attaches: arguments, instruments, sinks, profiler place."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from cockpit_lite.instrument import Instrument
from cockpit_lite.registry import resolve
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
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if not held & {id(p) for p in params.values()}:
        raise ValueError(
            "the optimizer holds none of the model's parameters (was it built for another model, or "
            "before the model was copied/moved?). Build it from this model: "
            "torch.optim.SGD(model.parameters(), ...)."
        )
    return {n: p for n, p in params.items() if id(p) in held}


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
    return out


def profile_dir(logdir: str | None, sinks: Sequence[Sink]) -> str:
    """Where ``profile=`` writes its traces: the logdir, else where a sink writes (TensorBoard's logdir)."""
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
