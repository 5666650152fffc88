"""What the sinks and the CLI show, assembled from what the instruments declare.

Each instrument class declares its tags, dashboard panels, Custom Scalars charts and summary lines
(:class:`~cockpit_lite.instrument.Instrument`: ``TAGS``, ``PANELS``, ``CHARTS``, ``SUMMARY``, ``ORDER``).
:class:`Presenter` puts them together for one run:

1. the run's instruments (``RunContext.instruments`` of a live run; none for a run read from disk),
   each in the run, its presentation prefixed by its ``name=`` if it has one;
2. the instrument classes registered under the entry-point group ``cockpit_lite.instruments`` whose
   declared tags (or whose ``note/<key>``) occur among the run's tags that no instrument of (1)
   declares: a saved run is shown by the classes that wrote it, plugins included;
3. the built-in instruments (registered classes defined in ``cockpit_lite``) not found so far, not in
   the run, unless they say ``PLACEHOLDER = False``: their panels say "not tracked: add ..." and their
   charts stay empty, so every dashboard shows what could be tracked;
4. the core's records: ``verdict/...`` and ``note/...`` (the run summary panel and the summary's
   verdicts and notes), ``cost/...`` (two cost panels and a Cost category);
5. tags nobody declares: grouped by their first path component, a generic panel per group (at most
   :data:`MAX_GENERIC_PANELS`, the last one standing for the rest), a chart per group of scalar tags (at
   most :data:`MAX_GENERIC_CHARTS`) and a summary line per tag (at most :data:`MAX_GENERIC_LINES`).

Everything is ordered by the instruments' ``ORDER`` (then the order of (1), then the registered name).
Nothing here imports matplotlib.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cockpit_lite.instrument import Instrument, SummaryItem, default_key
from cockpit_lite.panels import (
    VERDICT,
    CostBarsPanel,
    CostTimePanel,
    GenericPanel,
    Panel,
    VerdictsPanel,
    as_float,
    cost_ms,
    cost_phrase,
    instrument_cost,
    tracked_steps,
)

MAX_GENERIC_PANELS = 4
MAX_GENERIC_CHARTS = 16
MAX_GENERIC_LINES = 20
MAX_HEADLINE = 5
GENERIC_ORDER = 900.0
GENERIC_CATEGORY = "Other records (declared by no instrument)"
CORE_ORDER = 100.0


def _rx(*tags: str) -> list[str]:
    return [f"^{t}$" for t in tags]


#: the Custom Scalars category of the core's ``cost/...`` records (docs/profiling.md)
CORE_CHARTS: dict[str, dict[str, list]] = {
    "Cost": {
        "ms per tracked step (whole step, cockpit, sinks, driver)": [
            "Multiline",
            _rx("cost/step_ms", "cost/cockpit_ms", "cost/sinks_ms", "cost/driver_ms"),
        ],
        "ms per tracked step, by instrument": ["Multiline", [r"^cost/(?!step_|cockpit_|sinks_|driver_).*_ms$"]],
        "share of the step, by instrument": ["Multiline", [r"^cost/.*_share$"]],
    },
}


def is_core_tag(tag: str) -> bool:
    """``cost/...``, ``note/...`` and ``verdict/...`` (also ``<name>/verdict/...``): the core shows them."""
    return tag.startswith(("cost/", "note/")) or VERDICT.search(tag) is not None


def group_of(tag: str) -> str:
    """The group a tag nobody declares is shown in: its first path component."""
    return tag.split("/", 1)[0]


@dataclass
class Source:
    """One instrument the presentation draws on: a class, the ``name=`` prefix of its instance ("" for
    none), its key (``note/<key>``), and whether it is in the run."""

    cls: type
    prefix: str = ""
    key: str = ""
    in_run: bool = False
    seq: int = 0
    pattern: re.Pattern | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.key = self.key or default_key(self.cls)
        declared = list(getattr(self.cls, "TAGS", {}) or {})
        if declared:
            body = "|".join(f"(?:{p})" for p in declared)
            self.pattern = re.compile(f"{re.escape(self.prefix)}/(?:{body})" if self.prefix else body)

    @property
    def order(self) -> float:
        return float(getattr(self.cls, "ORDER", 500.0))

    @property
    def name(self) -> str:
        return self.cls.__name__

    def tag(self, tag: str) -> str:
        return f"{self.prefix}/{tag}" if self.prefix else tag

    def declares(self, tag: str) -> bool:
        return self.pattern is not None and self.pattern.fullmatch(tag) is not None

    def label(self, text: str) -> str:
        return f"{text} [{self.prefix}]" if self.prefix else text


@dataclass
class Presentation:
    """The assembled presentation of a run: ordered panels (fresh copies, ready to attach), the
    Custom Scalars layout, the summary items of the instruments in the run, and the undeclared tags."""

    sources: list[Source]
    panels: list[Panel]
    charts: dict[str, dict[str, list]]
    summary: list[tuple[Source, SummaryItem]]
    undeclared: list[str]
    headline: list[tuple[str, str]]

    def panel_signature(self) -> tuple:
        """What a figure's grid depends on: equal signatures, equal panels in equal places (their
        ``owners``, ``note_tags``, ``in_run`` and ``headline`` may differ and are copied over)."""
        return tuple((type(p), p.ident, p.prefix, getattr(p, "tag_list", None)) for p in self.panels)


class Presenter:
    """Assembles the presentation of one run, again only when new tags appear.

    Args:
        instruments: the run's instruments (``RunContext.instruments``); empty for a saved run.
        registered: consult the entry-point group ``cockpit_lite.instruments`` (steps 2 and 3 of the
            module docstring); a dict ``{name: class}`` to use instead of it.
    """

    def __init__(self, instruments: Iterable[Instrument] = (), registered: bool | Mapping[str, type] = True) -> None:
        self.live = [
            Source(type(i), prefix=i.name or "", key=i.key, in_run=True, seq=n) for n, i in enumerate(instruments)
        ]
        self._registered_arg = registered
        self._registered: dict[str, type] | None = None
        self._found: dict[type, None] = {}  # registered classes found by the run's tags, in finding order
        self._undeclared: dict[str, bool] = {}  # tag -> whether its values are numbers
        self._seen = 0
        self._history: Any = None  # held, so that its identity stays its own
        self._cached: Presentation | None = None

    # --- the registry -------------------------------------------------------------------------------
    def registered(self) -> dict[str, type]:
        if self._registered is None:
            if isinstance(self._registered_arg, Mapping):
                self._registered = dict(self._registered_arg)
            elif self._registered_arg:
                from cockpit_lite.registry import registered_instruments

                self._registered = registered_instruments()
            else:
                self._registered = {}
            live = {(s.cls, s.prefix) for s in self.live}
            self._candidates = [
                Source(cls) for _, cls in sorted(self._registered.items()) if (cls, "") not in live
            ]  # registered classes that may be found by their tags
            self._by_key = {s.key: s.cls for s in self._candidates}
        return self._registered

    # --- scanning the run's tags ---------------------------------------------------------------------
    def _scan(self, history: Any) -> None:
        self.registered()
        if history is not self._history:
            self._history, self._seen = history, 0
            self._found, self._undeclared, self._cached = {}, {}, None
        tags = list(history)
        for tag in tags[self._seen :]:
            if tag.startswith("note/"):
                cls = self._by_key.get(tag[len("note/") :])
                if cls is not None:
                    self._found.setdefault(cls)
                continue
            if is_core_tag(tag) or any(s.declares(tag) for s in self.live):
                continue
            owners = [s.cls for s in self._candidates if s.declares(tag)]
            for cls in owners:
                self._found.setdefault(cls)
            if not owners:
                last = history.get(tag) or [(0, None)]
                self._undeclared[tag] = isinstance(last[-1][1], (float, int)) and not isinstance(last[-1][1], bool)
        self._seen = len(tags)

    def __call__(self, history: Any) -> Presentation:
        """The presentation of the run whose records are ``history`` (a History or a saved run)."""
        if self._cached is not None and history is self._history and len(history) == self._seen:
            return self._cached
        before = (tuple(self._found), tuple(self._undeclared)) if history is self._history else None
        self._scan(history)
        if self._cached is not None and before == (tuple(self._found), tuple(self._undeclared)):
            return self._cached  # new tags, all declared by instruments already shown
        self._cached = self._assemble(history)
        return self._cached

    # --- assembling -------------------------------------------------------------------------------------
    def sources(self) -> list[Source]:
        """Every instrument shown, ordered: the run's, the registered ones found by their tags, then the
        built-in ones not in the run."""
        self.registered()
        out = list(self.live)
        for s in self._candidates:
            found = s.cls in self._found
            if found or (s.cls.__module__.startswith("cockpit_lite.") and s.cls.PLACEHOLDER):
                out.append(Source(s.cls, in_run=found, seq=len(out) + (0 if found else 10_000)))
        return sorted(out, key=lambda s: (s.order, s.seq))

    def _assemble(self, history: Any) -> Presentation:
        sources = self.sources()
        panels = self._panels(sources)
        charts = self._charts(sources)
        summary = [(s, item) for s in sources if s.in_run for item in _summary_items(s.cls)]
        headline: list[tuple[str, str]] = []
        for s in sources:
            pair = next((item for item in _summary_items(s.cls) if isinstance(item, tuple)), None)
            if s.in_run and pair is not None and len(headline) < MAX_HEADLINE:
                headline.append((s.tag(pair[0]), s.label(pair[1])))
        for p in panels:
            if isinstance(p, VerdictsPanel):
                p.headline = tuple(headline)
        return Presentation(sources, panels, charts, summary, list(self._undeclared), headline)

    def _panels(self, sources: list[Source]) -> list[Panel]:
        by_ident: dict[tuple[str, str], Panel] = {}
        for s in sources:
            for spec in getattr(s.cls, "PANELS", ()) or ():
                ident = (spec.ident, s.prefix)
                p = by_ident.get(ident)
                if p is None:
                    p = by_ident[ident] = spec.copy()
                    p.key, p.prefix, p.order = spec.ident, s.prefix, s.order
                    p.owners, p.note_tags, p.in_run = (), (), False
                if s.name not in p.owners:
                    p.owners += (s.name,)
                if f"note/{s.key}" not in p.note_tags:
                    p.note_tags += (f"note/{s.key}",)
                p.in_run = p.in_run or s.in_run
        core = [VerdictsPanel(), CostBarsPanel(), CostTimePanel()]
        for p in core:
            p.note_tags = ("note/cockpit",)
        ordered = sorted(list(by_ident.values()) + core, key=lambda p: p.order)  # stable: sources' order
        return ordered + self._generic_panels()

    def _generic_panels(self) -> list[Panel]:
        groups: dict[str, list[str]] = {}
        for tag in sorted(self._undeclared):
            groups.setdefault(group_of(tag), []).append(tag)
        names = list(groups)
        if len(names) > MAX_GENERIC_PANELS:
            rest = [t for g in names[MAX_GENERIC_PANELS - 1 :] for t in groups[g]]
            panels = [GenericPanel(g, groups[g]) for g in names[: MAX_GENERIC_PANELS - 1]]
            panels.append(GenericPanel(names[MAX_GENERIC_PANELS - 1], rest, groups=len(names) - MAX_GENERIC_PANELS + 1))
        else:
            panels = [GenericPanel(g, groups[g]) for g in names]
        for p in panels:
            p.order = GENERIC_ORDER
        return panels

    def _charts(self, sources: list[Source]) -> dict[str, dict[str, list]]:
        layout: dict[str, dict[str, list]] = {}
        parts = [(s.order, s.seq, _prefixed_charts(getattr(s.cls, "CHARTS", {}) or {}, s.prefix)) for s in sources]
        parts.append((CORE_ORDER, math.inf, CORE_CHARTS))
        for _, _, charts in sorted(parts, key=lambda p: (p[0], p[1])):
            for category, spec in charts.items():
                into = layout.setdefault(category, {})
                for title, (kind, series) in spec.items():
                    have = into.get(title)
                    if have is None:
                        into[title] = [kind, list(series)]
                    elif have[0] == "Multiline" and kind == "Multiline":  # one chart from several instruments
                        have[1] += [r for r in series if r not in have[1]]
        generic = self._generic_charts()
        if generic:
            layout[GENERIC_CATEGORY] = generic
        return layout

    def _generic_charts(self) -> dict[str, list]:
        groups: dict[str, list[str]] = {}
        for tag in sorted(t for t, scalar in self._undeclared.items() if scalar):
            groups.setdefault(group_of(tag), []).append(tag)
        out: dict[str, list] = {}
        names = list(groups)
        for g in names[: MAX_GENERIC_CHARTS - 1] if len(names) > MAX_GENERIC_CHARTS else names:
            tags = groups[g]
            out[f"{g}/..."] = ["Multiline", _rx(*map(re.escape, tags)) if len(tags) <= 12 else [f"^{re.escape(g)}/"]]
        if len(names) > MAX_GENERIC_CHARTS:
            rest = names[MAX_GENERIC_CHARTS - 1 :]
            alternatives = "|".join(map(re.escape, rest))
            out[f"{len(rest)} more groups"] = ["Multiline", [f"^({alternatives})(/|$)"]]
        return out

    # --- the summary ------------------------------------------------------------------------------------
    def summary_sections(self, history: Any) -> tuple[list[str], list[list[str]], list[str]]:
        """(last-value rows of the instruments' (tag, label) pairs, blocks of lines from their summary
        callables, rows of the tags nobody declares) for ``cockpit-lite summary``."""
        pres = self(history)
        rows: list[str] = []
        blocks: list[list[str]] = []
        for source, item in pres.summary:
            if isinstance(item, tuple):
                tag, label = item
                row = value_row(history, source.tag(tag), source.label(label))
                if row is not None:
                    rows.append(row)
            else:
                try:
                    lines = list(item(history, source.tag))
                except Exception as e:  # a plugin's summary never stops the report
                    lines = [f"{source.name}: its summary failed ({type(e).__name__}: {e})"]
                if lines:
                    blocks.append(lines)
        other = []
        for tag in pres.undeclared[:MAX_GENERIC_LINES]:
            row = value_row(history, tag, tag)
            if row is not None:
                other.append(row)
        if len(pres.undeclared) > MAX_GENERIC_LINES:
            more = len(pres.undeclared) - MAX_GENERIC_LINES
            other.append(f"  ... and {more} more tags (cockpit_lite.load(logdir) reads them all)")
        return rows, blocks, other


def _summary_items(cls: type) -> list[SummaryItem]:
    items = getattr(cls, "SUMMARY", ()) or ()
    if callable(items):
        return [items]
    return [tuple(i) if isinstance(i, list) else i for i in items]


def _prefixed_charts(charts: Mapping[str, Mapping[str, list]], prefix: str) -> Mapping[str, Mapping[str, list]]:
    if not prefix:
        return charts
    head = f"^{re.escape(prefix)}/"
    out: dict[str, dict[str, list]] = {}
    for category, spec in charts.items():
        for title, (kind, series) in spec.items():
            if kind == "Margin":
                series = [f"{prefix}/{t}" for t in series]
            else:
                series = [head + r[1:] if r.startswith("^") else head + r for r in series]
            out.setdefault(category, {})[f"{title} [{prefix}]"] = [kind, series]
    return out


def value_row(history: Any, tag: str, label: str) -> str | None:
    """One ``cockpit-lite summary`` line: the last value of ``tag`` and, for numbers, the median of its
    values over the last 10% of its step range (by steps, not records: a live history keeps older steps
    thinned); None if the tag has no records."""
    pairs = history.get(tag)
    if not pairs:
        return None
    step, value = pairs[-1]
    if isinstance(value, (float, int)) and not isinstance(value, bool):
        since = step - (step - pairs[0][0]) / 10
        recent = np.array([as_float(v) for s, v in pairs if s >= since])
        recent = recent[np.isfinite(recent)]
        med = f"{np.median(recent):.4g}" if recent.size else "nan"
        return f"  {label:36} {as_float(value):>10.4g}  (step {step}; median of last 10%: {med})"
    if isinstance(value, np.ndarray):
        finite = value[np.isfinite(value)] if value.dtype.kind == "f" else value
        what = f"median {np.median(finite):.4g}" if finite.size and finite.dtype.kind in "fiub" else "no numbers"
        return f"  {label:36} {value.size} values, {what}  (step {step})"
    if isinstance(value, dict):
        n = max((np.size(v) for v in value.values()), default=0)
        return f"  {label:36} a table of {n} rows: {', '.join(value)}  (step {step})"
    text = str(value)
    return f"  {label:36} {text[:200] + '...' if len(text) > 200 else text}  (step {step})"


def assemble(
    history: Any, instruments: Sequence[Instrument] = (), registered: bool | Mapping[str, type] = True
) -> Presentation:
    """The presentation of one run at once (see :class:`Presenter` for repeated calls)."""
    return Presenter(instruments, registered)(history)


def summary_text(history: Any, where: str = "", instruments: Sequence[Instrument] = ()) -> str:
    """The report ``cockpit-lite summary`` prints: steps, the instruments' summary lines, verdicts,
    notes, costs, and the tags no instrument declares."""
    presenter = Presenter(instruments)
    rows, blocks, other = presenter.summary_sections(history)
    out: list[str] = []
    tracked = tracked_steps(history)
    head = f"run {where}: " if where else ""
    if tracked:
        out.append(
            f"{head}{len(tracked)} tracked steps (steps {tracked[0][0]} to {tracked[-1][0]}), {len(history)} tags"
        )
    else:
        out.append(f"{head}no tracked steps ({len(history)} tags)")
    if rows:
        out += ["", "last values:"] + rows
    for block in blocks:
        out += [""] + block
    if other:
        out += ["", "other records (declared by no instrument):"] + other

    verdicts = sorted(t for t in history if VERDICT.search(t))
    out += ["", "verdicts:"]
    if verdicts:
        for tag in verdicts:
            step, text = history.latest(tag)
            name = VERDICT.split(tag, maxsplit=1)
            out.append(f"  {'/'.join(p for p in (name[0], name[-1]) if p)} (step {step}): {text}")
    else:
        out.append("  none (the Alpha and Clipping instruments write them under verdict/...)")

    notes = sorted(t for t in history if t.startswith("note/"))
    if notes:
        out += ["", "notes (why a number is missing):"]
        for tag in notes:
            pairs = history.get(tag)
            step, text = pairs[-1]
            count = f"; {len(pairs)} notes, the last:" if len(pairs) > 1 else ""
            out.append(f"  {tag[len('note/') :]} (step {step}{count}) {text}")

    costs = _costs(history)
    if costs:
        out += [""] + costs
    return "\n".join(out)


def _costs(history: Any) -> list[str]:
    names = sorted(
        t[len("cost/") : -len("_ms")]
        for t in history
        if t.startswith("cost/")
        and t.endswith("_ms")
        and t not in ("cost/step_ms", "cost/cockpit_ms", "cost/sinks_ms", "cost/driver_ms")
    )
    if not names:
        return []

    step, cockpit, sinks, driver = (instrument_cost(history, n)[1] for n in ("step", "cockpit", "sinks", "driver"))
    hooks = f", the hooks' own time {driver:.2f} ms ({driver / step:.0%})" if math.isfinite(driver) else ""
    out = [
        f"cost per tracked step (median): whole step {step:.2f} ms, cockpit {cockpit:.2f} ms "
        f"({cockpit / step:.0%}), sinks {sinks:.2f} ms{hooks}; by piece of work, what it adds to a step "
        "(work done on some steps only: a run's cost over the steps between runs):"
    ]
    costs = {n: instrument_cost(history, n) for n in names}
    for name in sorted(names, key=lambda n: -cost_ms(costs[n])):
        out.append(f"  {name:28} {cost_phrase(*costs[name], step, digits=3)}")
    return out


__all__ = [
    "Presenter",
    "Presentation",
    "Source",
    "assemble",
    "summary_text",
    "is_core_tag",
    "group_of",
    "value_row",
    "CORE_CHARTS",
]
