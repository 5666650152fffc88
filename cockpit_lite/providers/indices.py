"""Need.INDICES: the dataset indices of the step's examples, fed by ``cockpit.track(loader)``."""

from __future__ import annotations

import numpy as np

from cockpit_lite.needs import Need, Needs
from cockpit_lite.providers import register_provider
from cockpit_lite.providers.base import Context, LossCall, ModelCall, Provider
from cockpit_lite.step import StepRecord

NO_TRACK = "no dataset indices: iterate `for batch in cockpit.track(loader)` to record them"


@register_provider
class IndicesProvider(Provider):
    """``record.indices`` (positions in the tracked loader's dataset, one per example of the step, in
    the order of the model calls) and ``record.dataset_size``.

    Each model call takes the next ``batch`` indices of the loader batch last yielded, so a loader
    batch split into micro-batches (gradient accumulation) is followed; several loader batches in one
    step are joined."""

    PROVIDES = frozenset({Need.INDICES})

    def __init__(self, context: Context):
        super().__init__(context)
        self.batch_indices: np.ndarray | None = None
        self.dataset_size: int | None = None
        self.offset = 0

    def feed(self, indices: np.ndarray | None, dataset_size: int | None) -> None:
        """Called by ``cockpit.track()`` for every batch it yields."""
        self.batch_indices, self.dataset_size, self.offset = indices, dataset_size, 0

    def begin_step(self, record: StepRecord, needs: Needs) -> None:
        self.parts: list[np.ndarray] = []
        self.calls: list[int] = []
        self.problem: str | None = None

    def on_forward(self, record: StepRecord, call: ModelCall) -> None:
        if call.batch is not None:
            self._take(call.batch)
            self.calls.append(call.index)

    def on_loss(self, record: StepRecord, call: LossCall) -> None:
        if not self.parts and self.problem is None:  # a loss module without a model call seen
            pred = call.args[0] if call.args else next(iter(call.kwargs.values()))
            self._take(int(pred.shape[0]) if pred.dim() > 0 else 1)

    def _take(self, batch: int) -> None:
        idx = self.batch_indices
        if idx is None:
            self.problem = self.problem or NO_TRACK
        elif self.offset + batch > len(idx):
            self.problem = self.problem or (
                f"the model saw {batch} examples but the batch from cockpit.track() has {len(idx) - self.offset} "
                "left: dataset indices are skipped for this step"
            )
        else:
            self.parts.append(idx[self.offset : self.offset + batch])
            self.offset += batch

    def on_before_step(self, record: StepRecord) -> None:
        record.dataset_size = self.dataset_size
        if self.problem is not None:
            record.add_note(self.problem, self.PROVIDES)
        elif self.parts:
            parts = self.parts
            if record.reached and len(self.calls) == len(parts):  # calls backward never reached are no part
                parts = [part for part, c in zip(parts, self.calls, strict=True) if c in record.reached] or parts
            indices = np.concatenate(parts)
            if record.batch_size is None or len(indices) == record.batch_size:
                record.indices = indices
            else:
                record.add_note(
                    f"{len(indices)} dataset indices for {record.batch_size} examples: indices skipped for this step",
                    self.PROVIDES,
                )
