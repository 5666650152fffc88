"""TensorBoard sink: every record as a TensorBoard summary in ``logdir``.

    Cockpit(..., sinks=[TensorBoard("runs/exp1")])      # then: tensorboard --logdir runs

What goes where (docs/tensorboard.md):

- numbers -> scalars under their tag (``loss``, ``grad_norm/<param>``, ``clip/global/norm``, ...);
- 1-D arrays (per-sample vectors such as ``persample/grad_norm``) -> histograms with ``hist_bins``
  equal-width bins over the values' range;
- strings (``verdict/lr``) -> text, written when it changes;
- dict tables (TracIn top lists) -> text, as a markdown table;
- the dashboard figure -> an image ``dashboard`` every ``image_every`` tracked steps (and at close);
- a custom-scalars layout (the "Custom Scalars" tab) arranged like the dashboard, assembled from the
  charts the instruments declare (:mod:`cockpit_lite.presentation`), written at open and again, under
  the latest step, when tags that need other charts appear (TensorBoard shows the latest).

Scalars and histograms of one step go into ONE event (one ``Summary`` with many values), which a
reader sees exactly as ``add_scalar``/``add_histogram`` calls (the same old-style ``simple_value`` and
``histo`` protos; never ``new_style``, which EventAccumulator does not see, and never ``add_scalars``,
which makes a run per key). Text, custom-scalars layout and image summaries are built with
``torch.utils.tensorboard.summary``. The file is written by :class:`~cockpit_lite.sinks.events.EventFile`
rather than ``SummaryWriter``, whose pure-Python CRC in a background thread cost about 3 ms per step
(docs/performance.md, "Sinks"). Each step's events are handed to the OS as the step is written (a
``write`` call, no ``fsync``), so a killed or crashed process loses at most the step in progress; a
full or failing disk never stops training (docs/tensorboard.md, "Durability and cost").
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from cockpit_lite.errors import CockpitWarning
from cockpit_lite.sinks.base import HistorySink, RunContext
from cockpit_lite.sinks.events import EventFile, SummaryEncoder, encode_event
from cockpit_lite.sinks.throttle import Throttle

IMAGE_TAG = "dashboard"


#: ``layout=AUTO`` (the default): the layout the run's instruments declare (cockpit_lite.presentation)
AUTO = "auto"


def markdown_table(table: Mapping[str, Any], max_rows: int = 50) -> str:
    """A dict of equal-length columns (or of scalars) as a markdown table."""
    cols = {str(k): np.atleast_1d(np.asarray(v)) for k, v in table.items()}
    if not cols:
        return "(empty table)"
    n = max(len(c) for c in cols.values())

    def cell(c: np.ndarray, i: int) -> str:
        if i >= len(c):
            return ""
        x = c[i]
        return f"{float(x):.6g}" if isinstance(x, (float, np.floating)) else str(x)

    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    rows += ["| " + " | ".join(cell(c, i) for c in cols.values()) + " |" for i in range(min(n, max_rows))]
    if n > max_rows:
        rows.append(f"\n({n - max_rows} more rows not shown)")
    return "\n".join(rows)


def histogram_buckets(values: np.ndarray, bins: int) -> tuple | None:
    """``(min, max, num, sum, sum_squares, bucket_limit, bucket)`` of a histogram with exactly ``bins``
    equal-width buckets over [min, max] of the finite values (None if there are none): with
    w = (max - min) / bins, value v falls in bucket min(floor((v - min) / w), bins - 1). Equal values
    get the range [v - 0.5, v + 0.5] (as ``np.histogram``). TensorBoard reads bucket i as
    (limit[i-1], limit[i]] with the first left edge ``min`` and the last right edge ``max``."""
    v = np.asarray(values, dtype=np.float64).ravel()
    finite = np.isfinite(v)
    if not finite.all():
        v = v[finite]
    if not v.size:
        return None
    lo, hi = float(v.min()), float(v.max())
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    w = (hi - lo) / bins
    idx = ((v - lo) / w).astype(np.intp)
    np.minimum(idx, bins - 1, out=idx)
    counts = np.bincount(idx, minlength=bins).astype(np.float64)
    limits = lo + w * np.arange(1, bins + 1)
    limits[-1] = hi
    return lo, hi, float(v.size), float(v.sum()), float(v @ v), limits, counts


class TensorBoard(HistorySink):
    """Write the records as TensorBoard summaries (event files) into ``logdir``.

    Args:
        logdir: the run directory (``tensorboard --logdir`` its parent to compare runs).
        hist_bins: buckets per histogram of a per-sample vector (default 30; TensorBoard's own
            default would be 1549 edges).
        image_every: write the dashboard figure as an image every this many tracked steps (default
            200; ``None`` or 0: never, not even at close).
        image_min_s: and at least this many seconds apart (default 60). If the
            cockpit also has a Dashboard sink, its latest picture is reused instead of drawing again.
        image_max_share: never spend more than this fraction of the training time drawing images
            (default 0.01; ``None``: no guard).
        flush_secs: 0 (default): every step's events leave the process when written; a positive value
            holds them in memory up to that many seconds (a crash loses at most this much).
            :meth:`flush` and :meth:`close` flush at once.
        layout: the custom-scalars layout: ``"auto"`` (default) assembles it from the charts the run's
            instruments declare, with a generic chart per group of scalar tags nobody declares; a dict
            ``{category: {chart: ["Multiline", [regexes]] or ["Margin", [v, lo, hi]]}}`` is written as
            given; ``None`` writes none.
    """

    def __init__(
        self,
        logdir: str | os.PathLike,
        hist_bins: int = 30,
        image_every: int | None = 200,
        image_min_s: float = 60.0,
        image_max_share: float | None = 0.01,
        flush_secs: float = 0.0,
        layout: Mapping[str, Mapping[str, list]] | str | None = AUTO,
    ):
        if not isinstance(hist_bins, int) or hist_bins < 1:
            raise ValueError(f"hist_bins={hist_bins!r} must be a positive integer")
        self.logdir = os.fspath(logdir)
        self.hist_bins, self.image_every, self.image_min_s = hist_bins, image_every, image_min_s
        self.image_max_share = image_max_share
        if isinstance(layout, str) and layout != AUTO:
            raise ValueError(f"layout={layout!r}: use 'auto', a dict of charts, or None")
        self.flush_secs, self.layout = flush_secs, layout
        self._presenter = None
        self._written_layout: dict | None = None
        self._tags_seen = 0
        self.writer: EventFile | None = None
        self._dropped_at_close = 0
        self._encoder = SummaryEncoder()
        self._figure = None
        self._texts: dict[str, str] = {}
        self._throttle: Throttle | None = None
        self._last_step: int | None = None
        self._image_step: int | None = None

    # --- lifecycle ------------------------------------------------------------------------------------
    def open(self, cockpit: RunContext | None) -> None:
        self._use_history(cockpit)
        if self.writer is None:
            self.writer = EventFile(self.logdir, flush_secs=self.flush_secs)
            if self.layout == AUTO:
                from cockpit_lite.presentation import Presenter

                self._presenter = Presenter(self.context.instruments)
                self._tags_seen = len(self.history)
                self._write_layout(self._presenter(self.history).charts, 0)
            elif self.layout:
                self._write_layout(dict(self.layout), 0)
        if self.image_every:
            self._throttle = Throttle(self.image_every, self.image_min_s, self.image_max_share)

    def write(self, step: int, records: Mapping[str, Any]) -> None:
        if self.writer is None:
            self.open(None)
        self._remember(step, records)
        enc, parts = self._encoder, []
        for tag, v in records.items():
            if v is None:
                continue
            if isinstance(v, (bool, int, float)):
                parts.append(enc.scalar(tag, float(v)))
            elif isinstance(v, np.ndarray):
                if v.dtype.kind in "fiub" and v.size:
                    h = histogram_buckets(v, self.hist_bins)
                    if h is not None:
                        parts.append(enc.histogram(tag, *h))
            elif isinstance(v, str):
                self._text(tag, v, step)
            elif isinstance(v, Mapping):
                self._text(tag, markdown_table(v), step)
        if parts and step >= 0:
            self.writer.write_serialized(encode_event(int(step), time.time(), b"".join(parts)))
        new_step = self._last_step is None or step > self._last_step
        if new_step:
            self._last_step = step
        if self._presenter is not None and len(self.history) != self._tags_seen:
            self._tags_seen = len(self.history)  # new tags: they may need charts the layout lacks
            charts = self._presenter(self.history).charts
            if charts != self._written_layout:
                self._write_layout(charts, self._last_step)
        if new_step and self._throttle is not None and self._throttle.tick():
            self.image(step)

    def _write_layout(self, charts: Mapping[str, Mapping[str, list]], step: int) -> None:
        """Write the custom-scalars layout under ``step`` (never an earlier step than the latest one
        written: TensorBoard would drop the events after it)."""
        from torch.utils.tensorboard.summary import custom_scalars

        self._written_layout = {c: {t: [k, list(v)] for t, (k, v) in spec.items()} for c, spec in charts.items()}
        self.writer.add_summary(custom_scalars(self._written_layout), max(int(step), 0))
        self.writer.flush()

    def _text(self, tag: str, text: str, step: int) -> None:
        if self._texts.get(tag) != text:  # verdicts repeat step after step: write changes only
            from torch.utils.tensorboard.summary import text as text_summary

            self._texts[tag] = text
            self.writer.add_summary(text_summary(tag, text), step)  # tag "<tag>/text_summary", like add_text

    def image(self, step: int) -> None:
        """Write the dashboard figure of the history so far as the image ``dashboard`` at ``step``."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        t0 = time.perf_counter()
        try:
            shared = self.context.picture
            newer = self._image_step if self._image_step is not None else -math.inf
            if shared.latest is not None and shared.latest[0] > newer:
                step, png = shared.latest  # another sink (the Dashboard) drew a newer picture: reuse it
            else:
                if self._figure is None:
                    from cockpit_lite.figure import DashboardFigure

                    self._figure = DashboardFigure(dpi=80, instruments=self.context.instruments)
                png = self._figure.png(self.history)
            w, h = _png_size(png)
            img = Summary.Image(height=h, width=w, colorspace=4, encoded_image_string=png)
            self.writer.add_summary(Summary(value=[Summary.Value(tag=IMAGE_TAG, image=img)]), step)
            self._image_step = step
        except Exception as e:
            warnings.warn(
                f"cockpit-lite: the dashboard image for TensorBoard failed ({type(e).__name__}: {e})",
                CockpitWarning,
                stacklevel=2,
            )
        finally:
            if self._throttle is not None:
                self._throttle.done(time.perf_counter() - t0)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is None:
            return
        writer = self.writer
        try:
            if self.image_every and self._last_step is not None and self._image_step != self._last_step:
                self.image(self._last_step)
        finally:
            self.writer = None
            try:
                writer.close()
            finally:
                self._dropped_at_close = writer.dropped

    @property
    def dropped(self) -> int:
        """Events dropped because the disk failed and the bounded queue was full."""
        return self.writer.dropped if self.writer is not None else self._dropped_at_close


def _png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
