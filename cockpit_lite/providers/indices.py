"""Need.INDICES: the dataset indices of the batch, fed by ``cockpit.track(loader)``."""

from __future__ import annotations

import numpy as np

from cockpit_lite.needs import Need, Needs
from cockpit_lite.providers import register_provider
from cockpit_lite.providers.base import Context, LossCall, Provider
from cockpit_lite.step import StepRecord

NO_TRACK = "no dataset indices: iterate `for batch in cockpit.track(loader)` to record them"


@register_provider
class IndicesProvider(Provider):
    """``record.indices`` (positions in the tracked loader's dataset) and ``record.dataset_size``."""

    PROVIDES = frozenset({Need.INDICES})
    USES = frozenset({Need.LOSS})  # the batch size, to match the indices to the batch

    #: the indices of the batch last yielded by ``cockpit.track()`` and the dataset's length
    batch_indices: np.ndarray | None = None
    dataset_size: int | None = None

    def __init__(self, context: Context):
        super().__init__(context)
        self.batch_indices, self.dataset_size = None, None

    def feed(self, indices: np.ndarray | None, dataset_size: int | None) -> None:
        """Called by ``cockpit.track()`` for every batch it yields."""
        self.batch_indices, self.dataset_size = indices, dataset_size

    def begin_step(self, record: StepRecord, needs: Needs) -> None:
        self.done = False

    def on_loss(self, record: StepRecord, call: LossCall) -> None:
        if self.done:
            return
        self.done = True
        idx, batch = self.batch_indices, record.batch_size
        record.dataset_size = self.dataset_size
        if idx is None:
            record.add_note(NO_TRACK, self.PROVIDES)
        elif len(idx) != batch:
            record.add_note(
                f"the last batch from cockpit.track() holds {len(idx)} examples but the loss saw {batch}: "
                "dataset indices are skipped for this step",
                self.PROVIDES,
            )
        else:
            record.indices = idx
