"""The dashboard figure: a pure function of a :class:`~cockpit_lite.records.History` and of the panels
the instruments declare.

``render(history)`` draws every panel from the records alone, so the live :class:`Dashboard` sink, the
TensorBoard image and ``cockpit-lite dashboard LOGDIR`` (from ``load(logdir)``) draw the same picture.
The panels come from :mod:`cockpit_lite.presentation`: the run's instruments, the registered ones found
by the run's tags, the built-in ones (saying "not tracked" and which instrument fills them when absent),
the core panels (verdicts and run summary, cost) and a generic panel per group of tags nobody declares.
:class:`DashboardFigure` is created once and updated in place (line data replaced, not the figure
rebuilt, unless the set of panels changes). It uses the Agg canvas directly
(``matplotlib.figure.Figure``, no pyplot state), so it never needs a display.

Panels fill a grid of four columns in their instruments' order; the built-in set is 3 x 4
(docs/dashboard.md explains how to read each panel):

    loss            | gradient norm & update  | distance from start   | alpha (+ lr verdict)
    gradient tests  | per-sample grad norms   | per-sample histogram  | verdicts & run summary
    clipping        | influence (TracIn)      | cost per instrument   | cost over time

and plugins' panels, then generic ones, add rows below.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cockpit_lite.instrument import Instrument
from cockpit_lite.panels import (  # noqa: F401  (re-exported: the names figure.py always had)
    COLORS,
    MAX_POINTS,
    NOTE_STYLE,
    CostBarsPanel,
    CostTimePanel,
    GenericPanel,
    LinePanel,
    Panel,
    QuantilePanel,
    VerdictsPanel,
    latest,
    series,
    top_rows,
    tracked_steps,
)
from cockpit_lite.presentation import Presentation, Presenter
from cockpit_lite.records import History

_top_rows = top_rows
COLUMNS = 4
WIDTH = 19.0  # inches
ROW_HEIGHT = 11.5 / 3  # inches per row of panels
TOP, BOTTOM = 11.5 * (1 - 0.925), 11.5 * 0.06  # inches above and below the grid


def last(history: History, tag: str) -> tuple[int, Any] | None:
    """The last ``(step, value)`` of ``tag``, or None (``history.latest(tag)``)."""
    return latest(history, tag)


class DashboardFigure:
    """One figure, built once; :meth:`update` redraws the panels' data from a history in place.

    Args:
        figsize: (width, height) in inches; default 19 wide and 11.5 / 3 per row of panels.
        dpi: resolution.
        title: shown above the panels, followed by the last tracked step.
        instruments: the run's instruments (a live run: ``RunContext.instruments``); none for a saved
            run, which is shown by the registered instruments its tags belong to.
        registered: consult the registered instruments (``cockpit_lite.presentation.Presenter``).
    """

    def __init__(
        self,
        figsize: tuple[float, float] | None = None,
        dpi: int = 90,
        title: str = "cockpit-lite dashboard",
        instruments: Iterable[Instrument] = (),
        registered: bool | Mapping[str, type] = True,
    ):
        self.fig = Figure(figsize=figsize or (WIDTH, 3 * ROW_HEIGHT), dpi=dpi)
        self.canvas = FigureCanvasAgg(self.fig)
        self.title = title
        self._fixed_size = figsize is not None
        self.presenter = Presenter(instruments, registered)
        self.panels: list[Panel] = []
        self._signature: tuple | None = None
        self._build(self.presenter(History()))

    def _build(self, presentation: Presentation) -> None:
        """(Re)create the grid when the set of panels changed."""
        signature = presentation.panel_signature()
        if signature == self._signature:
            for panel, spec in zip(self.panels, presentation.panels, strict=True):
                for name in ("owners", "note_tags", "in_run", "headline"):
                    if name in spec.__dict__:
                        setattr(panel, name, getattr(spec, name))
            return
        self._signature = signature
        self.fig.clear()
        n = len(presentation.panels)
        rows = max(1, math.ceil(n / COLUMNS))
        if not self._fixed_size:
            self.fig.set_size_inches(WIDTH, ROW_HEIGHT * rows)
        height = self.fig.get_size_inches()[1]
        axes = self.fig.subplots(rows, COLUMNS, squeeze=False)
        self.fig.subplots_adjust(
            left=0.045, right=0.965, top=1 - TOP / height, bottom=BOTTOM / height, wspace=0.32, hspace=0.42
        )
        self.panels = []
        for i, spec in enumerate(presentation.panels):
            panel = spec.copy()
            panel.attach(axes[i // COLUMNS][i % COLUMNS])
            self.panels.append(panel)
        for i in range(n, rows * COLUMNS):
            axes[i // COLUMNS][i % COLUMNS].set_visible(False)
        self._suptitle = self.fig.suptitle(self.title, fontsize=13, x=0.045, ha="left")

    def panel(self, key: str, prefix: str = "") -> Panel:
        """The panel of ``key`` (its declared key or title) and instrument ``name=`` prefix."""
        for p in self.panels:
            if p.key == key and p.prefix == prefix:
                return p
        raise KeyError(f"no panel {key!r}; panels: {[p.key for p in self.panels]}")

    def update(self, history: History) -> Figure:
        self._build(self.presenter(history))
        for panel in self.panels:
            try:
                panel.draw(history)
            except Exception as e:  # one bad panel never stops the others (or training)
                panel.note(f"could not draw this panel: {type(e).__name__}: {e}")
        steps = tracked_steps(history)
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
