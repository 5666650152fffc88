"""Instruments declare their presentation; the dashboard, the TensorBoard layout and the summary
assemble it: a real plugin package, tags nobody declares, notes, named instances, the History API."""

from __future__ import annotations

import copy
import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cockpit_lite import Cockpit, History, Instrument, load
from cockpit_lite.cli import summary_text
from cockpit_lite.figure import DashboardFigure
from cockpit_lite.panels import GenericPanel, LinePanel
from cockpit_lite.presentation import (
    GENERIC_CATEGORY,
    MAX_GENERIC_LINES,
    MAX_GENERIC_PANELS,
    Presenter,
    assemble,
)
from cockpit_lite.presentation import summary_text as full_summary
from cockpit_lite.sinks import TensorBoard
from tests import models
from tests.reference import flat, per_sample_grads_loop
from tests.sinks_util import accumulator

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "tests" / "plugin_pkg"
B = 8


def _batches(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, 6, generator=gen), torch.randint(0, 3, (B,), generator=gen)) for _ in range(n)]


def _run(instruments, steps: int = 3, **kw):
    """A few SGD steps of the tiny MLP; returns (cockpit, the model before training, the batches)."""
    torch.manual_seed(0)
    model = models.mlp()
    start = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    batches = _batches(steps)
    with Cockpit(model, opt, loss_fn, instruments=instruments, **kw) as cockpit:
        for x, y in batches:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    return cockpit, start, batches


