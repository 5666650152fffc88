"""The dashboard figure: a pure function of a :class:`~cockpit_lite.records.History`.

``render(history)`` draws every panel from the records alone, so the live :class:`Dashboard` sink, the
TensorBoard image and ``cockpit-lite dashboard LOGDIR`` (from ``load(logdir)``) draw the same picture.
:class:`DashboardFigure` is created once and updated in place (line data replaced, not the figure
rebuilt). It uses the Agg canvas directly (``matplotlib.figure.Figure``, no pyplot state), so it never
needs a display. Panels whose tags are absent say "not tracked" and which instrument fills them.

Layout (3 x 4; docs/dashboard.md explains how to read each panel):

    loss            | gradient norm & update  | distance from start   | alpha (+ lr verdict)
    gradient tests  | per-sample grad norms   | per-sample histogram  | verdicts & run summary
    clipping        | influence (TracIn)      | cost per instrument   | cost over time
"""

from __future__ import annotations

import io
import math
import re
import textwrap
from collections.abc import Callable
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cockpit_lite.records import History

MAX_POINTS = 3000  # longer series are thinned to at most this many points per line (the last kept)
NOTE_STYLE = dict(ha="center", va="center", fontsize=9, color="0.45", wrap=True)
COLORS = {"main": "C0", "second": "C1", "third": "C2", "band": "C0", "ref": "0.35", "alert": "C3"}


