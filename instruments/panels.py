"""The dashboard panels of the built-in instruments that draw more than lines (their classes declare
them in ``PANELS``), and TracIn's summary lines. No matplotlib import: panels draw on the axes they get."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from cockpit_lite.panels import COLORS, Panel, as_float, note_box, series, top_rows, wrap


class AlphaPanel(Panel):
    """Histogram of alpha over the run, the 0 line, the median, and the learning-rate verdict."""

    title = "Step size: alpha (noisy quadratic fit)"
    xlabel = "alpha  (−1: no progress, 0: valley floor,\n1: opposite flank at start height, >1: overshoot)"
    ylabel = "tracked steps"
    missing = "not tracked: add the Alpha instrument (tags `alpha`, `verdict/lr`)"
    key = "alpha"
    LIMIT = 3.0

    def setup(self, ax) -> None:
        self._bars: list = []
        self._vlines: list = []
        self._verdict = note_box(ax)

    def update(self, h: Any) -> None:
        _, a = self.series(h, "alpha")
        a = a[np.isfinite(a)]
        verdict = self.latest(h, "verdict/lr")
        self.clear_patches("_bars")
        self.clear_patches("_vlines")
        if not a.size:
            seen = self.latest(h, "alpha") is not None or verdict is not None
            self.note(self.missing_text() if self.latest_note() is not None or not seen else "no finite alpha yet")
        else:
            self.note(None)
            clipped = np.clip(a, -self.LIMIT, self.LIMIT)
            counts, edges = np.histogram(clipped, bins=30, range=(-self.LIMIT, self.LIMIT))
            med = float(np.median(a))
            self._bars = [self.histogram_bars(counts, edges, f"alpha, {a.size} steps (ends: beyond ±{self.LIMIT:g})")]
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
            self._verdict.set_text(wrap(f"verdict (step {verdict[0]}): {short}", 26))
        self._verdict.set_visible(verdict is not None)


class PerSampleHistPanel(Panel):
    """Histogram of the per-sample gradient norms of the last tracked batch, with the batch norm."""

    title = "Per-sample gradient norms, last tracked step"
    xlabel = "||g_i||  (gradient norm of one sample's loss)"
    ylabel = "samples"
    missing = "not tracked: add the PerSampleGradNorms instrument (`persample/grad_norm`)"
    key = "persample_hist"

    def setup(self, ax) -> None:
        self._bars: list = []

    def update(self, h: Any) -> None:
        self.clear_patches("_bars")
        item = self.latest(h, "persample/grad_norm")
        values = np.asarray(item[1], dtype=float).ravel() if item is not None else np.empty(0)
        values = values[np.isfinite(values)]
        if not self.shows(values.size):
            return
        step = item[0]
        counts, edges = np.histogram(values, bins=30)
        self._bars = [self.histogram_bars(counts, edges, f"{values.size} samples at step {step}")]
        g = h.value_at("grad_norm", step) if hasattr(h, "value_at") else None
        if g is not None and math.isfinite(as_float(g)):
            self._bars.append(
                self.ax.axvline(
                    as_float(g), color=COLORS["alert"], linewidth=1.5, label=f"batch gradient norm {as_float(g):.3g}"
                )
            )
        self.ax.set_title(f"Per-sample gradient norms at step {step}", fontsize=10.5, loc="left")
        self.ax.relim()
        self.ax.autoscale_view()
        self._legend_keys = ()
        self.legend(loc="upper right")


class ClippingPanel(Panel):
    """Fractions clipped (left axis) and the global norm before clipping with the suggested max_norm
    levels (right axis)."""

    title = "Gradient clipping"
    ylabel = "fraction clipped"
    missing = "not tracked: add the Clipping instrument (`clip/global/...`, `clip/agc/...`, `clip/per_sample/...`)"
    key = "clipping"
    KINDS = {
        "global": ("global norm", "C0"),
        "agc": ("AGC units", "C1"),
        "per_sample": ("samples (per-sample clip)", "C2"),
    }

    def setup(self, ax) -> None:
        self.ax2 = ax.twinx()
        self.ax2.tick_params(labelsize=8)
        self.ax2.set_ylabel("global gradient norm before clipping", fontsize=8.5)
        self.ax2.set_visible(False)

    def update(self, h: Any) -> None:
        fracs = {k: self.series(h, f"clip/{k}/frac_clipped") for k in self.KINDS}
        norm = self.series(h, "clip/global/norm")
        suggest = self.tags(h, "clip/suggest/global/")
        if not self.shows(any(len(x) for x, _ in fracs.values()) or len(norm[0]) or self.tags(h, "clip/")):
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
        if not have_fracs and not len(norm[0]):
            self.note(
                "clipping statistics recorded, but no fraction clipped or global norm: see `cockpit-lite summary`"
            )


def _tables(h: Any, tag: Callable[[str], str]) -> list[tuple[str, int, dict]]:
    """The ``tracin/...`` tables (dicts) of the run: (tag, step, table), in tag order."""
    prefix = tag("tracin/")
    out = []
    for t in sorted(x for x in h if x.startswith(prefix)):
        pairs = h.get(t)
        if pairs and isinstance(pairs[-1][1], dict) and pairs[-1][1]:
            out.append((t, pairs[-1][0], pairs[-1][1]))
    return out


def _top_table(tables: list[tuple[str, int, dict]], top: int) -> tuple[str, int, list, np.ndarray, str] | None:
    """(tag, step, labels, values, value name) of the ``top`` rows of the first table with one value per
    example, self-influence first (proponents and opponents hold one column per probe: no such table)."""
    for tag, step, table in sorted(tables, key=lambda t: "self" not in t[0]):
        labels, values, value_name = top_rows(table, top)
        if values is not None:
            return tag, step, labels, values, value_name
    return None


class InfluencePanel(Panel):
    """The top rows of a TracIn table with one value per example (self-influence first) as bars; the
    TracIn scalars as lines when there is no table yet."""

    title = "Influence: top self-influence (TracIn)"
    xlabel = "self-influence"
    ylabel = "training example"
    missing = "not tracked: add the TracIn instrument (`tracin/...`)"
    key = "influence"
    TOP = 10

    def setup(self, ax) -> None:
        self._bars: list = []

    def update(self, h: Any) -> None:
        self.clear_patches("_bars")
        tables = _tables(h, self.tag)
        if not tables:
            scalars = [
                t
                for t in self.tags(h, "tracin/")
                if not isinstance(h.get(t)[-1][1], (dict, str, np.ndarray))  # a scalar series
            ]
            if not self.shows(scalars):
                return
            self.ax.set_xlabel("training step", fontsize=8.5)
            self.ax.set_ylabel("value", fontsize=8.5)
            for i, tag in enumerate(scalars[:4]):
                self.line(tag, *series(h, tag), color=f"C{i}", label=tag)
            self.rescale()
            self.legend()
            return
        top = _top_table(tables, self.TOP)
        if top is None:
            self.note(f"{', '.join(t for t, _, _ in tables)}: no table with one value per example to plot")
            return
        tag, step, labels, values, value_name = top
        self.note(None)
        y = np.arange(len(values))[::-1]
        self._bars = [self.ax.barh(y, values, color=COLORS["second"], alpha=0.8)]
        self.ax.set_yticks(y, [str(lab) for lab in labels], fontsize=7)
        self.ax.set_xlabel(value_name, fontsize=8.5)
        what = "TracIn self-influence" if "self" in tag else f"Influence ({value_name})"
        self.ax.set_title(f"{what}: top {len(values)} examples (step {step})", fontsize=10.5, loc="left")
        self.ax.relim()
        self.ax.autoscale_view()


def influence_summary(h: Any, tag: Callable[[str], str], top: int = 10) -> list[str]:
    """``cockpit-lite summary`` lines of TracIn: the top rows of a table with one value per example
    (:func:`_top_table`), else its tags."""
    found = _top_table(_tables(h, tag), top)
    if found is not None:
        name, step, labels, values, value_name = found
        out = [f"top influence ({name}, step {step}), by {value_name}:"]
        return out + [f"  {lab:>16}  {v:.4g}" for lab, v in zip(labels, values, strict=True)]
    names = sorted(t for t in h if t.startswith(tag("tracin/")))
    return ["influence: " + ", ".join(names)] if names else []
