"""The cockpit's reads of tensor values on the host before a step's one transfer (cockpit_lite/host.py).

On CUDA every such read (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``.cpu()``, ``.numpy()``,
``torch.equal``) waits for the device: the host stops launching work until the queued kernels have run.
A step's numbers are meant to reach the host by one transfer, after the optimizer step. The reads can be
counted on the CPU as well, where they cost nothing: :class:`HostReads` patches those methods for the
duration of a ``with`` block and records each call made from the cockpit's own code (``cockpit_lite``
or its instruments; not the training loop's, not torch's) between the model's forward of a step and the
start of that step's host batch flush.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from typing import Any

import cockpit_lite.instruments
import torch

import cockpit_lite
from cockpit_lite import host, lifecycle

#: Tensor methods that read a value on the host
READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")
_OURS = tuple(
    {
        os.path.dirname(cockpit_lite.__file__) + os.sep,
        os.path.dirname(cockpit_lite.instruments.__file__) + os.sep,
        os.path.realpath(os.path.dirname(cockpit_lite.instruments.__file__)) + os.sep,
    }
)
_TORCH = os.path.dirname(torch.__file__) + os.sep
#: reads that wait for nothing of the step: ``compat.cpu_value`` reads CPU tensors only, by construction;
#: ``compat._read_idle`` reads GradScaler's scale before the step's forward is launched
_EXEMPT = ("cpu_value", "_read_idle")


def _caller() -> str | None:
    """``file:line`` of the innermost frame outside torch, if it is the cockpit's own code."""
    f = sys._getframe(3)  # (_caller, HostReads._record, the patched method)
    while f is not None and f.f_code.co_filename.startswith(_TORCH):
        f = f.f_back
    if f is None or not f.f_code.co_filename.startswith(_OURS) or f.f_code.co_name in _EXEMPT:
        return None
    return f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno}"


class HostReads:
    """``with HostReads() as reads:`` records ``(step, where, what)`` for every read before the flush
    in ``reads.before``, and after it in ``reads.later`` (steps counted by the steps begun inside the
    block, from 0)."""

    def __init__(self) -> None:
        self.before: list[tuple[int, str, str]] = []
        #: reads after the step's flush (each a second transfer on CUDA), as ``before``
        self.later: list[tuple[int, str, str]] = []
        self._step = -1
        self._flushing = self._flushed = False
        self._saved: dict[str, Any] = {}

    def _record(self, what: str) -> None:
        if self._step < 0 or self._flushing:
            return
        where = _caller()
        if where is not None:
            (self.later if self._flushed else self.before).append((self._step, where, what))

    def after(self, step: int, later: bool = False) -> Counter:
        """The reads before the flush (``later``: after it) on steps >= ``step``, counted by where and what."""
        return Counter((w, what) for s, w, what in (self.later if later else self.before) if s >= step)

    def __enter__(self) -> HostReads:
        reads = self
        for name in READS:
            self._saved[name] = torch.Tensor.__dict__.get(name)
            original = getattr(torch.Tensor, name)

            def patched(t, *args, _original=original, _name=name, **kwargs):
                reads._record(_name)
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, patched)
        self._saved["equal"] = torch.equal

        def equal(a, b):
            reads._record("torch.equal")
            return reads._saved["equal"](a, b)

        torch.equal = equal
        self._saved["flush"] = host.HostBatch.flush

        def flush(batch):
            if not batch.pending:
                return reads._saved["flush"](batch)
            reads._flushing = True
            try:
                return reads._saved["flush"](batch)
            finally:
                reads._flushing, reads._flushed = False, True

        host.HostBatch.flush = flush
        self._saved["step"] = lifecycle.Step.__init__

        def step_init(st, *args, **kwargs):
            reads._step += 1
            reads._flushed = False
            return reads._saved["step"](st, *args, **kwargs)

        lifecycle.Step.__init__ = step_init
        return self

    def __exit__(self, *exc: Any) -> None:
        for name in READS:
            if self._saved[name] is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, self._saved[name])
        torch.equal = self._saved["equal"]
        host.HostBatch.flush = self._saved["flush"]
        lifecycle.Step.__init__ = self._saved["step"]
