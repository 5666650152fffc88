"""Numbers a step brings to the host together: one transfer (one synchronisation on a GPU) for the
step's norms and per-sample vectors, instead of one per provider.

Providers and instruments hand device tensors to the step's :class:`HostBatch` (``record.host``) as they
compute them and get a :class:`Deferred`; the Cockpit flushes the batch once the providers' work of the
step is done (after the optimizer step, before any instrument's ``compute``): every pending tensor is
flattened, concatenated on its device and copied to float64 numpy by one transfer, then each
``then`` callback runs (a provider filling its record fields). A value read before that (a
:class:`LazyNorms` read in an earlier hook) flushes what is pending at that moment: the same numbers,
one transfer more.

The flush is two halves: :meth:`HostBatch.start` launches the transfer (on a CUDA device a
non-blocking copy into pinned host memory and an event: the host does not wait) and
:meth:`HostBatch.finish` waits for it and runs the callbacks. ``Cockpit(..., overlap=True)`` puts the
next step's forward between the two, so the device never waits for the cockpit.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, ItemsView, Iterator, KeysView, Mapping, Sequence, ValuesView
from typing import Any

import numpy as np
import torch

from cockpit_lite import distributed
from cockpit_lite.compat import stacked_norms


class _Copy:
    """A transfer to the host in flight: float64 values in pinned host memory, ready once ``event`` has
    completed (a CUDA tensor), or already on the host (``array``)."""

    __slots__ = ("array", "pinned", "event")

    def __init__(self, t: torch.Tensor):
        self.array: np.ndarray | None = None
        self.pinned: torch.Tensor | None = None
        self.event: Any = None
        if t.is_cuda and not torch.cuda.is_current_stream_capturing():
            try:
                src = t.detach().to(torch.float64)
                pinned = torch.empty(src.shape, dtype=torch.float64, pin_memory=True)
                pinned.copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(t.device))
            except Exception:  # (pinned memory refused, say): the blocking copy below
                pass
            else:
                self.pinned, self.event = pinned, event
                return
        self.array = host_float64(t)

    def values(self) -> np.ndarray:
        """The float64 values on the host (waits for the copy to complete)."""
        if self.array is None:
            assert self.pinned is not None and self.event is not None
            self.event.synchronize()
            self.array, self.pinned, self.event = self.pinned.numpy(), None, None
        return self.array


def host_float64(t: torch.Tensor) -> np.ndarray:
    """A float64 numpy array of ``t``'s values (exact from any float dtype): a float32 CPU tensor by
    numpy's conversion (no tensor op), any other through ``.double().cpu()``. The array may share
    memory with a float64 CPU tensor: copy it before the tensor changes."""
    if t.dtype == torch.float32 and t.is_cpu and not t.requires_grad and type(t) is torch.Tensor:
        return t.numpy().astype(np.float64)
    return t.double().cpu().numpy()


class Deferred:
    """Tensors waiting in a :class:`HostBatch`; :meth:`get` gives their values as float64 arrays of
    their shapes (flushing the batch first if it has not been)."""

    __slots__ = ("tensors", "then", "values", "error", "_batch")

    def __init__(self, batch: HostBatch, tensors: list[torch.Tensor], then: Callable[[list], None] | None):
        self._batch, self.tensors, self.then = batch, tensors, then
        self.values: list[np.ndarray] | None = None
        self.error: str | None = None  #: why the values could not be had (a note says it too)

    def get(self) -> list[np.ndarray]:
        if self.values is None and self.error is None:
            self._batch.flush()
        if self.values is None:
            raise RuntimeError(f"these values could not be brought to the host: {self.error}")
        return self.values


class HostBatch:
    """The tensors a step wants on the host (module docstring). ``record``: the step record, unsealed
    while the callbacks run (they fill its fields and notes)."""

    def __init__(self, record: Any = None):
        # (held weakly: the record holds its batch, and a step's objects are freed by reference counting,
        # not left to the garbage collector as a cycle)
        self._record = weakref.ref(record) if record is not None else None
        self._pending: list[Deferred] = []
        #: transfers launched by :meth:`start`, awaiting :meth:`finish`: (deferrals, copy or None)
        self._started: list[tuple[list[Deferred], _Copy | None]] = []
        #: reports a failure once (the Cockpit's warning; set by the step), beside the record's note
        self.warn: Callable[[str], None] | None = None

    @property
    def record(self) -> Any:
        """The step record the callbacks fill (None without one, or once it is gone)."""
        return self._record() if self._record is not None else None

    @property
    def pending(self) -> bool:
        """Whether tensors wait for the flush."""
        return bool(self._pending)

    def defer(self, tensors: Sequence[torch.Tensor], then: Callable[[list], None] | None = None) -> Deferred:
        """Queue ``tensors`` (any float dtype and shape); ``then(values)`` runs at the flush."""
        d = Deferred(self, [t.detach() if t.requires_grad else t for t in tensors], then)
        self._pending.append(d)
        return d

    def flush(self) -> None:
        """Bring every pending tensor to the host by one transfer, then run the callbacks (:meth:`start`,
        then :meth:`finish`). Never raises: tensors that cannot be brought over (or a callback that
        fails) become a note on the record."""
        self.start()
        self.finish()

    def start(self) -> None:
        """Launch the transfer of every pending tensor: concatenated on its device and copied to float64
        host memory (on a CUDA device without waiting: pinned memory and an event). Never raises."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        flat = [t if t.dim() == 1 else t.reshape(-1) for d in pending for t in d.tensors]
        try:
            copy: _Copy | None = _Copy(torch.cat(flat) if len(flat) > 1 else flat[0])
        except Exception:  # tensors on several devices (or of a kind cat refuses): each deferral on its own
            copy = None
        self._started.append((pending, copy))

    @property
    def started(self) -> bool:
        """Whether a transfer was launched that :meth:`finish` has not completed."""
        return bool(self._started)

    def finish(self) -> None:
        """Wait for the transfers :meth:`start` launched, hand each deferral its values and run the
        callbacks, in the order the tensors were deferred. Never raises."""
        started, self._started = self._started, []
        for pending, copy in started:
            try:
                host = copy.values() if copy is not None else None
            except Exception:  # (a device error surfacing at the wait): each deferral on its own
                host = None
            self._deliver(pending, host)

    def _deliver(self, pending: list[Deferred], host: np.ndarray | None) -> None:
        record = self.record
        sealed = getattr(record, "SEALED", False)
        if sealed:  # (an instrument's read flushed it: the providers' callbacks write the record)
            record.seal(False)
        try:
            at = 0
            for d in pending:
                spans = []
                for t in d.tensors:
                    spans.append((at, t.numel(), t.shape))
                    at += spans[-1][1]
                try:
                    if host is None:
                        d.values = [host_float64(t).reshape(t.shape) for t in d.tensors]
                    else:
                        d.values = [host[a : a + n].reshape(shape) for a, n, shape in spans]
                except Exception as e:
                    self._failed(d, e)
            for d in pending:
                d.tensors = []
                then, d.then, d._batch = d.then, None, None  # (delivered: no cycle through a callback or the batch)
                if then is not None and d.values is not None:
                    try:
                        then(d.values)
                    except Exception as e:
                        self._failed(d, e)
        finally:
            if sealed:
                record.seal(True)

    def _failed(self, d: Deferred, e: Exception) -> None:
        d.error = f"{type(e).__name__}: {e}"
        msg = f"numbers of this step could not be brought to the host ({d.error}): they are left out"
        if self.warn is not None:
            self.warn(msg)
        record = self.record
        if record is not None:
            record.add_note(msg, frozenset())


