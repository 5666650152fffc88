"""The cockpit-lite command line on a saved run."""

from __future__ import annotations

import io
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from cockpit_lite import load
from cockpit_lite.cli import main
from cockpit_lite.figure import DashboardFigure
from tests.sinks_util import train


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    train(4, logdir=d, sinks=[])
    return d


def test_summary(logdir, capsys):
    assert main(["summary", str(logdir)]) == 0
    out = capsys.readouterr().out
    h = load(logdir)
    assert "4 tracked steps (steps 0 to 3)" in out
    assert f"{h.last('loss'):.4g}" in out  # last value of the batch loss
    assert "lr (step 3): too large: alpha > 1" in out  # the verdict
    assert "cost per tracked step" in out and "gradient_tests" in out and "engine" in out
    med = np.median(h.values("cost/engine_ms"))
    [engine] = [line for line in out.splitlines() if line.split()[:1] == ["engine"]]
    assert f"{med:.3f} ms" in engine
    top = out.split("top influence")[1].splitlines()
    assert [line.split()[:2] for line in top[1:4]] == [["index", "7"], ["index", "9"], ["index", "5"]]


def test_dashboard_command_renders_the_run(logdir, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["dashboard", str(logdir), "-o", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    expected = DashboardFigure().png(load(logdir))
    np.testing.assert_array_equal(matplotlib.image.imread(out), matplotlib.image.imread(io.BytesIO(expected)))
    assert main(["dashboard", str(logdir)]) == 0  # default: LOGDIR/dashboard.png
    assert (logdir / "dashboard.png").stat().st_size > 10_000


def test_help_a_newcomer_can_follow(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for needle in ("summary", "dashboard", "examples:", "cockpit-lite summary runs/exp1", "logdir="):
        assert needle in text
    for cmd in ("summary", "dashboard"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "example" in capsys.readouterr().out
    assert main([]) == 2  # no command: the help, and a non-zero code


def test_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["summary", str(tmp_path / "nope")]) == 1
    assert "cockpit.jsonl does not exist" in capsys.readouterr().err


def test_entry_point_module_runs():
    out = subprocess.run([sys.executable, "-m", "cockpit_lite.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: cockpit-lite" in out.stdout
