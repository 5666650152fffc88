"""The contract between the core and an instrument.

An instrument is a small stateful object (in the spirit of torchmetrics): it declares what it needs
for a step, receives a read-only :class:`~cockpit_lite.step.StepRecord` once the step is complete, and
returns records ``{tag: value}``. The core knows no concrete instrument.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from cockpit_lite.needs import Need, Needs
from cockpit_lite.step import StepRecord

if TYPE_CHECKING:
    from cockpit_lite.panels import Panel

Schedule = Callable[[int], bool]
#: a summary line: ``(tag, label)``, or a callable ``fn(history, tag) -> list[str]`` (``tag`` prefixes a
#: tag with the instance's ``name=``) for anything a pair cannot say
SummaryItem = tuple[str, str] | Callable[[Any, Callable[[str], str]], Sequence[str]]


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@functools.cache
def default_key(cls: type) -> str:
    """The key of an unnamed instance of the instrument class ``cls``: ``cls.KEY`` or the snake-case
    class name."""
    return getattr(cls, "KEY", None) or _snake(cls.__name__)


class Instrument:
    """Base class of every instrument.

    Args:
        every: track every ``every``-th step (step 0 included).
        schedule: a callable ``schedule(step) -> bool``; overrides ``every``.
        name: a prefix for this instance's tags, needed only to run two instances of one instrument.

    Subclasses set :attr:`NEEDS` (or override :meth:`requires`) and implement :meth:`compute`.
    Hook names say when they fire: :meth:`on_attach` once, :meth:`on_after_backward` when backward
    is done, :meth:`on_before_step` with the gradients the optimizer will use, :meth:`on_after_step`
    once it has stepped, :meth:`compute` when the step's numbers are on the host (after the optimizer
    step; during the next step with ``Cockpit(..., overlap=True)``), :meth:`on_close` at the end.
    Keep what :meth:`compute` needs of a step on the record or in host values: with ``overlap=True``
    the next step's forward runs (and ``p.grad`` may change) before it.

    Presentation is declared at class level, so it works from the class alone (a saved run is shown
    by the registered classes whose :attr:`TAGS` occur on disk; ``cockpit_lite.presentation``):
    :attr:`TAGS`, :attr:`PANELS`, :attr:`CHARTS`, :attr:`SUMMARY`, :attr:`ORDER`. Tags are written
    without the ``name=`` prefix; the presentation of a named instance is prefixed for it.
    """

    #: what it needs on the steps it tracks (an instance whose options change it sets its own in ``__init__``)
    NEEDS: ClassVar[frozenset[Need]] = frozenset()
    #: whether its ``on_after_backward``/``on_before_step``/``on_after_step`` read values the providers
    #: filled at that event (``record.loss``, per-sample losses): the step's host batch is then flushed
    #: before the hook, one transfer more; False lets them reach the host after the step with the others
    #: (norms such as ``record.grad_norms`` are read lazily either way: cockpit_lite/host.py)
    READS_VALUES_IN_HOOKS: ClassVar[bool] = True

    #: the tags this instrument writes: ``{tag or regular expression (matched against the whole tag):
    #: meaning}``. Tags no instrument declares get a generic panel, chart and summary line.
    TAGS: ClassVar[Mapping[str, str]] = {}
    #: dashboard panels (:class:`cockpit_lite.panels.Panel` objects: ``LinePanel``, ``QuantilePanel``
    #: or a subclass of ``Panel`` of your own); panels of equal key from several instruments are drawn once
    PANELS: ClassVar[Sequence[Panel]] = ()
    #: TensorBoard Custom Scalars charts: ``{category: {chart title: ["Multiline", [tag regexes]] or
    #: ["Margin", [value tag, lower tag, upper tag]]}}``
    CHARTS: ClassVar[Mapping[str, Mapping[str, list]]] = {}
    #: ``cockpit-lite summary`` lines: ``(tag, label)`` pairs (the last value of the tag) and callables
    #: ``fn(history, tag) -> list[str]`` (see :data:`SummaryItem`); the first pair is also the
    #: instrument's headline in the dashboard's run summary
    SUMMARY: ClassVar[Sequence[SummaryItem]] = ()
    #: where this instrument's panels, charts and summary lines go among the others (built-ins 10 to
    #: 90, the cost panels 100; instruments of the same order keep the run's order)
    ORDER: ClassVar[float] = 500.0
    #: for a built-in instrument (defined in ``cockpit_lite``): whether a dashboard of a run without it
    #: still shows its panels, saying "not tracked: add ..." (the core grid does; specialised
    #: instruments set False and appear only in runs that have them)
    PLACEHOLDER: ClassVar[bool] = True
    #: the key of an instance without ``name=`` (default: the class name in snake case); the core
    #: files this instrument's notes under ``note/<key>`` and its cost under ``cost/<key>_ms``
    KEY: ClassVar[str | None] = None

    def __init__(self, every: int = 1, schedule: Schedule | None = None, name: str | None = None):
        #: every step is due (``every=1``, no schedule): the driver then need not ask (see ``Step``)
        self._every_step = schedule is None and every == 1
        if schedule is None:
            if not isinstance(every, int) or isinstance(every, bool) or every < 1:
                raise ValueError(f"{type(self).__name__}: every={every!r} must be a positive integer")
            self._schedule: Schedule = lambda step, n=every: step % n == 0
        elif callable(schedule):
            self._schedule = schedule
        else:
            raise TypeError(f"{type(self).__name__}: schedule must be callable step -> bool, got {schedule!r}")
        self.every = every
        self.name = name

    # --- identity -----------------------------------------------------------------------------------
    @property
    def key(self) -> str:
        """Unique key of this instance within one cockpit."""
        return self.name or default_key(type(self))

    def tag(self, tag: str) -> str:
        """The tag under which a record is stored (prefixed by ``name`` if one was given)."""
        return f"{self.name}/{tag}" if self.name else tag

    # --- scheduling ---------------------------------------------------------------------------------
    #: set by :meth:`gate`: a second say over the steps this instrument tracks (an overhead budget)
    _gate: Schedule | None = None

    def due(self, step: int) -> bool:
        """Whether its own ``every``/``schedule`` asks for ``step`` (whatever a gate says)."""
        return bool(self._schedule(step))

    def scheduled(self, step: int) -> bool:
        """Whether this instrument tracks ``step``: it is due and, if gated, the gate allows it."""
        return self.due(step) and (self._gate is None or bool(self._gate(step)))

    def gate(self, allows: Schedule | None) -> None:
        """Narrow the schedule: track only the steps where ``allows(step)`` agrees too (the overhead
        budget, :mod:`cockpit_lite.budget`, gates every instrument); None lifts the gate."""
        self._gate = allows

    def requires(self, step: int) -> Needs:
        """What this instrument needs at ``step``; empty when it does not track the step."""
        return Needs(set(self.NEEDS)) if self.scheduled(step) else Needs()

    # --- lifecycle hooks ----------------------------------------------------------------------------
    def on_attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called once when the cockpit attaches, before the first step."""

    def on_after_backward(self, record: StepRecord) -> None:
        """Called when ``loss.backward()`` has finished, before the loop can modify ``p.grad``
        (e.g. clip it). Only for steps this instrument requires."""

    def on_before_step(self, record: StepRecord) -> None:
        """Called in the optimizer's step pre-hook of a step this instrument requires.

        ``p.grad`` holds the gradient the optimizer is about to use; parameters are still theta_t.
        """

    def on_after_step(self, record: StepRecord) -> None:
        """Called in the optimizer's step post-hook of a step this instrument requires, after the
        providers' work there (``record.update`` holds theta_{t+1} - theta_t): for device work on the step's
        tensors that must not wait for :meth:`compute` (with ``Cockpit(..., overlap=True)`` that runs
        during the next step, after the next forward)."""

    def compute(self, record: StepRecord) -> Mapping[Any, Any]:
        """Return this step's records ``{tag: value}`` (use :meth:`tag` for the keys)."""
        return {}

    def on_close(self) -> Mapping[str, Any]:
        """Called when the cockpit closes; may return final records (stored under the last step)."""
        return {}

    # --- notes ----------------------------------------------------------------------------------------
    def note(self, text: str) -> None:
        """Say why a number of this step is missing or NaN; the Cockpit writes it as the text record
        ``note/<key>`` with this step's records (instruments never change the step record)."""
        pending = self.__dict__.setdefault("_pending_notes", [])
        if text not in pending:
            pending.append(text)

    def take_notes(self) -> list[str]:
        """(The Cockpit) the notes made since the last call."""
        return self.__dict__.pop("_pending_notes", [])

    # --- state (resuming a run) -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything this instrument carries between steps, to resume a run from a checkpoint: tensors
        and Python numbers, strings, bools, None, lists, tuples and dicts of those, so that
        ``torch.load(..., weights_only=True)`` reads it back (numpy arrays and numpy scalars are
        refused there: convert them, ``torch.from_numpy(a.copy())``, ``float(x)``). Stateless
        instruments return ``{}``."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the next step continues as if never interrupted.
        Called after :meth:`on_attach` when the cockpit is built first (tensors may come from another
        device: place them like the parameters). A state that does not fit this instance's settings or
        model is either adapted (say how in the docstring) or refused with a ``ValueError`` naming the fix."""

    def verdicts(self) -> list[str]:
        """Plain-language statements about the run so far (for example a learning-rate verdict)."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(every={self.every}, name={self.name!r})"
