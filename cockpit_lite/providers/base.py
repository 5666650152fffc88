"""The provider contract: one provider computes one group of needs, once per step, for every
instrument that asked.

The Cockpit (the hook driver) turns PyTorch hooks into lifecycle events and sends each event to the
providers whose needs some instrument asked for this step, in registration order, then to the
instruments. A provider fills its part of the :class:`~cockpit_lite.step.StepRecord`; a need nobody
asked for costs nothing, because its provider receives no event that step.

Events, in the order they fire within one step (one ``optimizer.step()``):

    begin_step(record)          the step's first model forward begins (or the loss is the first thing seen)
    on_forward(record, call)    a model forward begins (one per micro-batch; ``call.batch``: its examples)
    on_output(record, call)     the model returned (``call.output``: a tensor, tuple, dict or ModelOutput)
    on_loss(record, call)       the loss module returned (``call``: module, args, kwargs, output)
    on_backward_root(record, roots)  ``backward()`` was called on ``roots`` (the loss the loop optimizes)
    on_backward_begin(record)   backward reached the model's outputs (``record.backward_scale`` is set)
    on_backward_end(record)     backward has finished; the loop has not touched ``p.grad`` yet
    on_before_step(record)      the optimizer's step pre-hook: ``p.grad`` as the optimizer gets it
    on_after_step(record)       the parameters are updated
    end_step()                  the step is over (also when abandoned); release what it held
    close()                     the cockpit closes
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from cockpit_lite import distributed
from cockpit_lite.host import host_float64  # noqa: F401 (providers import it from here)
from cockpit_lite.needs import Needs
from cockpit_lite.profiling import Costs
from cockpit_lite.step import StepRecord


@dataclass(frozen=True)
class LossCall:
    """One call of the loss module: what its forward hook saw. ``reaches``: True where backward from its
    output reaches the model for certain (its prediction is an output of the model, or the model's outputs
    carry no hook and the call's own output tells backward), None where only that backward can tell (a GAN's
    discriminator loss beside its generator loss: a gradient hook on the output marks it, and a backward
    that ends without reaching the model's outputs leaves it out)."""

    module: nn.Module
    args: tuple
    kwargs: Mapping[str, Any]
    output: Any
    reaches: bool | None = True
    #: where the prediction is a selection of rows of a model output (``out[mask]``: a loss over the examples
    #: that have labels; ``out.view(B T, V)[token_mask]``), the example each selected row belongs to
    #: (:func:`cockpit_lite.model_io.selected_rows`)
    rows: Any = None


@dataclass(frozen=True)
class ModelCall:
    """One call of the model: its inputs, the examples along their batch axis (axis 0 of the first
    tensor input), and (``on_output``) what it returned."""

    args: tuple
    kwargs: Mapping[str, Any]
    batch: int | None
    output: Any = None
    #: the call's position among the step's model calls (see ``StepRecord.reached``)
    index: int = 0


@dataclass(frozen=True)
class BackwardRoot:
    """``torch.autograd.backward(tensors, grad_tensors)`` as the loop called it (detached)."""

    tensors: tuple
    grad_tensors: tuple
    #: GradScaler's loss scale if the root is ``scaler.scale(loss)`` (divided out of everything), else 1
    scale: float = 1.0
    #: the roots' backward nodes (read, never run: e.g. the cross-entropy a root comes from)
    nodes: tuple = ()


@dataclass
class Context:
    """What every provider may know of the run (built once by the Cockpit)."""

    network: nn.Module  #: the user's module inside DDP/DataParallel/torch.compile wrappers
    optimizer: torch.optim.Optimizer
    params: dict[str, nn.Parameter]  #: the trainable parameters the optimizer holds, by name
    loss_fn: Any  #: a loss module, a callable giving per-sample losses, or None
    costs: Costs = field(default_factory=Costs)
    #: how the loss reduces over examples when no loss module says: "mean" (p.grad = mean_i g_i) or "sum"
    reduction: str = "mean"
    #: issue a CockpitWarning once per distinct message
    warn: Callable[[str], None] = print
    #: the overhead budget's fraction (None: no budget). Under a budget the budget alone chooses the steps
    #: a statistic is computed on, from what it measured them to cost: a provider then serves what is asked
    #: on every step it is asked, without a thinning of its own that the budget's measurements would miss
    budget: float | None = None
    #: the model runs under torch.compile (its compiled code guards on the layer hooks: they stay in place)
    compiled: bool = False

    @functools.cached_property
    def sharded(self) -> bool:
        """Whether the parameters are FSDP2 shards (DTensors; ``fully_shard`` comes before the cockpit)."""
        return any(distributed.is_sharded(p) for p in self.params.values())


class Provider:
    """Base class of every provider. Subclasses set :attr:`PROVIDES` (the needs they compute) and
    override the events they use; :attr:`USES` names needs of other providers they read from the
    record (those providers are then active too, and run first)."""

    PROVIDES: ClassVar[frozenset[str]] = frozenset()
    USES: ClassVar[frozenset[str]] = frozenset()
    #: runs at every tracked step, asked for or not (it must cost next to nothing)
    ALWAYS: ClassVar[bool] = False
    #: events reach providers with a lower ORDER first (after the providers they USE)
    ORDER: ClassVar[int] = 100
    #: nothing to do in this run, whatever is asked (set at construction, e.g. the distributed provider
    #: of a single process): no step runs it
    idle: bool = False

    def __init__(self, context: Context):
        self.context = context

    def begin_step(self, record: StepRecord, needs: Needs) -> None:
        """A step begins; ``needs`` is everything the scheduled instruments asked for."""

    def params_changed(self) -> None:
        """The trainable parameters the optimizer holds changed between steps (``requires_grad`` turned on or
        off, a parameter group added): ``context.params`` holds the new ones from the next step on."""

    def rest_step(self) -> None:
        """A step begins that this provider has no part in (nothing asked of it): no other event of the step
        reaches it. A provider that keeps hooks of its own may take them off after a few."""

    def on_forward(self, record: StepRecord, call: ModelCall) -> None:
        """A model forward begins (the first of a step, or the next micro-batch's)."""

    def on_output(self, record: StepRecord, call: ModelCall) -> None:
        """The model returned ``call.output``."""

    def on_loss(self, record: StepRecord, call: LossCall) -> None:
        """The loss module returned."""

    def on_backward_root(self, record: StepRecord, root: BackwardRoot) -> None:
        """``backward()`` was called (before autograd runs)."""

    def on_backward_begin(self, record: StepRecord) -> None:
        """Backward reached the loss (``record.backward_scale`` holds the factor it started from)."""

    def on_backward_end(self, record: StepRecord) -> None:
        """Backward has finished; ``p.grad`` holds this backward's gradient."""

    def on_before_step(self, record: StepRecord) -> None:
        """The optimizer is about to step; ``p.grad`` is what it receives."""

    def on_after_step(self, record: StepRecord) -> None:
        """The optimizer has stepped; parameters are theta_{t+1}."""

    def end_step(self) -> None:
        """The step is over (completed, or abandoned: a step with a closure); drop what it held."""

    def close(self) -> None:
        """The cockpit closes: remove hooks, release memory."""
