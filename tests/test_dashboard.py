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


def test_an_all_nan_series_shows_its_note_and_a_lone_point_a_marker():
    """Line panels: values that are all NaN (a statistic undefined so far) show the instrument's note, not
    empty axes; a series with one finite point (a measurement every 100 steps) draws it as a marker."""
    h = History()
    for s in range(3):
        h.add(s, {"tests/norm": float("nan"), "tests/inner": float("nan"), "tests/ortho": float("nan")})
        h.add(s, {"note/gradient_tests": f"||gbar||^2 = 0: undefined ({s})"})
    h.add(0, {"sharpness/lambda_max": 4.0, "sharpness/limit": 40.0})
    fig = DashboardFigure()
    fig.update(h)
    tests = fig.panel("gradient_tests")
    assert tests._note.get_visible() and "||gbar||^2 = 0: undefined (2)" in tests._note.get_text()
    sharp = next(p for p in fig.panels if "sharpness/lambda_max" in getattr(p, "tag_list", ()))
    assert all(line.get_marker() == "o" for line in sharp._lines.values() if line.get_visible())
    for s in range(1, 3):
        h.add(s * 100, {"sharpness/lambda_max": 4.0 + s, "sharpness/limit": 40.0})
    fig.update(h)  # neighbours now: lines again, and the legend follows
    assert all(line.get_marker() == "None" for line in sharp._lines.values())
    assert all(handle.get_marker() == "None" for handle in sharp.ax.get_legend().legend_handles)


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


def test_influence_panel_shows_self_influence_next_to_probe_tables():
    """A TracIn run with probes writes proponents and opponents (one column per probe) besides the
    self-influence table: the panel draws the self-influence's top examples, largest first."""
    import torch
    from cockpit_lite.instruments import TracIn
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from cockpit_lite import Cockpit

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt, lf = torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss()
    data = TensorDataset(torch.randn(24, 4), torch.randint(0, 3, (24,)))
    tracin = TracIn(probes=(torch.randn(2, 4), torch.randint(0, 3, (2,))))
    with Cockpit(model, opt, lf, instruments=[tracin], sinks=[]) as cockpit:
        for x, y in cockpit.track(DataLoader(data, batch_size=8)):
            opt.zero_grad()
            lf(model(x), y).backward()
            opt.step()
    h = cockpit.history
    assert {"tracin/proponents", "tracin/opponents", "tracin/self_influence/top"} <= set(h)
    fig = DashboardFigure()
    fig.update(h)
    panel = fig.panel("influence")
    assert not panel._note.get_visible()
    top = h["tracin/self_influence/top"][-1][1]
    score = dict(zip(np.asarray(top["index"]).tolist(), np.asarray(top["score"]).tolist(), strict=True))
    widths = [bar.get_width() for bar in panel._bars[0]]
    assert widths == sorted(score.values(), reverse=True)[: panel.TOP]  # the largest, largest first
    labels = [t.get_text() for t in panel.ax.get_yticklabels()]
    assert [score[int(lab.split()[1])] for lab in labels] == widths  # each example with its own value
    from cockpit_lite.instruments.panels import influence_summary

    summary = influence_summary(h, lambda t: t)  # cockpit-lite summary's lines: the same table
    assert summary[0].startswith("top influence (tracin/self_influence/top") and len(summary) == 1 + len(widths)
