"""Dashboard sink and figure: atomic writes, throttling, rendering from a saved run, empty panels."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from cockpit_lite import History, load
from cockpit_lite.figure import DashboardFigure
from cockpit_lite.panels import top_rows as _top_rows
from cockpit_lite.sinks import Dashboard
from cockpit_lite.sinks import dashboard as dashboard_mod
from cockpit_lite.sinks import throttle as throttle_mod
from cockpit_lite.sinks.dashboard import write_atomic
from cockpit_lite.sinks.throttle import Throttle
from tests.sinks_util import train


def _pixels(png: bytes) -> np.ndarray:
    import io

    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(png), format="png")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("dash")
    sink = Dashboard(logdir / "dashboard.png", every_s=0, every_steps=2, max_share=None)
    cockpit = train(5, logdir=logdir, sinks=[sink])
    return logdir, cockpit, sink


def test_sink_renders_every_n_steps_and_at_close(run):
    logdir, _, sink = run
    assert sink.renders == 2 + 1  # steps 1 and 3, then close
    img = _pixels((logdir / "dashboard.png").read_bytes())
    assert img.shape[0] > 500 and img.shape[1] > 800
    assert oct((logdir / "dashboard.png").stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in logdir.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_renders_the_same_from_a_saved_run(run):
    logdir, cockpit, _ = run
    live = DashboardFigure().png(cockpit.history)
    saved = DashboardFigure().png(load(logdir))
    np.testing.assert_array_equal(_pixels(live), _pixels(saved))
    # and the sink's last picture is that picture
    np.testing.assert_array_equal(_pixels((logdir / "dashboard.png").read_bytes()), _pixels(live))


def test_panels_show_the_history_values(run):
    _, cockpit, _ = run
    h = cockpit.history
    fig = DashboardFigure()
    fig.update(h)
    loss = fig.panel("loss")
    np.testing.assert_array_equal(loss._lines["scalar"].get_ydata(), [v for _, v in h["loss"]])
    np.testing.assert_array_equal(loss._lines["scalar"].get_xdata(), [s for s, _ in h["loss"]])
    ps = fig.panel("persample_norms")
    np.testing.assert_array_equal(ps._lines["p50"].get_ydata(), [np.median(v) for v in h.values("persample/grad_norm")])
    alpha = fig.panel("alpha")
    assert "too large" in alpha._verdict.get_text() and alpha._verdict.get_visible()
    influence = fig.panel("influence")
    assert [t.get_text() for t in influence.ax.get_yticklabels()] == ["index 7", "index 9", "index 5"]
    clipping = fig.panel("clipping")
    np.testing.assert_array_equal(clipping._lines["norm"].get_ydata(), [1.0 + s for s in range(5)])
    assert not any(p._note.get_visible() for p in fig.panels)  # every panel has data


def test_absent_tags_say_not_tracked():
    fig = DashboardFigure()
    fig.png(History())  # nothing at all: draws, no exception
    notes = [p._note.get_text() for p in fig.panels if p._note.get_visible()]
    assert len(notes) == 11 and all("not tracked" in n or "no cost records" in n for n in notes)
    h = History()
    for s in range(3):
        h.add(s, {"loss": 1.0 / (s + 1)})
    fig.png(h)  # the same figure updated in place
    missing = {p.key for p in fig.panels if p._note.get_visible()}
    assert "loss" not in missing and "alpha" in missing and "influence" in missing


def test_top_rows():
    labels, values, name = _top_rows({"index": np.array([5, 7, 9]), "self_influence": np.array([0.1, 0.9, 0.5])}, 2)
    assert labels == ["index 7", "index 9"] and list(values) == [0.9, 0.5] and name == "self_influence"


def test_write_is_atomic_under_a_concurrent_reader(tmp_path, monkeypatch):
    path = tmp_path / "d.png"
    versions = [bytes([i]) * (3_000_000 + 1000 * i) for i in range(12)]
    write_atomic(path, versions[0])
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            seen.append(path.read_bytes())

    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        replaced.append((Path(src).parent, Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(dashboard_mod.os, "replace", spy)
    t = threading.Thread(target=reader)
    t.start()
    for v in versions[1:]:
        write_atomic(path, v)
    stop.set()
    t.join()
    assert len(seen) > 0
    complete = set(versions)
    assert all(s in complete for s in seen), "a reader saw a partly written file"
    assert replaced == [(tmp_path, path)] * (len(versions) - 1)  # a temp file in the same directory, renamed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png"]


def test_throttle_by_steps_time_and_share(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(throttle_mod.time, "perf_counter", lambda: now[0])
    t = Throttle(every_steps=3, every_s=10.0, max_share=0.1)
    now[0] = 20.0
    assert [t.tick() for _ in range(3)] == [False, False, True]  # steps gate
    t.done(5.0)  # a 5 s render: the next waits >= 50 s (10% share), more than every_s
    now[0] = 30.0
    assert [t.tick() for _ in range(4)] == [False, False, False, False]
    now[0] = 70.0
    assert t.tick()
    t.done(0.1)
    now[0] = 75.0
    assert not any(t.tick() for _ in range(5))  # time gate: 5 s < 10 s
    now[0] = 81.0
    assert t.tick()
    with pytest.raises(ValueError, match="max_share"):
        Throttle(max_share=2)


def test_needs_no_display_and_no_pyplot(tmp_path):
    code = (
        "import sys; from cockpit_lite.figure import render; from cockpit_lite import History;"
        "h = History(); h.add(0, {'loss': 1.0}); render(h);"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'; print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["MPLBACKEND"] = "TkAgg"  # an interactive backend that would need a display if it were used
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_bad_path():
    with pytest.raises(ValueError, match=r"\.png"):
        Dashboard("runs/exp1/dashboard.jpg")
