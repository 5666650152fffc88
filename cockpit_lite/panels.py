"""Dashboard panels: what an instrument declares to be drawn, and how each panel draws itself.

A panel is a small object an instrument declares at class level (``PANELS = (LinePanel(...),)``); the
dashboard (:mod:`cockpit_lite.figure`) copies it for each figure, hands it an axes (:meth:`Panel.attach`)
and calls :meth:`Panel.update` with the run's :class:`~cockpit_lite.records.History` whenever it redraws.
Nothing here imports matplotlib: a panel only calls methods of the axes it receives, so instruments
that declare panels import without it.

- :class:`LinePanel` draws scalar tags as lines (the simple case);
- :class:`QuantilePanel` draws a batch value with the per-sample quantile bands of the same quantity;
- subclass :class:`Panel` and implement :meth:`Panel.update` for any other drawing;
- :class:`VerdictsPanel`, :class:`CostBarsPanel`, :class:`CostTimePanel` show the core's own records
  (``verdict/...``, ``note/...``, ``cost/...``); :class:`GenericPanel` shows tags no instrument declares.
"""

from __future__ import annotations

import copy
import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MAX_POINTS = 3000  # longer series are thinned to at most this many points per line (the last kept)
NOTE_STYLE = dict(ha="center", va="center", fontsize=9, color="0.45", wrap=True)
COLORS = {"main": "C0", "second": "C1", "third": "C2", "band": "C0", "ref": "0.35", "alert": "C3"}
VERDICT = re.compile(r"(?:^|/)verdict/")


# --- reading the history ------------------------------------------------------------------------------
def as_float(v: Any) -> float:
    """``float(v)``, or NaN for anything that is no number."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def series(history: Any, tag: str, max_points: int | None = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a scalar tag as float arrays; empty if absent; thinned to ``max_points``."""
    if hasattr(history, "series"):
        return history.series(tag, max_points)
    from cockpit_lite.records import History  # a plain {tag: [(step, value), ...]} mapping

    h = History()
    for step, value in history.get(tag) or ():
        h.add(step, {tag: value})
    return h.series(tag, max_points)


def latest(history: Any, tag: str) -> tuple[int, Any] | None:
    """The last ``(step, value)`` of ``tag``, or None."""
    if hasattr(history, "latest"):
        return history.latest(tag)
    pairs = history.get(tag)
    return pairs[-1] if pairs else None


def wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.fill(par, width) for par in str(text).splitlines() or [""])


def set_yscale(ax, scale: str) -> None:
    """Linear or log; log axes get plain tick labels (0.2, 0.5, 1, 2, ...) rather than 2x10^-1."""
    if ax.get_yscale() == scale:
        return
    ax.set_yscale(scale)
    if scale == "log":
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=8))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())


def set_log_if_wide(ax, *arrays: np.ndarray, ratio: float = 30.0) -> None:
    """Log scale when the positive finite values span more than ``ratio``, else linear."""
    vals = np.concatenate([a[np.isfinite(a)] for a in arrays]) if arrays else np.empty(0)
    wide = vals.size > 0 and vals.min() > 0 and vals.max() / vals.min() > ratio
    set_yscale(ax, "log" if wide else "linear")


def note_box(ax, fontsize: float = 7.5):
    """A hidden text box in the top left corner of ``ax`` for a panel's short note (a verdict, the
    latest spike); show it with ``box.set_text(...)`` and ``box.set_visible(True)``."""
    box = ax.text(
        0.02,
        0.97,
        "",
        transform=ax.transAxes,
        ha="left",
        va="top",
        fontsize=fontsize,
        bbox=dict(boxstyle="round", facecolor="lightyellow", alpha=0.9, linewidth=0.5),
    )
    box.set_visible(False)
    return box


