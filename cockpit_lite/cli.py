"""The ``cockpit-lite`` command line: look at a saved run without writing Python.

cockpit-lite summary runs/exp1                 # a short text report
cockpit-lite dashboard runs/exp1 -o out.png    # the dashboard picture of the run
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cockpit_lite.errors import CockpitWarning
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


def summary_text(history: History, where: str = "") -> str:
    """The report ``cockpit-lite summary`` prints: steps, the summary lines the run's instruments declare
    (last values, top influence, ...), verdicts, notes, costs, and the tags no instrument declares
    (:func:`cockpit_lite.presentation.summary_text`)."""
    from cockpit_lite.presentation import summary_text as assemble_summary

    return assemble_summary(history, where)


def _load_runs(logdir: str) -> dict[str, History]:
    """The run in ``logdir`` under its own path, or every run of a folder of runs under theirs."""
    import warnings

    from cockpit_lite.io import load
    from cockpit_lite.rundir import Runs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CockpitWarning)  # the skipped lines are said once below
        loaded = load(logdir)
    runs = {str(Path(logdir) / name): h for name, h in loaded.items()} if isinstance(loaded, Runs) else {logdir: loaded}
    for where, h in runs.items():
        if h.skipped:
            lines = ", ".join(map(str, h.skipped_lines)) + (", ..." if h.skipped > len(h.skipped_lines) else "")
            print(
                f"cockpit-lite: {where}: skipped {h.skipped} damaged line{'s' if h.skipped > 1 else ''} of "
                f"cockpit.jsonl (line {lines}); the rest is shown",
                file=sys.stderr,
            )
    return runs


def _load(logdir: str) -> History:
    runs = _load_runs(logdir)
    if len(runs) > 1:
        listed = ", ".join(runs)
        raise SystemExit(f"cockpit-lite: {logdir} holds {len(runs)} runs ({listed}): name one of them")
    return next(iter(runs.values()))


def cmd_summary(args: argparse.Namespace) -> int:
    print("\n\n".join(summary_text(h, where) for where, h in _load_runs(args.logdir).items()))
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
        help="print a short report of a run: last values, verdicts, notes, costs, top influence",
        description="Print a short text report of a run: how many steps were tracked, the lines each "
        "instrument of the run declares (the last value of its key scalars; the most influential training "
        "examples if TracIn ran), the verdicts (verdict/...), the notes saying why a number is missing "
        "(note/...), what each instrument cost per step, and the tags no instrument declares.",
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
    """Run the command line; a run that cannot be read at all (no run there, a ``cockpit.jsonl`` that is
    a directory or unreadable) is one message line on stderr and exit status 1, damaged lines are
    skipped and counted on stderr."""
    from cockpit_lite.io import RunReadError

    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    try:
        return args.func(args)
    except (FileNotFoundError, RunReadError) as e:
        print(f"cockpit-lite {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
