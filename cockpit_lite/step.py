"""The step record: everything the providers computed for one optimizer step, handed to instruments.

Providers write it; instruments only read it. The Cockpit seals the record before it hands it to an
instrument (assigning a field then raises), and unseals it for the providers' next event.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from cockpit_lite import distributed
from cockpit_lite.host import HostBatch


class SealedRecordError(AttributeError):
    """An instrument tried to change the step record (instruments return records instead)."""


@dataclass
class StepRecord:
    """What happened in optimizer step ``step`` (0-based count of ``optimizer.step()`` calls).

    Per-sample gradients g_i are the gradients of the per-sample losses l_i, whatever the reduction:
    for ``reduction="mean"`` the mini-batch gradient is ``p.grad = (1/B) sum_i g_i``, for ``"sum"`` it is
    ``sum_i g_i``. Fields stay ``None`` when no instrument asked for them or they could not be
    computed; ``notes`` then says why (the Cockpit also writes them as ``note/<instrument>`` records).
    Needs of third-party providers are read with :meth:`get`.
    """

    step: int
    #: examples in the step: the batch size, or the sum over micro-batches under gradient accumulation
    batch_size: int | None = None
    reduction: str | None = None
    #: examples of each forward/backward pass of the step (one entry without gradient accumulation)
    micro_batches: list[int] = field(default_factory=list)
    #: the model calls of the step (by position) whose outputs backward reached; a call it never
    #: reached (an iteration the loop abandoned after a non-finite loss) is no part of the step
    reached: frozenset[int] = frozenset()
    loss: float | None = None
    #: the step's forward and backward ran at parameters moved away from theta_t, where its update starts (SAM:
    #: its ascent step): its loss and gradients are at the perturbed point, not on the line of the update
    perturbed: bool = False
    per_sample_loss: np.ndarray | None = None
    lrs: list[float] = field(default_factory=list)
    #: live parameters by name (read them, never write them)
    params: dict[str, torch.nn.Parameter] = field(default_factory=dict)
    grad_norms: dict[str, float] | None = None
    #: ||p.grad|| right after backward, divided by ``backward_scale``
    backward_grad_norms: dict[str, float] | None = None
    #: the factor backward started from: 1 for ``loss.backward()``, the loss scale under AMP's GradScaler
    #: (``p.grad`` read in ``on_after_backward`` is that many times the gradient of the loss module)
    backward_scale: float | None = None
    #: d = theta_{t+1} - theta_t by name. The tensors are buffers the core reuses at the next tracked
    #: step: read them in ``compute``; copy what must outlive the step.
    update: dict[str, torch.Tensor] | None = None
    per_sample_sq_norms: np.ndarray | None = None
    #: ||g_i||^2 per tensor: only when an instrument asks ``Need.PER_SAMPLE_SQ_NORMS_BY_PARAM``
    per_sample_sq_norms_by_param: dict[str, np.ndarray] | None = None
    per_sample_dot_mean: np.ndarray | None = None  #: g_i . gbar, gbar = mean_j g_j
    mean_grad_sq_norm: float | None = None  #: ||gbar||^2 (with per_sample_dot_mean)
    per_sample_gram: np.ndarray | None = None
    per_sample_gram_by_param: dict[str, np.ndarray] | None = None
    per_sample_grads: dict[str, torch.Tensor] | None = None
    #: parameters with a gradient but no per-sample statistics this step, with their share of
    #: sum_p ||p.grad||^2 (``{}``: every parameter covered; None: not computed)
    per_sample_uncovered: dict[str, float] | None = None
    projections: dict[str, np.ndarray] = field(default_factory=dict)
    indices: np.ndarray | None = None  #: dataset indices of the batch (``cockpit.track(loader)``)
    dataset_size: int | None = None  #: len of the tracked loader's dataset (``cockpit.track(loader)``)
    #: per-layer per-sample gradient views (``Need.PER_SAMPLE_CROSS``), between backward and the step
    views: list | None = None
    #: the per-sample engine of the run (``Need.PER_SAMPLE_CROSS``): ``engine.probe(...)`` gives the
    #: views of another batch (TracIn's probes) through the same capture code
    engine: Any = None
    loss_fn: torch.nn.Module | None = None  #: the loss module the cockpit watches
    logdir: str | None = None  #: the run's log directory, if any
    #: why something is missing this step, written by providers (``note_needs[k]``: the needs note k concerns)
    notes: tuple[str, ...] = ()
    note_needs: tuple[frozenset, ...] = ()
    #: values of needs served by providers without a field of their own, by need name
    provided: dict[str, Any] = field(default_factory=dict)
    _update_norms: Mapping[str, float] | None = field(default=None, repr=False)
    #: the step's :class:`cockpit_lite.host.HostBatch`: norms and per-sample vectors wait there for one
    #: transfer (providers and instruments hand it device tensors; see cockpit_lite/host.py)
    host: HostBatch = field(init=False, repr=False)
    #: whether instruments are reading it (assignments raise): see :meth:`seal`
    SEALED: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.host = HostBatch(self)

    def seal(self, sealed: bool = True) -> None:
        """Make the record read-only (``sealed``) or writable again: a sealed record is a
        :class:`SealedStepRecord`, whose assignments raise (a writable one assigns at C speed)."""
        object.__setattr__(self, "__class__", SealedStepRecord if sealed else StepRecord)

    def add_note(self, text: str, needs: frozenset = frozenset()) -> None:
        """(Providers) record why something of ``needs`` is missing this step."""
        if text not in self.notes:
            self.notes = (*self.notes, text)
            self.note_needs = (*self.note_needs, frozenset(needs))

    def get(self, need: str, default: Any = None) -> Any:
        """The value a provider computed for ``need`` (built-in needs have fields of their own)."""
        return self.provided.get(need, default)

    @staticmethod
    def global_norm(norms: Mapping[str, float] | None) -> float | None:
        if norms is None:
            return None
        return math.hypot(*norms.values())

    @property
    def grad_norm(self) -> float | None:
        return self.global_norm(self.grad_norms)

    @property
    def update_norms(self) -> Mapping[str, float] | None:
        """||d|| per tensor, computed once per step for every instrument that asks (the update provider
        hands them to the step's host batch)."""
        if self.update is None:
            return None
        if self._update_norms is None:
            names = list(self.update)
            norms = distributed.norms([self.update[n] for n in names])
            self._update_norms = dict(zip(names, norms, strict=True))
        return self._update_norms


class SealedStepRecord(StepRecord):
    """A :class:`StepRecord` while instruments read it: assigning a field raises."""

    SEALED = True

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "_update_norms":  # (the norms of the update, computed once on first read)
            raise SealedRecordError(
                f"the step record is read-only for instruments (tried to set {name!r}): return records "
                "{tag: value} from compute(), and call self.note(text) to say why a number is missing"
            )
        object.__setattr__(self, name, value)