def _layout(logdir):
    """The custom-scalars layout TensorBoard shows: the last one written, read back from the event file."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    events = accumulator(logdir).Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(events[-1].tensor_proto.string_val[0])
    return {c.title: {chart.title: chart for chart in c.chart} for c in layout.category}, events


# --- a real plugin package ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """tests/plugin_pkg installed with pip into a fresh directory put on sys.path (nothing downloaded)."""
    src = tmp_path_factory.mktemp("plugin_src") / "plugin_pkg"
    shutil.copytree(PLUGIN, src)  # pip builds in the source tree: build/ and *.egg-info stay in tmp
    target = tmp_path_factory.mktemp("plugin_site")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    cmd += ["--disable-pip-version-check", "--target", str(target), str(src)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        for name in [m for m in sys.modules if m == "my_package" or m.startswith("my_package.")]:
            del sys.modules[name]
        importlib.invalidate_caches()


@pytest.fixture(scope="module")
def plugin_run(plugin, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("plugin_run")
    cockpit, start, batches = _run(["grad_norm_ratio", "loss"], steps=4, logdir=logdir)
    return logdir, cockpit, start, batches


def test_plugin_is_found_by_its_entry_point(plugin_run):
    from cockpit_lite.registry import available_instruments

    _, cockpit, _, _ = plugin_run
    cls = available_instruments()["grad_norm_ratio"]
    assert cls.__module__ == "my_package.sharpness"
    assert [type(i) for i in cockpit.instruments][0] is cls


def test_plugin_value_equals_an_independent_computation(plugin_run):
    _, cockpit, start, batches = plugin_run
    x, y = batches[0]
    g = flat(per_sample_grads_loop(start, nn.CrossEntropyLoss(), x, y))  # float64, one autograd call each
    expected = np.linalg.norm(g, axis=1).max() / np.linalg.norm(g.mean(0))
    step, value = cockpit.history["my/grad_norm_ratio"][0]
    assert step == 0
    assert value == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("where", ["live", "saved"])
def test_plugin_panels_in_the_dashboard(plugin_run, where):
    logdir, cockpit, _, _ = plugin_run
    if where == "live":  # the sinks' view: the run's instruments
        fig, history = DashboardFigure(instruments=cockpit.instruments), cockpit.history
    else:  # cockpit-lite dashboard LOGDIR: the registered classes whose tags are on disk
        fig, history = DashboardFigure(), load(logdir)
    fig.update(history)
    line = fig.panel("One sample's pull")
    np.testing.assert_array_equal(line._lines["my/grad_norm_ratio"].get_ydata(), history.values("my/grad_norm_ratio"))
    np.testing.assert_array_equal(line._lines["my/grad_norm_ratio"].get_xdata(), [0, 1, 2, 3])
    assert line.ax.get_title(loc="left") == "One sample's pull" and line.owners == ("GradNormRatio",) and line.in_run
    hist = fig.panel("Grad norm ratio over the run")  # the plugin's own Panel subclass
    heights = [bar.get_height() for bar in hist._bars[0]]
    expected, _ = np.histogram(history.values("my/grad_norm_ratio"), bins=20)
    assert heights == list(expected) and sum(heights) == 4
    assert not line._note.get_visible() and not hist._note.get_visible()
    # the built-in 3 x 4 grid first, the plugin's panels after it, in a fourth row
    keys = [p.key for p in fig.panels]
    assert keys.index("One sample's pull") == 12 and keys.index("Grad norm ratio over the run") == 13
    assert fig.fig.get_size_inches()[1] == pytest.approx(4 * 11.5 / 3)
    assert fig.panel("loss").in_run and not fig.panel("alpha").in_run
    assert "not tracked: add the Alpha instrument" in fig.panel("alpha")._note.get_text()


def test_plugin_chart_in_the_tensorboard_layout(plugin_run):
    logdir, cockpit, _, _ = plugin_run
    layout, events = _layout(logdir)
    assert len(events) == 1 and events[0].step == 0  # written at open: every tag of the run is declared
    chart = layout["My instruments"]["grad norm ratio"]
    assert list(chart.multiline.tag) == ["^my/grad_norm_ratio$"]
    assert list(layout) == ["Loss", "Step size", "Gradient tests (1.0 = limit; above = noise dominates)",
                            "Per-sample gradients", "Clipping", "Influence", "Cost", "My instruments"]  # fmt: skip
    scalars = accumulator(logdir).Scalars("my/grad_norm_ratio")
    np.testing.assert_array_equal([e.value for e in scalars], np.float32(cockpit.history.values("my/grad_norm_ratio")))


def test_plugin_line_in_the_summary(plugin_run, capsys):
    from cockpit_lite.cli import main

    logdir, cockpit, _, _ = plugin_run
    text = summary_text(load(logdir))
    step, value = cockpit.history["my/grad_norm_ratio"][-1]
    [line] = [row for row in text.splitlines() if "largest sample / batch gradient" in row]
    assert f"{value:.4g}" in line and f"(step {step};" in line
    assert "other records" not in text  # nothing undeclared
    assert main(["summary", str(logdir)]) == 0
    assert line in capsys.readouterr().out


def _doc_blocks(lang: str) -> list[str]:
    text = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_the_docs_example_is_the_tested_plugin_and_runs():
    code = _doc_blocks("python")[0]
    assert code == (PLUGIN / "my_package" / "sharpness.py").read_text(encoding="utf-8")
    toml = _doc_blocks("toml")[0]
    entry = 'grad_norm_ratio = "my_package.sharpness:GradNormRatio"'
    assert entry in toml and entry in (PLUGIN / "pyproject.toml").read_text(encoding="utf-8")
    namespace: dict = {}
    exec(compile(code, "docs/plugins.md", "exec"), namespace)  # the block as the reader copies it
    cockpit, _, _ = _run([namespace["GradNormRatio"](), "loss"], steps=2)
    fig = DashboardFigure(instruments=cockpit.instruments)
    fig.update(cockpit.history)
    np.testing.assert_array_equal(
        fig.panel("One sample's pull")._lines["my/grad_norm_ratio"].get_ydata(),
        cockpit.history.values("my/grad_norm_ratio"),
    )
    assert sum(b.get_height() for b in fig.panel("Grad norm ratio over the run")._bars[0]) == 2
    charts = assemble(cockpit.history, cockpit.instruments).charts
    assert charts["My instruments"] == {"grad norm ratio": ["Multiline", ["^my/grad_norm_ratio$"]]}


# --- tags nobody declares ----------------------------------------------------------------------------------
class Undeclared(Instrument):
    """Writes tags no instrument declares: scalars of two groups, a per-sample vector and a text."""

    def compute(self, record):
        s = record.step
        return {
            "foo/a": 1.0 + s,
            "foo/b": 10.0 * (s + 1),
            "foo/vec": np.arange(4.0) + s,
            "bar": -float(s),
            "baz/text": f"step {s}",
        }


def test_undeclared_tags_get_a_generic_panel_chart_and_line(tmp_path):
    cockpit, _, _ = _run(["loss", Undeclared()], steps=3, logdir=tmp_path)
    h = cockpit.history
    pres = assemble(h, cockpit.instruments)
    assert sorted(pres.undeclared) == ["bar", "baz/text", "foo/a", "foo/b", "foo/vec"]
    fig = DashboardFigure(instruments=cockpit.instruments)
    fig.update(h)
    foo = fig.panel("generic:foo")
    assert isinstance(foo, GenericPanel) and foo.title == "Other records: foo/..."
    np.testing.assert_array_equal(foo._lines["foo/a"].get_ydata(), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(foo._lines["foo/b"].get_ydata(), [10.0, 20.0, 30.0])
    np.testing.assert_array_equal(foo._lines["foo/vec"].get_ydata(), [1.5, 2.5, 3.5])  # median of 0..3 + s
    np.testing.assert_array_equal(fig.panel("generic:bar")._lines["bar"].get_ydata(), [0.0, -1.0, -2.0])
    text_panel = fig.panel("generic:baz")  # nothing to plot: the latest text
    assert text_panel._note.get_visible() and "baz/text: step 2" in text_panel._note.get_text()
    assert [p.key for p in fig.panels][12:] == ["generic:bar", "generic:baz", "generic:foo"]

    layout, events = _layout(tmp_path)  # written again, under the step where the new tags appeared
    assert [e.step for e in events] == [0, 0]
    generic = layout[GENERIC_CATEGORY]
    assert sorted(generic) == ["bar/...", "foo/..."]  # scalar groups only
    assert list(generic["foo/..."].multiline.tag) == ["^foo/a$", "^foo/b$"]
    for chart in generic.values():
        assert all(any(re.match(r, t) for t in h) for r in chart.multiline.tag)
    assert len(accumulator(tmp_path).Scalars("loss")) == 3  # nothing dropped by the second layout

    text = summary_text(load(tmp_path))
    other = text.split("other records (declared by no instrument):")[1].split("verdicts:")[0]
    rows = {line.split()[0]: line for line in other.strip().splitlines()}
    assert set(rows) == {"bar", "baz/text", "foo/a", "foo/b", "foo/vec"}
    assert "3  (step 2;" in rows["foo/a"] and "4 values, median 3.5" in rows["foo/vec"]
    assert rows["baz/text"].endswith("step 2  (step 2)")


def test_many_undeclared_tags_stay_readable():
    h = History()
    for s in range(3):
        h.add(s, {f"g{i:03d}/t{j}": float(i + j + s) for i in range(100) for j in range(5)})  # 500 tags
    fig = DashboardFigure()
    fig.update(h)
    generic = [p for p in fig.panels if isinstance(p, GenericPanel)]
    assert len(generic) == MAX_GENERIC_PANELS
    assert [p.title for p in generic] == [
        "Other records: g000/...",
        "Other records: g001/...",
        "Other records: g002/...",
        f"Other records: {100 - MAX_GENERIC_PANELS + 1} more tag groups",
    ]
    assert len(generic[-1].tag_list) == 5 * (100 - MAX_GENERIC_PANELS + 1)
    assert len(generic[-1]._lines) == GenericPanel.MAX_LINES and "+479 more tags" in generic[-1]._more.get_text()
    assert len(fig.panels) == 12 + MAX_GENERIC_PANELS
    charts = assemble(h).charts[GENERIC_CATEGORY]
    assert len(charts) == 16 and "85 more groups" in charts
    [rest] = charts["85 more groups"][1]
    assert re.match(rest, "g099/t4") and re.match(rest, "g015/t0") and not re.match(rest, "g014/t0")
    other = summary_text(h).split("other records (declared by no instrument):")[1].split("verdicts:")[0]
    lines = other.strip().splitlines()
    assert len(lines) == MAX_GENERIC_LINES + 1 and "480 more tags" in lines[-1]


# --- notes ----------------------------------------------------------------------------------------------------
def test_a_note_shows_in_the_empty_panel_and_in_the_summary():
    h = History()
    h.add(0, {"loss": 1.0, "cost/step_ms": 2.0, "note/alpha": "no end point yet"})
    h.add(1, {"loss": 0.9, "cost/step_ms": 2.0, "note/alpha": "batch of one sample: alpha needs B >= 2"})
    h.add(1, {"note/cockpit": "per-sample statistics skipped: train-mode BatchNorm"})
    fig = DashboardFigure()  # a saved run: note/alpha tells that Alpha was in it
    fig.update(h)
    alpha = fig.panel("alpha")
    assert alpha.in_run and alpha._note.get_visible()
    shown = alpha._note.get_text().replace("\n", " ")
    assert "batch of one sample: alpha needs B >= 2" in shown and "note/alpha, step 1" in shown
    assert "not tracked" not in shown
    clip = fig.panel("clipping")  # no note, not in the run: how to add it
    assert clip._note.get_text().startswith("not tracked: add the Clipping")
    summary = fig.panel("core:verdicts")._text.get_text()
    assert "note alpha (step 1)" in summary and "note cockpit (step 1)" in summary

    text = summary_text(h)
    notes = text.split("notes (why a number is missing):")[1].splitlines()
    assert notes[1] == "  alpha (step 1; 2 notes, the last:) batch of one sample: alpha needs B >= 2"
    assert notes[2] == "  cockpit (step 1) per-sample statistics skipped: train-mode BatchNorm"


def test_a_panel_of_an_instrument_in_the_run_without_records_says_so():
    class Silent(Instrument):
        TAGS = {"silent/x": "nothing, ever"}
        PANELS = (LinePanel("Silent", ["silent/x"]),)

    h = History()
    h.add(0, {"loss": 1.0})
    fig = DashboardFigure(instruments=[Silent()])
    fig.update(h)
    assert fig.panel("Silent")._note.get_text() == "no records yet from Silent"
    h.add(1, {"note/silent": "x needs a second step"})
    fig.update(h)
    assert fig.panel("Silent")._note.get_text().startswith("x needs a second step")


# --- named instances -----------------------------------------------------------------------------------------
def test_a_named_instance_gets_its_presentation_prefixed(tmp_path):
    from cockpit_lite.instruments import Loss

    cockpit, _, _ = _run([Loss(name="aux")], steps=2, logdir=tmp_path)
    h = cockpit.history
    assert "aux/loss" in h and "loss" not in h
    fig = DashboardFigure(instruments=cockpit.instruments)
    fig.update(h)
    panel = fig.panel("loss", prefix="aux")
    assert panel.ax.get_title(loc="left") == "Training loss [aux]"
    np.testing.assert_array_equal(panel._lines["scalar"].get_ydata(), h.values("aux/loss"))
    assert fig.panel("loss").key == "loss" and not fig.panel("loss").in_run  # the unnamed one: not tracked
    assert not assemble(h, cockpit.instruments).undeclared
    layout, _ = _layout(tmp_path)
    assert list(layout["Loss"]["batch loss [aux]"].multiline.tag) == ["^aux/loss$"]
    margin = layout["Loss"]["per-sample loss: median, 5% and 95% quantiles [aux]"].margin.series[0]
    assert [margin.value, margin.lower, margin.upper] == [f"aux/loss/per_sample/{q}" for q in ("p50", "p5", "p95")]
    text = full_summary(h, instruments=cockpit.instruments)
    [row] = [line for line in text.splitlines() if "batch loss [aux]" in line]
    assert f"{h.last('aux/loss'):.4g}" in row


# --- the assembly -----------------------------------------------------------------------------------------------
def test_the_builtin_presentation_comes_from_the_instruments():
    from cockpit_lite.instruments import Alpha, GradNorm, TracIn, UpdateSize
    from cockpit_lite.instruments.gradnorm import GRAD_AND_UPDATE

    assert GradNorm.PANELS == (GRAD_AND_UPDATE,) == UpdateSize.PANELS
    pres = assemble(History())
    owners = {p.key: p.owners for p in pres.panels}
    assert owners["grad_norm_update"] == ("GradNorm", "UpdateSize")  # one panel for both
    assert [p.key for p in pres.panels] == [
        "loss", "grad_norm_update", "distance", "alpha",
        "gradient_tests", "persample_norms", "persample_hist", "core:verdicts",
        "clipping", "influence", "core:cost_bars", "core:cost_time",
    ]  # fmt: skip
    assert TracIn.KEY == TracIn().key == "tracin"
    # a declaration is never attached itself: each figure draws on copies
    fig1, fig2 = DashboardFigure(), DashboardFigure()
    assert fig1.panel("alpha") is not fig2.panel("alpha") and not hasattr(Alpha.PANELS[0], "ax")


def test_presenter_reassembles_only_when_new_tags_need_it():
    p = Presenter()
    h = History()
    h.add(0, {"loss": 1.0})
    first = p(h)
    assert first.headline == [("loss", "batch loss")]
    h.add(1, {"loss": 0.5, "loss/per_sample/p5": 0.1, "cost/step_ms": 1.0})  # of instruments found already
    assert p(h) is first
    h.add(2, {"grad_norm": 2.0})  # GradNorm is in the run after all
    second = p(h)
    assert second is not first and second.headline == [("loss", "batch loss"), ("grad_norm", "gradient norm")]
    h.add(3, {"mine/x": 1.0})
    third = p(h)
    assert third is not second and third.undeclared == ["mine/x"]
    assert p(h) is third


def test_instruments_and_presentation_import_without_matplotlib():
    code = (
        "import sys; import cockpit_lite.instruments, cockpit_lite.presentation, cockpit_lite.panels, "
        "cockpit_lite.cli, cockpit_lite.sinks;"
        "from cockpit_lite import History; from cockpit_lite.presentation import assemble, summary_text;"
        "h = History(); h.add(0, {'loss': 1.0}); assemble(h); summary_text(h);"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'); assert not bad, bad; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_tensorboard_layout_none_or_fixed(tmp_path):
    fixed = {"Mine": {"loss only": ["Multiline", ["^loss$"]]}}
    _run(["loss"], steps=1, sinks=[TensorBoard(tmp_path / "fixed", layout=fixed, image_every=None)])
    layout, events = _layout(tmp_path / "fixed")
    assert len(events) == 1 and list(layout) == ["Mine"]
    _run(["loss"], steps=1, sinks=[TensorBoard(tmp_path / "none", layout=None, image_every=None)])
    acc = accumulator(tmp_path / "none")
    assert "custom_scalars__config__" not in acc.Tags()["tensors"]
    with pytest.raises(ValueError, match="layout"):
        TensorBoard(tmp_path, layout="everything")


# --- the History API -----------------------------------------------------------------------------------------
def test_history_public_api():
    h = History()
    for s in range(10):
        h.add(s, {"a": float(s * s), "v": np.arange(3.0) + s, "t": f"text {s}"})
    h.add(3, {"late": 7.0})
    steps, values = h.series("a")
    np.testing.assert_array_equal(steps, np.arange(10.0))
    np.testing.assert_array_equal(values, np.arange(10.0) ** 2)
    steps, values = h.series("a", max_points=4)  # stride ceil(10 / 4) = 3 from the end: 9, 6, 3, 0
    np.testing.assert_array_equal(steps, [0.0, 3.0, 6.0, 9.0])
    np.testing.assert_array_equal(values, [0.0, 9.0, 36.0, 81.0])
    assert np.isnan(h.series("t")[1]).all() and h.series("absent")[0].size == 0
    assert h.latest("a") == (9, 81.0) and h.latest("absent") is None
    assert h.last("a") == 81.0 and h.last("absent", 5) == 5  # the existing method, unchanged
    assert h.tags() == ["a", "late", "t", "v"] and h.tags("l") == ["late"]
    assert h.get("absent") is None and h.get("absent", []) == [] and h.get("late") == [(3, 7.0)]
    assert h.value_at("a", 4) == 16.0 and h.value_at("a", 99, "none") == "none"
    assert "a" in h and "absent" not in h and len(h) == 4
    with pytest.raises(KeyError, match="tags present"):
        h["absent"]


def test_nothing_outside_records_reads_the_private_history_data():
    private = "." + "_data"  # History's storage
    pattern = re.compile(re.escape(private) + r"\b")
    offenders = []
    for folder in ("cockpit_lite", "instruments", "tests", "demos", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "records.py" and path.parent.name == "cockpit_lite":
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders


def test_work_on_some_steps_is_read_as_a_run_over_the_steps_between_runs():
    """A piece of work on 1 step in 10 (the budget, ``every=``, Sharpness' schedule) costs its run over
    the 10 steps in the cost bars and the summary, not its run as if it were every step's."""
    from cockpit_lite.panels import CostBarsPanel, cost_phrase, instrument_cost

    h = History()
    for s in range(60):
        recs = {"cost/step_ms": 10.0 + (s % 3), "cost/cockpit_ms": 2.0, "cost/cheap_ms": 1.0 + 0.01 * (s % 5)}
        if s % 10 == 3:
            recs["cost/costly_ms"] = 40.0 + s % 7  # runs at 3, 13, ..., 53: medians 43, gap 10
        h.add(s, recs)
    h.add(59, {"cost/once_ms": 7.0})
    assert instrument_cost(h, "cheap") == pytest.approx((1.02, 1.02, 1.0))
    costly = [40.0 + s % 7 for s in range(3, 60, 10)]
    assert instrument_cost(h, "costly") == pytest.approx((np.median(costly) / 10, np.median(costly), 10.0))
    per_step, run, gap = instrument_cost(h, "once")
    assert run == 7.0 and np.isnan(per_step) and np.isnan(gap)
    step = float(np.median([10.0 + (s % 3) for s in range(10, 60)]))  # the bars: the last 50 steps
    assert cost_phrase(*instrument_cost(h, "costly"), step) == f"{np.median(costly):.2f} ms a run, 1 in 10 steps: " + (
        f"{np.median(costly) / 10:.2f} ms ({np.median(costly) / 10 / step:.0%}) a step"
    )
    assert cost_phrase(*instrument_cost(h, "once"), step) == "7.00 ms a run (once so far)"
    text = full_summary(h)
    assert "costly" in text and "a run, 1 in 10 steps" in text and "once so far" in text

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    panel = CostBarsPanel()
    panel.attach(ax)
    panel.draw(h)
    labels = {t.get_text() for t in ax.texts}
    plt.close(fig)
    assert f"{np.median(costly):.2f} ms a run, 1 in 10 steps: {np.median(costly) / 10:.2f} ms" in " ".join(labels)
    bars = {tick.get_text(): patch.get_width() for tick, patch in zip(ax.get_yticklabels(), ax.patches, strict=True)}
    assert bars["costly"] == pytest.approx(np.median(costly) / 10) and bars["cheap"] == pytest.approx(1.02)
