"""One directory per run: a logdir that holds a run is never appended to silently (issue 13, Must 6)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from cockpit_lite import Cockpit, load
from cockpit_lite.cli import main as cli
from cockpit_lite.errors import CockpitWarning
from cockpit_lite.rundir import Runs
from cockpit_lite.sinks import TensorBoard


def _train(logdir, steps: int, seed: int = 0, state=None, **kw) -> tuple[Cockpit, list[str]]:
    """A few SGD steps; the warnings the cockpit gave."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Cockpit(model, opt, loss_fn, instruments=["loss", "grad_norm"], logdir=logdir, **kw) as cockpit:
            if state is not None:
                cockpit.load_state_dict(state)
            for _ in range(steps):
                x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
    return cockpit, [str(w.message) for w in caught if issubclass(w.category, CockpitWarning)]


def _events(d: Path) -> list[Path]:
    return sorted(d.glob("events.out.tfevents.*"))


def test_a_second_run_goes_beside_the_first_and_says_where(tmp_path):
    first, said = _train(tmp_path / "gpt", 3)
    assert first.logdir == str(tmp_path / "gpt") and not said
    events = _events(tmp_path / "gpt")
    second, said = _train(tmp_path / "gpt", 5, seed=1)
    assert second.logdir == str(tmp_path / "gpt-2")
    assert any("already holds a run" in m and "gpt-2" in m and "resume=True" in m for m in said)
    assert _events(tmp_path / "gpt") == events  # nothing new in the first run's folder
    assert len(_events(tmp_path / "gpt-2")) == 1
    assert [s for s, _ in load(tmp_path / "gpt")["loss"]] == [0, 1, 2]
    assert [s for s, _ in load(tmp_path / "gpt-2")["loss"]] == [0, 1, 2, 3, 4]
    third, _ = _train(tmp_path / "gpt", 1)
    assert third.logdir == str(tmp_path / "gpt-3")


def test_load_of_a_folder_of_runs_lists_them(tmp_path, capsys):
    for _ in range(2):
        _train(tmp_path / "runs" / "gpt", 2)
    _train(tmp_path / "runs" / "mlp" / "a", 4)
    runs = load(tmp_path / "runs")
    assert isinstance(runs, Runs)
    assert list(runs) == ["gpt", "gpt-2", "mlp/a"]
    assert [len(h["loss"]) for h in runs.values()] == [2, 2, 4]
    assert "gpt-2: 2 steps" in repr(runs)
    assert cli(["summary", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert all(str(tmp_path / "runs" / name) in out for name in runs)
    with pytest.raises(SystemExit, match="holds 3 runs"):
        cli(["dashboard", str(tmp_path / "runs")])
    with pytest.raises(FileNotFoundError, match="no cockpit run"):
        load(tmp_path / "nothing")


def test_an_empty_folder_is_used_as_it_is(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    cockpit, said = _train(tmp_path / "run", 2)
    assert cockpit.logdir == str(tmp_path / "run") and not said


def test_resume_continues_the_run_and_the_later_records_win(tmp_path):
    first, _ = _train(tmp_path / "run", 6)
    full = load(tmp_path / "run")
    state = {**first.state_dict(), "step": 3}  # a checkpoint of step 3, with records up to 5 on disk
    resumed, said = _train(tmp_path / "run", 5, seed=7, state=state, resume=True)
    assert resumed.logdir == str(tmp_path / "run") and not said
    assert not (tmp_path / "run-2").exists()
    run = load(tmp_path / "run")
    assert [s for s, _ in run["loss"]] == list(range(8))  # one record per step
    assert run["loss"][:3] == full["loss"][:3]
    assert [v for _, v in run["loss"][3:]] == [v for _, v in resumed.history["loss"]]
    assert run["loss"][3][1] != full["loss"][3][1]  # the resumed run's values replaced the old ones


def test_sinks_follow_the_run_or_get_a_directory_of_their_own(tmp_path):
    _train(tmp_path / "run", 1)
    _train(tmp_path / "tb", 1)
    tb_same, tb_other = TensorBoard(tmp_path / "run"), TensorBoard(tmp_path / "tb")
    cockpit, said = _train(tmp_path / "run", 2, sinks=[tb_same, tb_other])
    assert cockpit.logdir == str(tmp_path / "run-2")
    assert tb_same.logdir == str(tmp_path / "run-2") and tb_other.logdir == str(tmp_path / "tb-2")
    assert len(_events(tmp_path / "run")) == 1 and len(_events(tmp_path / "tb")) == 1
    assert len(_events(tmp_path / "run-2")) == 1 and len(_events(tmp_path / "tb-2")) == 1
    assert any("tb-2" in m for m in said)