def top_rows(table: Mapping[str, Any], top: int) -> tuple[list, np.ndarray | None, str]:
    """Labels and values of the ``top`` largest rows of a dict-of-columns table.

    The value column is the first numeric one named like ``influence`` or ``score`` (else the last
    numeric one), the label column the first other one named like ``index``, ``id`` or ``sample``.
    """
    cols = {k: np.atleast_1d(np.asarray(v)) for k, v in table.items()}
    numeric = [k for k, v in cols.items() if v.dtype.kind in "fiu" and v.ndim == 1]
    if not numeric:
        return [], None, ""
    value_name = next((k for k in numeric if "influence" in k or "score" in k), numeric[-1])
    label_name = next((k for k in cols if k != value_name and any(w in k for w in ("index", "id", "sample"))), None)
    values = cols[value_name].astype(float)
    n = len(values)
    labels = cols[label_name] if label_name is not None and len(cols[label_name]) == n else np.arange(n)
    order = np.argsort(-np.nan_to_num(values, nan=-np.inf))[:top]
    prefix = f"{label_name} " if label_name else "#"
    return [f"{prefix}{labels[i]}" for i in order], values[order], value_name


# --- the base class -----------------------------------------------------------------------------------
class Panel:
    """One dashboard axes. Subclass it and implement :meth:`update` for a drawing of your own.

    Args:
        title: the panel's title.
        xlabel, ylabel: axis labels (x: "training step" unless given).
        missing: what the panel says when it has nothing to draw and its instrument is not in the run
            (default: "not tracked: add the <Instrument> instrument").
        key: the panel's identity (default: its title). Panels of the same key declared by several
            instruments are drawn once (GradNorm and UpdateSize share one panel).

    The dashboard copies the declared panel for each figure and then sets, before :meth:`attach`:
    ``prefix`` (an instrument's ``name=``; read tags through :meth:`tag`), ``owners`` (the names of the
    instruments that declare it), ``note_tags`` (their ``note/<key>`` tags), ``in_run`` (whether one of
    them is in the run) and ``order``. :meth:`update` draws from the history; :meth:`shows` puts the
    "nothing to draw" text (the latest note of its instrument, if any) in place of a drawing.
    """

    title: str = ""
    xlabel: str = "training step"
    ylabel: str = ""
    missing: str | None = None
    key: str = ""
    # set by the assembly (cockpit_lite.presentation)
    prefix: str = ""
    owners: tuple[str, ...] = ()
    note_tags: tuple[str, ...] = ()
    in_run: bool = False
    order: float = 500.0

    def __init__(
        self,
        title: str | None = None,
        *,
        xlabel: str | None = None,
        ylabel: str | None = None,
        missing: str | None = None,
        key: str | None = None,
    ) -> None:
        for name, value in (("title", title), ("xlabel", xlabel), ("ylabel", ylabel), ("missing", missing)):
            if value is not None:
                setattr(self, name, value)
        if key is not None:
            self.key = key

    # --- identity and copies ------------------------------------------------------------------------
    @property
    def ident(self) -> str:
        """The key that makes two declarations one panel: ``key``, else the title, else the class name."""
        return self.key or self.title or type(self).__name__

    def copy(self) -> Panel:
        """A fresh copy to attach to one figure's axes (declarations are shared by every figure)."""
        return copy.copy(self)

    def tag(self, tag: str) -> str:
        """``tag`` as the instrument instance writes it (prefixed by its ``name=``, if any)."""
        return f"{self.prefix}/{tag}" if self.prefix else tag

    @property
    def display_title(self) -> str:
        return f"{self.title} [{self.prefix}]" if self.prefix else self.title

    # --- life on a figure -----------------------------------------------------------------------------
    def attach(self, ax) -> None:
        """Take the axes: title and labels once, then :meth:`setup` for anything else drawn once."""
        self.ax = ax
        ax.set_title(self.display_title, fontsize=10.5, loc="left")
        ax.set_xlabel(self.xlabel, fontsize=8.5)
        ax.set_ylabel(self.ylabel, fontsize=8.5)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.25, linewidth=0.6)
        self._note = ax.text(0.5, 0.5, "", transform=ax.transAxes, **NOTE_STYLE)
        self._note.set_visible(False)
        self._lines: dict[str, Any] = {}
        self._bands: dict[str, Any] = {}
        self._labelled: dict[str, Any] = {}  # legend label -> current artist, in first-drawn order
        self._legend_keys: tuple[str, ...] = ()
        self._history: Any = None
        self.setup(ax)

    def setup(self, ax) -> None:
        """Create artists drawn once (reference lines, a twin axis); called by :meth:`attach`."""

    def draw(self, history: Any) -> None:
        """Redraw from ``history`` (the dashboard calls this; subclasses implement :meth:`update`)."""
        self._history = history
        self.update(history)

    def update(self, h: Any) -> None:
        raise NotImplementedError

    # --- reading --------------------------------------------------------------------------------------
    def series(self, h: Any, tag: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of this instrument's ``tag`` (prefixed), thinned to MAX_POINTS."""
        return series(h, self.tag(tag))

    def latest(self, h: Any, tag: str) -> tuple[int, Any] | None:
        return latest(h, self.tag(tag))

    def tags(self, h: Any, prefix: str) -> list[str]:
        """This instrument's tags (prefixed) that start with ``prefix``, sorted."""
        full = self.tag(prefix)
        return sorted(t for t in h if t.startswith(full))

    def latest_note(self) -> tuple[int, str, str] | None:
        """(step, tag, text) of the latest ``note/<key>`` record of this panel's instruments."""
        h = self._history
        found = None
        for tag in self.note_tags if h is not None else ():
            item = latest(h, tag)
            if item is not None and (found is None or item[0] > found[0]):
                found = (item[0], tag, str(item[1]))
        return found

    def missing_text(self) -> str:
        """What to show when there is nothing to draw: the latest note of the panel's instruments; else
        "no records yet" when one of them is in the run; else ``missing`` (how to add one)."""
        note = self.latest_note()
        if note is not None:
            step, tag, text = note
            return f"{text}\n({tag}, step {step})"
        who = " and ".join(self.owners)
        if self.in_run:
            return f"no records yet from {who}" if who else "no records yet"
        if self.missing:
            return self.missing
        return f"not tracked: add the {who} instrument" if who else "not tracked"

    # --- drawing helpers ------------------------------------------------------------------------------
    def note(self, text: str | None) -> None:
        self._note.set_text(wrap(text, 42) if text else "")
        self._note.set_visible(bool(text))

    def shows(self, present: object) -> bool:
        """Whether there is anything to draw; if not, the panel shows :meth:`missing_text` instead."""
        self.note(None if present else self.missing_text())
        return bool(present)

    def line(self, key: str, x, y, ax=None, **style) -> None:
        if key not in self._lines:
            (self._lines[key],) = (ax or self.ax).plot([], [], **{"linewidth": 1.3, **style})
        self._lines[key].set_data(x, y)
        self._lines[key].set_visible(len(x) > 0)
        # a lone finite point has no segment to draw: a marker shows it (a measurement every 100 steps)
        lone = len(x) > 0 and int(np.isfinite(np.asarray(y, dtype=float)).sum()) == 1
        self._lines[key].set_marker("o" if lone else "None")
        self._lines[key].set_markersize(3)
        if style.get("label"):
            self._labelled[style["label"]] = self._lines[key]

    def band(self, key: str, x, lo, hi, **style) -> None:
        """Shaded band between lo and hi (its edges are faint lines, so autoscaling sees them)."""
        old = self._bands.pop(key, None)
        if old is not None:
            old.remove()
        if len(x):
            self._bands[key] = self.ax.fill_between(x, lo, hi, linewidth=0, **style)
        if style.get("label"):
            self._labelled[style["label"]] = self._bands.get(key)
        color = style.get("color", "C0")
        self.line(key + "/lo", x, lo, color=color, alpha=0.3, linewidth=0.5)
        self.line(key + "/hi", x, hi, color=color, alpha=0.3, linewidth=0.5)

    def rescale(self, ax=None) -> None:
        ax = ax or self.ax
        ax.relim(visible_only=True)
        ax.autoscale_view()

    def legend(self, ax=None, **kw) -> None:
        """(Re)build the legend only when the set of labelled artists changed."""
        ax = ax or self.ax
        if self._labelled:  # a fixed order, whatever order the artists were (re)created in
            labels = list(self._labelled)
            handles = [self._labelled[lab] for lab in labels]
        else:
            handles, labels = ax.get_legend_handles_labels()
        visible = [
            (h, lab)
            for h, lab in zip(handles, labels, strict=True)
            if h is not None and getattr(h, "get_visible", lambda: True)()
        ]
        # (a line's marker is part of its legend entry: a lone point's marker, gone once it has neighbours)
        key = tuple((lab, getattr(h, "get_marker", lambda: None)()) for h, lab in visible)
        if key != self._legend_keys:
            self._legend_keys = key
            if self.ax.get_legend() is not None:
                self.ax.get_legend().remove()
            if visible:
                self.ax.legend(*zip(*visible, strict=True), fontsize=7, loc=kw.get("loc", "best"), framealpha=0.8)

    def histogram_bars(self, counts: np.ndarray, edges: np.ndarray, label: str) -> Any:
        """Bars of a histogram (``np.histogram``'s counts and edges) in the panel's main colour."""
        return self.ax.bar(
            edges[:-1], counts, width=np.diff(edges), align="edge", color=COLORS["main"], alpha=0.7, label=label
        )

    def clear_patches(self, attr: str) -> None:
        for artist in getattr(self, attr, []):
            artist.remove()
        setattr(self, attr, [])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.ident!r})"