class LazyNorms(Mapping):
    """{name: ||t||} whose values arrive with the step's host batch (read them as a dict)."""

    __slots__ = ("names", "_deferred", "_dict")

    def __init__(self, names: Sequence[str], deferred: Deferred):
        self.names, self._deferred = list(names), deferred
        self._dict: dict[str, float] | None = None

    def _values(self) -> dict[str, float]:
        if self._dict is None:
            self._dict = dict(zip(self.names, self._deferred.get()[0].tolist(), strict=True))
        return self._dict

    def __getitem__(self, name: str) -> float:
        return self._values()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    # (the dict's own views: Mapping's would call __getitem__ per item)
    def keys(self) -> KeysView[str]:
        return self._values().keys()

    def values(self) -> ValuesView[float]:
        return self._values().values()

    def items(self) -> ItemsView[str, float]:
        return self._values().items()

    def get(self, name: str, default: Any = None) -> Any:
        return self._values().get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._values()

    def __repr__(self) -> str:
        return repr(self._values())


def norms(
    batch: HostBatch | None,
    names: Sequence[str],
    tensors: Sequence[torch.Tensor],
    then: Callable[[Mapping[str, float]], None] | None = None,
) -> Mapping[str, float]:
    """{name: ||tensor||}: deferred to ``batch`` for plain tensors (one fused norm now, the values with the
    step's transfer, then ``then(norms)``), at once through :func:`cockpit_lite.distributed.norms` for
    FSDP2's DTensors (an all-reduce, which every rank must call in the same order) or without a batch."""
    if not names:
        out: Mapping[str, float] = {}
    elif batch is None or distributed.any_dtensor(tensors):
        out = dict(zip(names, distributed.norms(list(tensors)), strict=True))
    else:
        deferred = batch.defer([stacked_norms(list(tensors))])
        out = LazyNorms(names, deferred)
        if then is not None:
            deferred.then = lambda values: then(out)
        return out
    if then is not None:
        then(out)
    return out
