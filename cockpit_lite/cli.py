"""The ``cockpit-lite`` command line: look at a saved run without writing Python.

cockpit-lite summary runs/exp1                 # a short text report
cockpit-lite dashboard runs/exp1 -o out.png    # the dashboard picture of the run
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cockpit_lite.records import History

DESCRIPTION = """\
Look at a training run recorded by cockpit-lite.

A run is a directory (the Cockpit's logdir=...) holding cockpit.jsonl, the records written while
training ran. TensorBoard event files and profiler traces may sit beside it:
  tensorboard --logdir runs          the same records, in TensorBoard
  https://ui.perfetto.dev            open a *.pt.trace.json profiler trace (docs/profiling.md)
"""

EPILOG = """\
examples:
  cockpit-lite summary runs/exp1
  cockpit-lite dashboard runs/exp1 -o runs/exp1/dashboard.png
  cockpit-lite dashboard runs/exp1 --dpi 150 -o big.png

The training loop that writes such a run:
  from cockpit_lite import Cockpit
  with Cockpit(model, optimizer, loss_fn, instruments="economy", logdir="runs/exp1"):
      ...your unchanged loop...
"""

KEY_SCALARS = [
    ("loss", "batch loss"),
    ("loss/per_sample/p95", "per-sample loss, 95% quantile"),
    ("grad_norm", "gradient norm"),
    ("update_size", "update size"),
    ("distance", "distance from start"),
    ("alpha", "alpha (0 = valley floor)"),
    ("tests/norm", "norm test (>1: noise dominates)"),
    ("tests/inner", "inner-product test"),
    ("tests/ortho", "orthogonality test"),
    ("persample/grad_norm/p50", "per-sample gradient norm, median"),
    ("persample/grad_norm/max", "per-sample gradient norm, max"),
    ("clip/global/norm", "global norm before clipping"),
    ("clip/global/frac_clipped", "fraction of steps clipped"),
    ("clip/agc/frac_clipped", "fraction of AGC units clipped"),
    ("clip/per_sample/frac_clipped", "fraction of samples clipped"),
]


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def summary_text(history: History, where: str = "") -> str:
    """The report ``cockpit-lite summary`` prints: steps, key scalars, verdicts, costs, top influence."""
    out: list[str] = []
    tracked = history._data.get("cost/step_ms") or history._data.get("loss") or []
    head = f"run {where}: " if where else ""
    if tracked:
        out.append(
            f"{head}{len(tracked)} tracked steps (steps {tracked[0][0]} to {tracked[-1][0]}), {len(history)} tags"
        )
    else:
        out.append(f"{head}no tracked steps ({len(history)} tags)")

    rows = []
    for tag, label in KEY_SCALARS:
        pairs = history._data.get(tag)
        if not pairs:
            continue
        vals = np.array([_num(v) for _, v in pairs])
        recent = vals[-max(1, len(vals) // 10) :]
        recent = recent[np.isfinite(recent)]
        med = f"{np.median(recent):.4g}" if recent.size else "nan"
        rows.append(f"  {label:36} {_num(pairs[-1][1]):>10.4g}  (step {pairs[-1][0]}; median of last 10%: {med})")
    if rows:
        out += ["", "last values:"] + rows

    verdicts = sorted(t for t in history if t.startswith("verdict/"))
    out += ["", "verdicts:"]
    if verdicts:
        for tag in verdicts:
            step, text = history._data[tag][-1]
            out.append(f"  {tag[len('verdict/') :]} (step {step}): {text}")
    else:
        out.append("  none (the Alpha and Clipping instruments write them under verdict/...)")

    names = sorted(
        t[len("cost/") : -len("_ms")]
        for t in history
        if t.startswith("cost/") and t.endswith("_ms") and t not in ("cost/step_ms", "cost/cockpit_ms", "cost/sinks_ms")
    )
    if names:

        def med(tag: str) -> float:
            v = np.array([_num(x) for x in history.values(tag)]) if tag in history else np.empty(0)
            v = v[np.isfinite(v)]
            return float(np.median(v)) if v.size else math.nan

        step, cockpit, sinks = med("cost/step_ms"), med("cost/cockpit_ms"), med("cost/sinks_ms")
        out += [
            "",
            f"cost per tracked step (median): whole step {step:.2f} ms, cockpit {cockpit:.2f} ms "
            f"({cockpit / step:.0%}), sinks {sinks:.2f} ms",
        ]
        for name in sorted(names, key=lambda n: -med(f"cost/{n}_ms")):
            ms = med(f"cost/{name}_ms")
            out.append(f"  {name:28} {ms:8.3f} ms  {ms / step:6.1%}")

    tables = [t for t in sorted(history) if t.startswith("tracin/") and isinstance(history.last(t), dict)]
    if tables:
        from cockpit_lite.figure import _top_rows

        tag = tables[0]
        step, table = history._data[tag][-1]
        labels, values, value_name = _top_rows(table, 10)
        if values is not None:
            out += ["", f"top influence ({tag}, step {step}), by {value_name}:"]
            out += [f"  {lab:>16}  {v:.4g}" for lab, v in zip(labels, values, strict=True)]
    elif any(t.startswith("tracin/") for t in history):
        out += ["", "influence: " + ", ".join(sorted(t for t in history if t.startswith("tracin/")))]
    return "\n".join(out)


def _load(logdir: str) -> History:
    from cockpit_lite.io import load

    return load(logdir)


def cmd_summary(args: argparse.Namespace) -> int:
    print(summary_text(_load(args.logdir), args.logdir))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from cockpit_lite.figure import DashboardFigure
    from cockpit_lite.sinks.dashboard import write_atomic

    history = _load(args.logdir)
    out = Path(args.output) if args.output else Path(args.logdir) / "dashboard.png"
    if out.suffix.lower() != ".png":
        raise SystemExit(f"cockpit-lite dashboard: -o must name a .png file, got {out}")
    write_atomic(out, DashboardFigure(dpi=args.dpi, title=args.title or "cockpit-lite dashboard").png(history))
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="cockpit-lite",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser(
        "summary",
        help="print a short report of a run: last values, verdicts, costs, top influence",
        description="Print a short text report of a run: how many steps were tracked, the last value of "
        "the key scalars, the verdicts (verdict/...), what each instrument cost per step, and the most "
        "influential training examples if TracIn ran.",
        epilog="example:\n  cockpit-lite summary runs/exp1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("logdir", help="the run directory (the Cockpit's logdir, holding cockpit.jsonl)")
    s.set_defaults(func=cmd_summary)
    d = sub.add_parser(
        "dashboard",
        help="draw the dashboard picture of a run into a PNG",
        description="Draw the dashboard (loss, gradient norms, update size, distance, alpha, gradient "
        "tests, per-sample gradient norms, clipping, influence, costs) of a saved run into a PNG: the "
        "same picture the Dashboard sink writes while training. See docs/dashboard.md.",
        epilog="examples:\n  cockpit-lite dashboard runs/exp1 -o out.png\n  cockpit-lite dashboard runs/exp1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("logdir", help="the run directory (the Cockpit's logdir, holding cockpit.jsonl)")
    d.add_argument("-o", "--output", help="the PNG to write (default: LOGDIR/dashboard.png)")
    d.add_argument("--dpi", type=int, default=90, help="resolution (default 90: 1710 x 1035 pixels)")
    d.add_argument("--title", help="title shown above the panels (default: cockpit-lite dashboard)")
    d.set_defaults(func=cmd_dashboard)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    try:
        return args.func(args)
    except FileNotFoundError as e:
        print(f"cockpit-lite {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