# --- declarative panels ---------------------------------------------------------------------------------
class LinePanel(Panel):
    """Scalar tags as lines over the training steps.

    Args:
        title: the panel's title.
        tags: the tags to draw (as the instrument writes them, before any ``name=`` prefix).
        ylabel: the y-axis label.
        labels: legend labels, one per tag (default: the tags).
        log: ``"auto"`` (log scale when the values span more than ``log_ratio``), True or False.
        ref: ``(value, label)`` of a dashed horizontal reference line, shown with the data.
        xlabel, missing, key: as for :class:`Panel`.
    """

    def __init__(
        self,
        title: str,
        tags: Sequence[str],
        ylabel: str = "",
        *,
        labels: Sequence[str] | None = None,
        log: bool | str = "auto",
        log_ratio: float = 30.0,
        ref: tuple[float, str] | None = None,
        xlabel: str | None = None,
        missing: str | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(title, xlabel=xlabel, ylabel=ylabel, missing=missing, key=key)
        self.tag_list = tuple(tags)
        self.labels = tuple(labels) if labels is not None else self.tag_list
        if len(self.labels) != len(self.tag_list):
            raise ValueError(f"LinePanel {title!r}: {len(self.tag_list)} tags but {len(self.labels)} labels")
        if log not in (True, False, "auto"):
            raise ValueError(f"LinePanel {title!r}: log={log!r}; use True, False or 'auto'")
        self.log, self.log_ratio, self.ref = log, log_ratio, ref

    def setup(self, ax) -> None:
        self._ref = None
        if self.ref is not None:
            value, label = self.ref
            self._ref = ax.axhline(value, color=COLORS["alert"], linestyle="--", linewidth=1, label=label)
            self._ref.set_visible(False)

    def update(self, h: Any) -> None:
        data = [self.series(h, t) for t in self.tag_list]
        # nothing finite to draw (every value NaN: a warm-up, an undefined statistic): the note says why
        if not self.shows(any(np.isfinite(y).any() for _, y in data)):
            return
        for i, (tag, label, (x, y)) in enumerate(zip(self.tag_list, self.labels, data, strict=True)):
            self.line(tag, x, y, color=f"C{i % 10}", label=label)
        if self._ref is not None:
            self._ref.set_visible(True)
        if self.log == "auto":
            set_log_if_wide(self.ax, *(y for _, y in data), ratio=self.log_ratio)
        elif self.log:
            set_yscale(self.ax, "log")
        self.rescale()
        self.legend()


class QuantilePanel(Panel):
    """A batch value as a line plus the per-sample quantile bands of the same quantity.

    Args:
        prefix: prefix of the quantile tags ``prefix/{p5,p25,p50,p75,p95,max}`` (what
            ``cockpit_lite.instruments._util.quantile_records`` writes).
        scalar: tag of the batch value ("" for none).
        title, ylabel: as for :class:`Panel`.
        scalar_label: legend label of the batch value.
        what: how the legend names the per-sample values ("per-sample loss").
    """

    def __init__(
        self,
        prefix: str,
        scalar: str = "",
        *,
        title: str | None = None,
        ylabel: str = "",
        scalar_label: str = "",
        what: str = "per-sample",
        xlabel: str | None = None,
        missing: str | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(title or prefix, xlabel=xlabel, ylabel=ylabel, missing=missing, key=key)
        self.quantile_prefix, self.scalar = prefix, scalar
        self.scalar_label, self.what = scalar_label or scalar, what

    def update(self, h: Any) -> None:
        x, y = self.series(h, self.scalar) if self.scalar else (np.empty(0), np.empty(0))
        q = {k: self.series(h, f"{self.quantile_prefix}/{k}") for k in ("p5", "p25", "p50", "p75", "p95", "max")}
        if not self.shows(len(x) or len(q["p50"][0])):
            return
        arrays = [y]
        for key, lo, hi, alpha, span in (("outer", "p5", "p95", 0.15, "5-95%"), ("inner", "p25", "p75", 0.3, "25-75%")):
            if len(q[lo][0]) and len(q[lo][0]) == len(q[hi][0]):
                label = f"{self.what}, {span}"
                self.band(key, q[lo][0], q[lo][1], q[hi][1], color=COLORS["band"], alpha=alpha, label=label)
                if key == "outer":  # the outer band bounds the y-range; the inner one lies within it
                    arrays += [q[lo][1], q[hi][1]]
        self.line("p50", *q["p50"], color=COLORS["band"], linestyle="--", linewidth=1.0, label=f"{self.what} median")
        self.line("max", *q["max"], color=COLORS["band"], linestyle=":", linewidth=0.9, label=f"{self.what} max")
        arrays.append(q["max"][1])
        if self.scalar:
            self.line("scalar", x, y, color=COLORS["alert"], label=self.scalar_label)
        set_log_if_wide(self.ax, *arrays)
        self.rescale()
        self.legend()


# --- tags nobody declares ----------------------------------------------------------------------------------
class GenericPanel(Panel):
    """Tags no instrument declares, grouped by their first path component: up to ``MAX_LINES`` of them
    as lines (per-sample vectors as their median), the rest counted."""

    MAX_LINES = 6

    def __init__(self, group: str, tags: Sequence[str], groups: int = 1) -> None:
        what = f"{group}/..." if groups == 1 else f"{groups} more tag groups"
        super().__init__(f"Other records: {what}", ylabel="value", key=f"generic:{group}")
        self.tag_list, self.groups = tuple(tags), groups
        self.missing = "no records yet"

    def setup(self, ax) -> None:
        self._more = ax.text(0.99, 0.01, "", transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="0.4")

    def _values(self, h: Any, tag: str) -> tuple[np.ndarray, np.ndarray] | None:
        pairs = h.get(tag) or []
        if not pairs:
            return None
        if all(isinstance(v, np.ndarray) and v.dtype.kind in "fiub" for _, v in pairs[-3:]):
            steps = np.array([s for s, v in pairs if isinstance(v, np.ndarray) and v.size], dtype=float)
            meds = [np.median(v) for _, v in pairs if isinstance(v, np.ndarray) and v.size]
            return steps, np.array(meds, dtype=float)
        x, y = series(h, tag)
        return (x, y) if np.isfinite(y).any() else None

    def update(self, h: Any) -> None:
        drawn, text = [], None
        for tag in self.tag_list:
            if len(drawn) == self.MAX_LINES:
                break
            xy = self._values(h, tag)
            if xy is not None:
                drawn.append((tag, xy))
            elif text is None and latest(h, tag) is not None:
                text = f"{tag}: {latest(h, tag)[1]}"
        if not drawn:
            self.shows(False)
            if text is not None:
                self.note(text[:300])
            return
        self.note(None)
        for i, (tag, (x, y)) in enumerate(drawn):
            arrays = isinstance((h.get(tag) or [(0, None)])[-1][1], np.ndarray)
            self.line(tag, x, y, color=f"C{i % 10}", label=f"{tag} (median)" if arrays else tag)
        rest = len(self.tag_list) - len(drawn)
        self._more.set_text(f"+{rest} more tags: cockpit-lite summary lists them" if rest > 0 else "")
        set_log_if_wide(self.ax, *(y for _, (_, y) in drawn))
        self.rescale()
        self.legend()


# --- the core's own records ---------------------------------------------------------------------------------
def tracked_steps(h: Any) -> list:
    """The ``(step, value)`` pairs of the tracked steps: the whole-step cost, else the loss."""
    return h.get("cost/step_ms") or h.get("loss") or []


class VerdictsPanel(Panel):
    """Tracked steps, the headline values (the last finite value of the first ``(tag, label)`` summary
    line of each instrument in the run), every ``verdict/...`` text and the latest notes (``note/...``)."""

    title = "Verdicts and run summary"
    xlabel = ""
    key = "core:verdicts"
    order = 65.0
    MAX_LINES = 19
    headline: tuple[tuple[str, str], ...] = ()

    def setup(self, ax) -> None:
        ax.axis("off")
        self._text = ax.text(
            0.0, 1.0, "", transform=ax.transAxes, ha="left", va="top", fontsize=8.5, family="monospace"
        )

    def update(self, h: Any) -> None:
        tracked = tracked_steps(h)
        lines = []
        if tracked:
            lines.append(f"tracked steps: {len(tracked)} (steps {tracked[0][0]}..{tracked[-1][0]})")
        else:
            lines.append("no tracked steps yet")
        for tag, label in self.headline:
            steps, values = series(h, tag)
            finite = np.flatnonzero(np.isfinite(values))
            if finite.size:  # the last number, not a NaN that says "undefined at this step"
                i = finite[-1]
                lines.append(wrap(f"last {label}: {values[i]:.4g} (step {int(steps[i])})", 52))
            elif len(steps):
                lines.append(wrap(f"last {label}: {values[-1]:.4g} (step {int(steps[-1])})", 52))
        verdicts = sorted(t for t in h if VERDICT.search(t))
        lines.append("")
        if verdicts:
            for tag in verdicts:
                step, text = latest(h, tag)
                name = VERDICT.split(tag, maxsplit=1)
                lines.append(wrap(f"{'/'.join(p for p in (name[0], name[-1]) if p)} (step {step}): {text}", 52))
        else:
            lines.append(wrap("no verdicts: the Alpha and Clipping instruments write them (`verdict/...`)", 52))
        notes = sorted(t for t in h if t.startswith("note/"))
        if notes:
            lines.append("")
            for tag in notes:
                step, text = latest(h, tag)
                lines.append(wrap(f"note {tag[len('note/') :]} (step {step}): {text}", 52))
        text = "\n".join(lines).splitlines()
        if len(text) > self.MAX_LINES:
            text = text[: self.MAX_LINES - 1] + ["... (cockpit-lite summary prints all)"]
        self._text.set_text("\n".join(text))


def instrument_cost(history: Any, name: str, window: int | None = None) -> tuple[float, float, float]:
    """(ms a training step, ms a run, steps between runs) of the cockpit's work ``name`` from its
    ``cost/<name>_ms`` records (the last ``window`` of them, or all): a run's cost is their median; the
    steps between runs the median gap between their steps (1 for work on every step, as most is; the
    budget, ``every=`` and schedules leave gaps); the cost a step is a run's divided by that gap, what it
    adds to an average step. NaN where there is no record (and the gap where there is only one).

    Costs are measured on some steps (``Cockpit(cost_every=...)``: those with ``cost/cockpit_ms``), and on
    every step whose work differs from the last one's: work recorded on each measured step between its first
    and last record ran on every step (gap 1), other work was measured on each of its runs."""
    steps, values = series(history, f"cost/{name}_ms", max_points=None)
    if window is not None:
        steps, values = steps[-window:], values[-window:]
    keep = np.isfinite(values)
    steps, values = steps[keep], values[keep]
    if not values.size:
        return math.nan, math.nan, math.nan
    run = float(np.median(values))
    gap = float(np.median(np.diff(steps))) if steps.size > 1 else math.nan
    if steps.size > 1 and name != "cockpit":
        measured = series(history, "cost/cockpit_ms", max_points=None)[0]
        measured = measured[(measured >= steps[0]) & (measured <= steps[-1])]
        if measured.size == steps.size and np.array_equal(measured, steps):
            gap = 1.0  # (on every measured step: every step)
    return (run / gap if gap >= 1 else run if steps.size > 1 else math.nan), run, gap


def cost_ms(cost: tuple[float, float, float]) -> float:
    """The ms an :func:`instrument_cost` stands for in a bar or an ordering: its cost a step, or its one
    run so far."""
    return cost[0] if math.isfinite(cost[0]) else cost[1]


def cost_phrase(per_step: float, run: float, gap: float, step_ms: float, digits: int = 2) -> str:
    """How the cost of a piece of work reads: "0.45 ms (4%)" for work on every step; "69.26 ms a run, 1 in
    100 steps: 0.69 ms (6%) a step" for work on some steps; the share is of a whole step's median."""

    def share(ms: float) -> str:
        return f" ({ms / step_ms:.0%})" if step_ms and math.isfinite(step_ms) and math.isfinite(ms) else ""

    if math.isfinite(gap) and gap > 1.5:
        return f"{run:.{digits}f} ms a run, 1 in {gap:.0f} steps: {per_step:.{digits}f} ms{share(per_step)} a step"
    if not math.isfinite(gap) and not math.isfinite(per_step):
        return f"{run:.{digits}f} ms a run (once so far)"
    return f"{per_step:.{digits}f} ms{share(per_step)}"


class CostBarsPanel(Panel):
    title = "Cockpit cost per tracked step, by instrument"
    xlabel = "ms a step (a run's median over its last 50 runs / steps between runs)"
    ylabel = ""
    missing = "no cost records (`cost/<name>_ms`) yet"
    key = "core:cost_bars"
    order = 100.0
    SKIP = {"step", "cockpit", "sinks"}  # (the hooks' own time, "driver", is a bar of its own)
    WINDOW = 50

    def setup(self, ax) -> None:
        self._bars: list = []

    def update(self, h: Any) -> None:
        self.clear_patches("_bars")
        names = [t[len("cost/") : -len("_ms")] for t in sorted(h) if t.startswith("cost/") and t.endswith("_ms")]
        names = [n for n in names if n not in self.SKIP]
        if not self.shows(names):
            return

        costs = {n: instrument_cost(h, n, self.WINDOW) for n in names}
        ms = {n: cost_ms(c) for n, c in costs.items()}
        step = instrument_cost(h, "step", self.WINDOW)[1]
        names = sorted(names, key=lambda n: ms[n])
        y = np.arange(len(names))
        self._bars = [self.ax.barh(y, [ms[n] for n in names], color=COLORS["third"], alpha=0.8)]
        self.ax.set_yticks(y, names, fontsize=7.5)
        top = max([v for v in ms.values() if math.isfinite(v)] or [1.0])
        for yi, n in zip(y, names, strict=True):
            label = cost_phrase(*costs[n], step)
            self._bars.append(self.ax.text(ms[n] + 0.01 * top, yi, label, va="center", fontsize=7))
        self.ax.set_xlim(0, top * 1.35)
        self.ax.set_ylim(-0.6, len(names) - 0.4)
        if math.isfinite(step):
            self.ax.set_title(f"Cockpit cost by instrument (whole step {step:.1f} ms)", fontsize=10.5, loc="left")


class CostTimePanel(Panel):
    title = "Time per tracked step"
    ylabel = "ms"
    missing = "no cost records (`cost/step_ms`) yet"
    key = "core:cost_time"
    order = 100.0

    def update(self, h: Any) -> None:
        step = series(h, "cost/step_ms")
        if not self.shows(len(step[0])):
            return
        cockpit, sinks = series(h, "cost/cockpit_ms"), series(h, "cost/sinks_ms")
        self.line("step", *step, color=COLORS["main"], label="whole step (forward to records)")
        self.line("cockpit", *cockpit, color=COLORS["alert"], label="cockpit work (all instruments)")
        self.line("sinks", *sinks, color="0.4", linewidth=0.9, label="sinks writing (TensorBoard, dashboard...)")
        set_log_if_wide(self.ax, step[1], cockpit[1], sinks[1], ratio=20)
        self.rescale()
        self.legend()