# --- reading the history ------------------------------------------------------------------------------
def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def series(history: History, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a scalar tag as float arrays; empty if absent; thinned to MAX_POINTS."""
    pairs = history._data.get(tag) if isinstance(history, History) else history.get(tag)
    if not pairs:
        return np.empty(0), np.empty(0)
    stride = max(1, math.ceil(len(pairs) / MAX_POINTS))
    picked = pairs[::-1][::stride][::-1]  # keep the last point
    steps = np.fromiter((s for s, _ in picked), dtype=float, count=len(picked))
    values = np.fromiter((_float(v) for _, v in picked), dtype=float, count=len(picked))
    return steps, values


def last(history: History, tag: str) -> tuple[int, Any] | None:
    pairs = history._data.get(tag) if isinstance(history, History) else history.get(tag)
    return pairs[-1] if pairs else None


def _tags(history: History, prefix: str) -> list[str]:
    return sorted(t for t in history if t.startswith(prefix))


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.fill(par, width) for par in str(text).splitlines() or [""])


def _set_log_if_wide(ax, *arrays: np.ndarray, ratio: float = 30.0) -> None:
    vals = np.concatenate([a[np.isfinite(a)] for a in arrays]) if arrays else np.empty(0)
    wide = vals.size > 0 and vals.min() > 0 and vals.max() / vals.min() > ratio
    _set_yscale(ax, "log" if wide else "linear")


def _set_yscale(ax, scale: str) -> None:
    """Linear or log; log axes get plain tick labels (0.2, 0.5, 1, 2, ...) rather than 2x10^-1."""
    if ax.get_yscale() == scale:
        return
    ax.set_yscale(scale)
    if scale == "log":
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=8))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())


# --- panels ---------------------------------------------------------------------------------------------
class Panel:
    """One axes: titled and labelled once; :meth:`update` replaces its data from the history."""

    title = ""
    xlabel = "training step"
    ylabel = ""
    missing = "not tracked"

    def __init__(self, ax):
        self.ax = ax
        ax.set_title(self.title, fontsize=10.5, loc="left")
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

    # drawing helpers
    def note(self, text: str | None) -> None:
        self._note.set_text(_wrap(text, 42) if text else "")
        self._note.set_visible(bool(text))

    def shows(self, present: object) -> bool:
        """Whether there is anything to draw; if not, the panel shows its ``missing`` note instead."""
        self.note(None if present else self.missing)
        return bool(present)

    def line(self, key: str, x, y, ax=None, **style) -> None:
        if key not in self._lines:
            (self._lines[key],) = (ax or self.ax).plot([], [], **{"linewidth": 1.3, **style})
        self._lines[key].set_data(x, y)
        self._lines[key].set_visible(len(x) > 0)
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
        key = tuple(lab for _, lab in visible)
        if key != self._legend_keys:
            self._legend_keys = key
            if self.ax.get_legend() is not None:
                self.ax.get_legend().remove()
            if visible:
                self.ax.legend(*zip(*visible, strict=True), fontsize=7, loc=kw.get("loc", "best"), framealpha=0.8)

    def clear_patches(self, attr: str) -> None:
        for artist in getattr(self, attr, []):
            artist.remove()
        setattr(self, attr, [])

    def update(self, h: History) -> None:
        raise NotImplementedError


class QuantilePanel(Panel):
    """A scalar line plus the per-sample quantile band of the same quantity."""

    scalar = ""  # tag of the batch value
    prefix = ""  # prefix of the quantile tags (prefix/p5, /p25, /p50, /p75, /p95, /max)
    scalar_label = ""
    what = "per-sample"

    def update(self, h: History) -> None:
        x, y = series(h, self.scalar) if self.scalar else (np.empty(0), np.empty(0))
        q = {k: series(h, f"{self.prefix}/{k}") for k in ("p5", "p25", "p50", "p75", "p95", "max")}
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
        _set_log_if_wide(self.ax, *arrays)
        self.rescale()
        self.legend()


class LossPanel(QuantilePanel):
    title = "Training loss"
    ylabel = "loss"
    scalar, prefix, scalar_label, what = "loss", "loss/per_sample", "batch loss", "per-sample loss"
    missing = "not tracked: add the Loss instrument (tag `loss`)"


class GradNormUpdatePanel(Panel):
    title = "Gradient norm and update size"
    ylabel = "Euclidean norm"
    missing = "not tracked: add GradNorm (`grad_norm`) and UpdateSize (`update_size`)"

    def update(self, h: History) -> None:
        g, u = series(h, "grad_norm"), series(h, "update_size")
        if not self.shows(len(g[0]) or len(u[0])):
            return
        self.line("grad", *g, color=COLORS["main"], label="gradient norm ||grad L||")
        self.line("update", *u, color=COLORS["second"], label="update size ||θ(t+1) − θ(t)||")
        _set_log_if_wide(self.ax, g[1], u[1], ratio=10)
        self.rescale()
        self.legend()


class DistancePanel(Panel):
    title = "Distance from the initial parameters"
    ylabel = "||θ(t) − θ(0)||"
    missing = "not tracked: add the Distance instrument (tag `distance`)"

    def update(self, h: History) -> None:
        d = series(h, "distance")
        if not self.shows(len(d[0])):
            return
        self.line("distance", *d, color=COLORS["main"], label="all parameters")
        self.rescale()
        self.legend()


class AlphaPanel(Panel):
    title = "Step size: alpha (noisy quadratic fit)"
    xlabel = "alpha  (−1: no progress, 0: valley floor,\n1: opposite flank at start height, >1: overshoot)"
    ylabel = "tracked steps"
    missing = "not tracked: add the Alpha instrument (tags `alpha`, `verdict/lr`)"
    LIMIT = 3.0

    def __init__(self, ax):
        super().__init__(ax)
        self._bars: list = []
        self._vlines: list = []
        self._verdict = ax.text(
            0.02,
            0.97,
            "",
            transform=ax.transAxes,
            ha="left",
            va="top",
            fontsize=7.5,
            bbox=dict(boxstyle="round", facecolor="lightyellow", alpha=0.9, linewidth=0.5),
        )
        self._verdict.set_visible(False)

    def update(self, h: History) -> None:
        _, a = series(h, "alpha")
        a = a[np.isfinite(a)]
        verdict = last(h, "verdict/lr")
        self.clear_patches("_bars")
        self.clear_patches("_vlines")
        if not a.size:
            self.note(self.missing if verdict is None else "no finite alpha yet")
        else:
            self.note(None)
            clipped = np.clip(a, -self.LIMIT, self.LIMIT)
            counts, edges = np.histogram(clipped, bins=30, range=(-self.LIMIT, self.LIMIT))
            med = float(np.median(a))
            self._bars = [
                self.ax.bar(
                    edges[:-1],
                    counts,
                    width=np.diff(edges),
                    align="edge",
                    color=COLORS["main"],
                    alpha=0.7,
                    label=f"alpha, {a.size} steps (ends: beyond ±{self.LIMIT:g})",
                )
            ]
            self._vlines = [
                self.ax.axvline(0.0, color=COLORS["ref"], linestyle="--", linewidth=1, label="0: valley floor"),
                self.ax.axvline(
                    np.clip(med, -self.LIMIT, self.LIMIT),
                    color=COLORS["alert"],
                    linewidth=1.5,
                    label=f"median {med:.2f}",
                ),
            ]
            self.ax.set_xlim(-self.LIMIT, self.LIMIT)
            self.ax.set_ylim(0, max(counts.max(), 1) * (1.9 if verdict is not None else 1.15))
            self._legend_keys = ()  # artists were replaced
            self.legend(loc="center left")  # the left flank is nearly empty; the verdict sits top left
        if verdict is not None:
            # the whole sentence is in the summary panel; here only what the learning rate looks like
            found = re.search(r"too large|too small|about right|too few", str(verdict[1]))
            short = f"learning rate {found.group(0)}" if found else str(verdict[1])
            self._verdict.set_text(_wrap(f"verdict (step {verdict[0]}): {short}", 26))
        self._verdict.set_visible(verdict is not None)


class GradientTestsPanel(Panel):
    title = "Gradient tests: is the batch gradient noise-dominated?"
    ylabel = "test statistic (1.0 = limit)"
    missing = "not tracked: add the GradientTests instrument (`tests/norm`, `tests/inner`, `tests/ortho`)"

    def __init__(self, ax):
        super().__init__(ax)
        self._one = ax.axhline(
            1.0,
            color=COLORS["alert"],
            linestyle="--",
            linewidth=1,
            label="1.0: above = noise dominates (bigger batch / smaller lr)",
        )
        self._one.set_visible(False)

    def update(self, h: History) -> None:
        tags = {
            "norm": ("norm test", "C0"),
            "inner": ("inner-product test", "C1"),
            "ortho": ("orthogonality test", "C2"),
        }
        data = {k: series(h, f"tests/{k}") for k in tags}
        if not self.shows(any(len(x) for x, _ in data.values())):
            return
        for k, (label, color) in tags.items():
            self.line(k, *data[k], color=color, label=label)
        self._one.set_visible(True)
        _set_yscale(self.ax, "log")
        self.rescale()
        self.legend()


class PerSampleNormsPanel(QuantilePanel):
    title = "Per-sample gradient norms ||g_i|| over time"
    ylabel = "||g_i||"
    scalar, prefix, what = "", "persample/grad_norm", "per-sample"
    missing = "not tracked: add the PerSampleGradNorms instrument (`persample/grad_norm`)"


class PerSampleHistPanel(Panel):
    title = "Per-sample gradient norms, last tracked step"
    xlabel = "||g_i||  (gradient norm of one sample's loss)"
    ylabel = "samples"
    missing = "not tracked: add the PerSampleGradNorms instrument (`persample/grad_norm`)"

    def __init__(self, ax):
        super().__init__(ax)
        self._bars: list = []

    def update(self, h: History) -> None:
        self.clear_patches("_bars")
        item = last(h, "persample/grad_norm")
        values = np.asarray(item[1], dtype=float).ravel() if item is not None else np.empty(0)
        values = values[np.isfinite(values)]
        if not self.shows(values.size):
            return
        step = item[0]
        counts, edges = np.histogram(values, bins=30)
        self._bars = [
            self.ax.bar(
                edges[:-1],
                counts,
                width=np.diff(edges),
                align="edge",
                color=COLORS["main"],
                alpha=0.7,
                label=f"{values.size} samples at step {step}",
            )
        ]
        g = dict(h._data.get("grad_norm", [])).get(step)
        if g is not None and math.isfinite(_float(g)):
            self._bars.append(
                self.ax.axvline(
                    _float(g), color=COLORS["alert"], linewidth=1.5, label=f"batch gradient norm {_float(g):.3g}"
                )
            )
        self.ax.set_title(f"Per-sample gradient norms at step {step}", fontsize=10.5, loc="left")
        self.ax.relim()
        self.ax.autoscale_view()
        self._legend_keys = ()
        self.legend(loc="upper right")


class VerdictsPanel(Panel):
    title = "Verdicts and run summary"
    xlabel = ""

    def __init__(self, ax):
        super().__init__(ax)
        ax.axis("off")
        ax.set_title(self.title, fontsize=10.5, loc="left")
        self._text = ax.text(
            0.0, 1.0, "", transform=ax.transAxes, ha="left", va="top", fontsize=8.5, family="monospace"
        )

    def update(self, h: History) -> None:
        tracked = h._data.get("cost/step_ms") or h._data.get("loss") or []
        lines = []
        if tracked:
            lines.append(f"tracked steps: {len(tracked)} (steps {tracked[0][0]}..{tracked[-1][0]})")
        else:
            lines.append("no tracked steps yet")
        for tag, label in (("loss", "loss"), ("grad_norm", "gradient norm"), ("alpha", "alpha")):
            item = last(h, tag)
            if item is not None:
                lines.append(f"last {label}: {_float(item[1]):.4g} (step {item[0]})")
        verdicts = _tags(h, "verdict/")
        lines.append("")
        if verdicts:
            for tag in verdicts:
                step, text = last(h, tag)
                lines.append(_wrap(f"{tag[len('verdict/') :]} (step {step}): {text}", 52))
        else:
            lines.append(_wrap("no verdicts: the Alpha and Clipping instruments write them (`verdict/...`)", 52))
        self._text.set_text("\n".join(lines))


class ClippingPanel(Panel):
    title = "Gradient clipping"
    ylabel = "fraction clipped"
    missing = "not tracked: add the Clipping instrument (`clip/global/...`, `clip/agc/...`, `clip/per_sample/...`)"
    KINDS = {
        "global": ("global norm", "C0"),
        "agc": ("AGC units", "C1"),
        "per_sample": ("samples (per-sample clip)", "C2"),
    }

    def __init__(self, ax):
        super().__init__(ax)
        self.ax2 = ax.twinx()
        self.ax2.tick_params(labelsize=8)
        self.ax2.set_ylabel("global gradient norm before clipping", fontsize=8.5)
        self.ax2.set_visible(False)

    def update(self, h: History) -> None:
        fracs = {k: series(h, f"clip/{k}/frac_clipped") for k in self.KINDS}
        norm = series(h, "clip/global/norm")
        suggest = _tags(h, "clip/suggest/global/")
        if not self.shows(any(len(x) for x, _ in fracs.values()) or len(norm[0]) or _tags(h, "clip/")):
            return
        for k, (label, color) in self.KINDS.items():
            self.line(k, *fracs[k], color=color, label=f"fraction clipped: {label}")
        have_fracs = any(len(x) for x, _ in fracs.values())
        if have_fracs:
            self.ax.set_ylim(-0.03, 1.03)
        else:  # no threshold to evaluate: the norms alone, on the main axis
            self.ax.set_ylabel("global gradient norm before clipping", fontsize=8.5)
        if len(norm[0]):
            ax, right = (self.ax2, " (right)") if have_fracs else (self.ax, "")
            self.ax2.set_visible(have_fracs)
            self.line("norm", *norm, ax=ax, color="0.3", linewidth=1.0, label=f"pre-clip global norm{right}")
            for tag in suggest[:3]:
                self.line(
                    tag,
                    *series(h, tag),
                    ax=ax,
                    linestyle=":",
                    linewidth=1.0,
                    label=f"suggested max_norm {tag.rsplit('/', 1)[-1]}{right}",
                )
            self.rescale(ax)
            self.legend(ax=ax, loc="upper left")
        else:
            self.legend()
        if not any(len(x) for x, _ in fracs.values()) and not len(norm[0]):
            self.note(
                "clipping statistics recorded, but no fraction clipped or global norm: see `cockpit-lite summary`"
            )


class InfluencePanel(Panel):
    title = "Influence: top self-influence (TracIn)"
    xlabel = "self-influence"
    ylabel = "training example"
    missing = "not tracked: add the TracIn instrument (`tracin/...`)"
    TOP = 10

    def __init__(self, ax):
        super().__init__(ax)
        self._bars: list = []

    @staticmethod
    def _table(h: History) -> tuple[str, int, dict] | None:
        for tag in _tags(h, "tracin/"):
            item = last(h, tag)
            if isinstance(item[1], dict) and item[1]:
                return tag, item[0], item[1]
        return None

    def update(self, h: History) -> None:
        self.clear_patches("_bars")
        found = self._table(h)
        if found is None:
            scalars = [t for t in _tags(h, "tracin/") if not isinstance(last(h, t)[1], (dict, str, np.ndarray))]
            if not self.shows(scalars):
                return
            self.ax.set_xlabel("training step", fontsize=8.5)
            self.ax.set_ylabel("value", fontsize=8.5)
            for i, tag in enumerate(scalars[:4]):
                self.line(tag, *series(h, tag), color=f"C{i}", label=tag)
            self.rescale()
            self.legend()
            return
        tag, step, table = found
        labels, values, value_name = _top_rows(table, self.TOP)
        if values is None:
            self.note(f"{tag}: no numeric column to plot")
            return
        self.note(None)
        y = np.arange(len(values))[::-1]
        self._bars = [self.ax.barh(y, values, color=COLORS["second"], alpha=0.8)]
        self.ax.set_yticks(y, [str(lab) for lab in labels], fontsize=7)
        self.ax.set_xlabel(value_name, fontsize=8.5)
        what = "TracIn self-influence" if "self" in tag else f"Influence ({value_name})"
        self.ax.set_title(f"{what}: top {len(values)} examples (step {step})", fontsize=10.5, loc="left")
        self.ax.relim()
        self.ax.autoscale_view()


def _top_rows(table: dict, top: int) -> tuple[list, np.ndarray | None, str]:
    """Labels and values of the ``top`` largest rows of a dict-of-columns table."""
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


class CostBarsPanel(Panel):
    title = "Cockpit cost per tracked step, by instrument"
    xlabel = "ms per tracked step (median of the last 50)"
    ylabel = ""
    missing = "no cost records (`cost/<name>_ms`) yet"
    SKIP = {"step", "cockpit", "sinks"}
    WINDOW = 50

    def __init__(self, ax):
        super().__init__(ax)
        self._bars: list = []

    def update(self, h: History) -> None:
        self.clear_patches("_bars")
        names = [t[len("cost/") : -len("_ms")] for t in _tags(h, "cost/") if t.endswith("_ms")]
        names = [n for n in names if n not in self.SKIP]
        if not self.shows(names):
            return

        def med(tag):
            v = series(h, tag)[1][-self.WINDOW :]
            v = v[np.isfinite(v)]
            return float(np.median(v)) if v.size else math.nan

        ms = {n: med(f"cost/{n}_ms") for n in names}
        step = med("cost/step_ms")
        names = sorted(names, key=lambda n: ms[n])
        y = np.arange(len(names))
        self._bars = [self.ax.barh(y, [ms[n] for n in names], color=COLORS["third"], alpha=0.8)]
        self.ax.set_yticks(y, names, fontsize=7.5)
        top = max([v for v in ms.values() if math.isfinite(v)] or [1.0])
        for yi, n in zip(y, names, strict=True):
            share = f" ({ms[n] / step:.0%})" if step and math.isfinite(step) else ""
            self._bars.append(self.ax.text(ms[n] + 0.01 * top, yi, f"{ms[n]:.2f} ms{share}", va="center", fontsize=7))
        self.ax.set_xlim(0, top * 1.35)
        self.ax.set_ylim(-0.6, len(names) - 0.4)
        if math.isfinite(step):
            self.ax.set_title(f"Cockpit cost by instrument (whole step {step:.1f} ms)", fontsize=10.5, loc="left")


class CostTimePanel(Panel):
    title = "Time per tracked step"
    ylabel = "ms"
    missing = "no cost records (`cost/step_ms`) yet"

    def update(self, h: History) -> None:
        step = series(h, "cost/step_ms")
        if not self.shows(len(step[0])):
            return
        cockpit, sinks = series(h, "cost/cockpit_ms"), series(h, "cost/sinks_ms")
        self.line("step", *step, color=COLORS["main"], label="whole step (forward to records)")
        self.line("cockpit", *cockpit, color=COLORS["alert"], label="cockpit work (all instruments)")
        self.line("sinks", *sinks, color="0.4", linewidth=0.9, label="sinks writing (TensorBoard, dashboard...)")
        _set_log_if_wide(self.ax, step[1], cockpit[1], sinks[1], ratio=20)
        self.rescale()
        self.legend()


LAYOUT: list[list[Callable[[Any], Panel]]] = [
    [LossPanel, GradNormUpdatePanel, DistancePanel, AlphaPanel],
    [GradientTestsPanel, PerSampleNormsPanel, PerSampleHistPanel, VerdictsPanel],
    [ClippingPanel, InfluencePanel, CostBarsPanel, CostTimePanel],
]


class DashboardFigure:
    """One figure, built once; :meth:`update` redraws the panels' data from a history in place."""

    def __init__(
        self, figsize: tuple[float, float] = (19.0, 11.5), dpi: int = 90, title: str = "cockpit-lite dashboard"
    ):
        self.fig = Figure(figsize=figsize, dpi=dpi)
        self.canvas = FigureCanvasAgg(self.fig)
        self.title = title
        rows, cols = len(LAYOUT), len(LAYOUT[0])
        axes = self.fig.subplots(rows, cols)
        self.fig.subplots_adjust(left=0.045, right=0.965, top=0.925, bottom=0.06, wspace=0.32, hspace=0.42)
        self.panels = [cls(axes[r][c]) for r, row in enumerate(LAYOUT) for c, cls in enumerate(row)]
        self._suptitle = self.fig.suptitle(title, fontsize=13, x=0.045, ha="left")

    def update(self, history: History) -> Figure:
        for panel in self.panels:
            try:
                panel.update(history)
            except Exception as e:  # one bad panel never stops the others (or training)
                panel.note(f"could not draw this panel: {type(e).__name__}: {e}")
        steps = history._data.get("cost/step_ms") or history._data.get("loss") or []
        where = f"step {steps[-1][0]} ({len(steps)} tracked steps)" if steps else "no tracked steps yet"
        self._suptitle.set_text(f"{self.title}: {where}")
        return self.fig

    def png(self, history: History | None = None) -> bytes:
        if history is not None:
            self.update(history)
        buf = io.BytesIO()
        self.canvas.print_png(buf)
        return buf.getvalue()


def render(history: History, **kwargs: Any) -> Figure:
    """The dashboard of ``history`` as a new matplotlib Figure (Agg canvas attached)."""
    return DashboardFigure(**kwargs).update(history)
