"""``cockpit.track(loader)``: the same batches as the loader, plus the dataset indices of each batch.

How: for one pass over a ``torch.utils.data.DataLoader``, the loader's index sampler (its
``batch_sampler``, or its ``sampler`` when ``batch_size=None``) is wrapped in a recorder that passes
every item through unchanged and remembers it. The recorder is installed only while the loader builds
its iterator, so

- the sampler is iterated exactly once, at the moment the bare loader would iterate it: the random
  numbers drawn (shuffling, the workers' base seed) and hence the batches are identical to the bare
  loader's given the same seed;
- every sampler, batch sampler, ``drop_last``, ``Subset``, custom ``collate_fn`` and worker count is
  served, because nothing but the stream of indices is observed. With ``num_workers > 0`` the main
  process sends index lists to the workers ahead of time and receives the batches back in the same
  order (``in_order=True``, the default), so the recorded index lists are matched to batches first in,
  first out. With ``in_order=False`` batches may arrive out of order: indices are then not recorded.

Indices are positions in ``loader.dataset`` (``loader.dataset[i]`` is the example). With
``resolve_subsets=True`` positions in (nested) ``torch.utils.data.Subset`` datasets are mapped to the
underlying dataset, and the dataset size reported is the underlying dataset's length.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, Subset

from cockpit_lite.compat import dataloader_iterator, set_index_sampler
from cockpit_lite.errors import CockpitWarning

#: ``feed(indices, dataset_size)``: told the dataset indices of each batch before it is yielded
Feed = Callable[[np.ndarray | None, int | None], None]


class _Recorder:
    """Wraps an index sampler; each item it yields is appended to ``queue`` and passed on unchanged."""

    def __init__(self, inner: Iterable, queue: deque):
        self.inner, self.queue = inner, queue

    def __iter__(self) -> Iterator:
        return _RecordingIterator(iter(self.inner), self.queue)  # iter(inner) now, as the bare loader would

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # e.g. sampler.batch_size, set_epoch
        return getattr(self.inner, name)


class _RecordingIterator:
    def __init__(self, it: Iterator, queue: deque):
        self.it, self.queue = it, queue

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> Any:
        item = next(self.it)
        self.queue.append(item)
        return item


class _PassRecorder(_Recorder):
    """A recorder that starts a fresh queue at every pass (``iter()``): index lists a pass drew but no
    batch of it was received for (a pass abandoned at the end of training) are no part of the next."""

    def __iter__(self) -> Iterator:
        self.queue.clear()
        return super().__iter__()


def _as_indices(item: Any) -> np.ndarray | None:
    try:
        idx = np.asarray(item)
    except Exception:
        return None
    if idx.dtype.kind not in "iu":
        return None
    return idx.reshape(-1).astype(np.int64)


def _subset_chain(dataset: Any) -> tuple[list[np.ndarray], Any]:
    maps = []
    while isinstance(dataset, Subset):
        maps.append(np.asarray(dataset.indices, dtype=np.int64))
        dataset = dataset.dataset
    return maps, dataset


def root_indices(dataset: Any, idx: np.ndarray) -> np.ndarray:
    """Map positions in ``dataset`` through nested ``Subset`` wrappers to the underlying dataset."""
    maps, _ = _subset_chain(dataset)
    for m in maps:
        idx = m[idx]
    return idx


def _dataset_size(dataset: Any, resolve_subsets: bool) -> int | None:
    if resolve_subsets:
        dataset = _subset_chain(dataset)[1]
    try:
        return len(dataset)
    except TypeError:
        return None


def sampling_loader(loader: Any) -> Any:
    """The torch ``DataLoader`` that draws the indices inside adapters that hold it as ``base_dataloader``
    (accelerate's ``DataLoaderShard``, ``SkipDataLoader``, ``DataLoaderDispatcher``); ``loader`` itself
    otherwise."""
    for _ in range(8):
        inner = vars(loader).get("base_dataloader") if hasattr(loader, "__dict__") else None
        if inner is None:
            break
        loader = inner
    return loader


def install_recorder(loader: DataLoader, queue: deque, fresh_each_pass: bool = False) -> Callable[[], None]:
    """Replace the index sampler of ``loader`` (and of its persistent-workers iterator, if it has one) by a
    recorder that appends every item it yields to ``queue``, for every iterator built until the returned
    function is called, which puts the sampler back. ``fresh_each_pass``: each pass (``iter()``) first
    empties ``queue``, dropping index lists drawn ahead for batches a cut-short pass never yielded."""
    attr = "batch_sampler" if loader.batch_sampler is not None else "sampler"
    original = getattr(loader, attr)
    recorder = (_PassRecorder if fresh_each_pass else _Recorder)(original, queue)
    object.__setattr__(loader, attr, recorder)  # DataLoader forbids plain assignment after init
    kept = dataloader_iterator(loader)
    if kept is not None:
        set_index_sampler(kept, recorder)

    def remove() -> None:
        object.__setattr__(loader, attr, original)
        for it in {id(i): i for i in (kept, dataloader_iterator(loader)) if i is not None}.values():
            set_index_sampler(it, original)

    return remove


def _untracked(feed: Feed, loader: Iterable, why: str) -> Iterator:
    warnings.warn(
        f"cockpit-lite: cockpit.track(): {why}; batches pass unchanged without indices", CockpitWarning, stacklevel=3
    )
    for batch in loader:
        feed(None, None)
        yield batch


def track(feed: Feed, loader: Iterable, resolve_subsets: bool = False) -> Iterator:
    """Yield the batches of ``loader`` (one pass) and call ``feed(indices, dataset_size)`` before each.

    Args:
        feed: receives the dataset indices of each batch (None when unknown) and the dataset's length;
            ``cockpit.track(loader)`` passes the indices provider's.
        loader: a map-style ``torch.utils.data.DataLoader``. Anything else (an ``IterableDataset``
            loader, a list of batches) is passed through unchanged, with a warning, and no indices.
        resolve_subsets: report indices into the dataset beneath any ``Subset`` wrappers instead of
            positions in ``loader.dataset``.
    """
    if not isinstance(loader, DataLoader):
        yield from _untracked(feed, loader, f"{type(loader).__name__} is not a torch DataLoader")
        return
    if isinstance(loader.dataset, IterableDataset):
        yield from _untracked(feed, loader, "an IterableDataset has no dataset indices")
        return
    if loader.num_workers > 0 and not getattr(loader, "in_order", True):
        yield from _untracked(feed, loader, "with in_order=False batches may arrive out of order")
        return

    queue: deque = deque()
    base = sampling_loader(loader)
    if base is not loader:  # an adapter builds the torch iterator lazily, at its first batch: record the pass
        yield from _tracked_pass(feed, loader, base, queue, resolve_subsets)
        return
    auto = loader.batch_sampler is not None
    attr = "batch_sampler" if auto else "sampler"
    original = getattr(loader, attr)
    recorder = _Recorder(original, queue)
    persistent = loader.persistent_workers and loader.num_workers > 0 and dataloader_iterator(loader) is not None
    # install the recorder only while the loader builds (or, persistent workers, resets) its iterator:
    # the iterator keeps the sampler it saw; the loader itself is left as it was
    if persistent:
        set_index_sampler(dataloader_iterator(loader), recorder)
    else:
        object.__setattr__(loader, attr, recorder)  # DataLoader forbids plain assignment after init
    try:
        it = iter(loader)
    finally:
        object.__setattr__(loader, attr, original)
    if persistent or (loader.persistent_workers and loader.num_workers > 0):
        set_index_sampler(it, original)  # later untracked epochs of a persistent iterator record nothing

    size = _dataset_size(loader.dataset, resolve_subsets)
    try:
        for batch in it:
            item = queue.popleft() if queue else None
            idx = _as_indices(item)
            if idx is not None and resolve_subsets:
                idx = root_indices(loader.dataset, idx)
            feed(idx, size)
            yield batch
    finally:
        feed(None, size)


def _tracked_pass(feed: Feed, loader: Any, base: DataLoader, queue: deque, resolve_subsets: bool) -> Iterator:
    """One pass over an adapter around ``base``, the recorder installed on ``base`` for the whole pass."""
    remove = install_recorder(base, queue)
    size = _dataset_size(base.dataset, resolve_subsets)
    skip = int(vars(loader).get("skip_batches", 0) or 0)  # accelerate's SkipDataLoader drops batches it drew
    try:
        for batch in loader:
            while skip and queue:
                queue.popleft()
                skip -= 1
            idx = _as_indices(queue.popleft() if queue else None)
            if idx is not None and resolve_subsets:
                idx = root_indices(base.dataset, idx)
            feed(idx, size)
            yield batch
    finally:
        remove()
        feed(None, size)


class LoaderTap:
    """The dataset indices of the batches a DataLoader yields to a loop that iterates it itself (a
    framework's fit loop, which the user cannot wrap in :func:`track`).

    While the tap is open the loader's index sampler is the recorder :func:`track` uses
    (:func:`install_recorder`), which passes every item through unchanged: the loader draws the same
    random numbers and yields the same batches as without it. Each pass over the loader (each
    ``iter(loader)``) starts a fresh queue of the index lists it draws, and :meth:`next_batch` hands them
    out first in, first out: call it once per batch the loop receives, before the batch's forward. With
    ``num_workers > 0`` index lists are drawn ahead of their batches and arrive in order
    (``in_order=True``, the default), so the queue still matches. :meth:`close` puts the loader's own
    sampler back.

    Open it before the loop builds its iterator (before ``iter(loader)``): index lists drawn earlier are
    not seen. ``fresh_each_pass=False`` keeps the queue across passes (for a loop that says itself when
    an epoch starts, and whose adapters may start another pass over the recorder mid-epoch).
    """

    def __init__(self, loader: Any, resolve_subsets: bool = False, fresh_each_pass: bool = True):
        self.loader, self.resolve_subsets = loader, resolve_subsets
        self.queue: deque = deque()
        #: why no indices are recorded (None: they are)
        self.why: str | None = None
        self.size: int | None = None
        self._remove: Callable[[], None] | None = None
        if not isinstance(loader, DataLoader):
            self.why = f"{type(loader).__name__} is not a torch DataLoader"
        elif isinstance(loader.dataset, IterableDataset):
            self.why = "an IterableDataset has no dataset indices"
        elif loader.num_workers > 0 and not getattr(loader, "in_order", True):
            self.why = "with in_order=False batches may arrive out of order"
        else:
            self._remove = install_recorder(loader, self.queue, fresh_each_pass=fresh_each_pass)
            self.size = _dataset_size(loader.dataset, resolve_subsets)

    def next_batch(self) -> tuple[np.ndarray | None, int | None]:
        """``(indices, dataset_size)`` of the next batch the loader yields (None when unknown)."""
        if self._remove is None:
            return None, None
        idx = _as_indices(self.queue.popleft()) if self.queue else None
        if idx is not None and self.resolve_subsets:
            idx = root_indices(self.loader.dataset, idx)
        return idx, self.size

    def close(self) -> None:
        """Put the loader's own index sampler back (also into a persistent-workers iterator)."""
        if self._remove is not None:
            self._remove()
            self._remove = None
        self.queue.clear()
