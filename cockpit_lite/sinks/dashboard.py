"""Dashboard sink: a live PNG of the dashboard figure, rewritten atomically and throttled.

    Cockpit(..., sinks=[Dashboard("runs/exp1/dashboard.png")])

Open the PNG in any image viewer that reloads on change (or a browser tab you refresh). The figure
(:mod:`cockpit_lite.figure`) is built once and its data replaced in place; it is a pure function of
the cockpit's history and of the panels its instruments declare, so ``cockpit-lite dashboard runs/exp1
-o out.png`` draws the same from disk.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cockpit_lite.errors import CockpitWarning
from cockpit_lite.sinks.base import HistorySink, RunContext
from cockpit_lite.sinks.throttle import Throttle


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux: /proc), else by
    setting it and putting it back at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file in the same directory, then ``os.replace`` it onto ``path``:
    a reader sees the old file or the new one, never a partly written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600; the run's other files follow the umask
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class Dashboard(HistorySink):
    """Render the dashboard to ``path`` (a PNG) while training runs, and once more at close.

    Args:
        path: the PNG to (re)write, e.g. ``runs/exp1/dashboard.png``.
        every_s: at least this many seconds between renders (default 30).
        every_steps: at least this many tracked steps between renders (default 10).
        max_share: never spend more than this fraction of the training time rendering: after a render
            that took r seconds the next waits at least r / max_share seconds (default 0.01, so a
            0.6 s render runs at most once a minute). ``None`` disables the guard.
        dpi: resolution of the PNG (default 90: 1710 x 1035 pixels).

    The first live render is due ``every_s`` seconds after the cockpit attaches; short runs get their
    picture at close. Rendering errors are warned about once and never reach the training loop.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        every_s: float = 30.0,
        every_steps: int = 10,
        max_share: float | None = 0.01,
        dpi: int = 90,
    ):
        self.path = Path(path)
        if self.path.suffix.lower() != ".png":
            raise ValueError(f"Dashboard writes a PNG: give a path ending in .png, got {str(path)!r}")
        self.every_s, self.every_steps, self.max_share, self.dpi = every_s, every_steps, max_share, dpi
        self.throttle = Throttle(every_steps, every_s, max_share)
        self._figure = None
        self.renders = 0
        self._last_step: int | None = None
        self.render_s = 0.0  # total seconds spent rendering and writing
        self.last_png: tuple[int, bytes] | None = None  # (step, PNG) of the last render, for TensorBoard

    def open(self, cockpit: RunContext | None) -> None:
        self._use_history(cockpit)
        self.throttle = Throttle(self.every_steps, self.every_s, self.max_share)

    def write(self, step: int, records: Mapping[str, Any]) -> None:
        if self.history is None:
            self.open(None)
        self._remember(step, records)
        if self._last_step is not None and step <= self._last_step:
            return  # a late record for an earlier step (e.g. cost/sinks_ms): not a new tracked step
        self._last_step = step
        if self.throttle.tick():
            self.render(step)

    def render(self, step: int | None = None) -> None:
        """Draw the figure from the history and write the PNG atomically now."""
        t0 = time.perf_counter()
        try:
            if self._figure is None:
                from cockpit_lite.figure import DashboardFigure  # matplotlib only when a picture is drawn

                self._figure = DashboardFigure(dpi=self.dpi, instruments=self.context.instruments)
            png = self._figure.png(self.history)
            write_atomic(self.path, png)
            self.last_png = (step if step is not None else -1, png)
            if self.context is not None:
                self.context.picture.latest = self.last_png
            self.renders += 1
        except Exception as e:
            warnings.warn(
                f"cockpit-lite: the dashboard could not be drawn ({type(e).__name__}: {e})",
                CockpitWarning,
                stacklevel=2,
            )
        finally:
            cost = time.perf_counter() - t0
            self.render_s += cost
            self.throttle.done(cost)

    def close(self) -> None:
        if self.history is not None:
            last = self.history.last_step()
            self.render(last)
