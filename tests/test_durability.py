"""Durability of the sinks (issue 14, Musts 1 and 2): a killed run loses at most the step in progress,
SIGTERM closes the run and exits as it would have, a full disk never stops training."""

from __future__ import annotations

import errno
import gc
import json
import os
import random
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from cockpit_lite.instruments import Checkpoints, Loss
from torch import nn

from cockpit_lite import Cockpit, CockpitWarning
from cockpit_lite.sinks import JsonLines, TensorBoard
from cockpit_lite.sinks.appendfile import AppendFile
from cockpit_lite.sinks.events import EventFile
from tests import models
from tests.sinks_util import accumulator

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import sys
sys.path.insert(0, {root!r})
import torch
from torch import nn
from cockpit_lite import Cockpit
from tests import models
torch.manual_seed(0)
model = models.mlp(); opt = torch.optim.SGD(model.parameters(), lr=0.1); loss_fn = nn.CrossEntropyLoss()
cockpit = Cockpit(model, opt, loss_fn, logdir={logdir!r})  # economy preset, JSON lines and TensorBoard
for i in range(100000):
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    print(cockpit.step - 1, flush=True)  # this step is finished: its records went out in opt.step()
"""


def _jsonl_steps(path: Path, tag: str = "loss") -> set[int]:
    steps = set()
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill: the step in progress
            continue
        if tag in row["records"]:
            steps.add(row["step"])
    return steps


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_run_keeps_every_finished_step_in_every_sink(tmp_path, sig):
    logdir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(root=str(ROOT), logdir=str(logdir))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    kill_after = random.Random(int(sig)).randint(5, 40)
    finished = []
    try:
        for line in proc.stdout:
            finished.append(int(line))
            if finished[-1] >= kill_after:
                proc.send_signal(sig)
                break
        finished += [int(line) for line in proc.stdout]  # steps finished before the signal landed
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
    assert finished and finished[-1] >= kill_after, proc.stderr.read()
    assert rc == -sig  # SIGTERM: the exit status of a process without the cockpit (SIG_DFL re-raised)
    assert set(finished) <= _jsonl_steps(logdir / "cockpit.jsonl")
    acc = accumulator(logdir)
    assert set(finished) <= {e.step for e in acc.Scalars("loss")}
    assert set(finished) <= {e.step for e in acc.Histograms("persample/grad_norm")}
    closed = "dashboard" in acc.Tags()["images"]  # drawn at close only (image_every=200, 60 s apart)
    assert closed == (sig == signal.SIGTERM)
    if sig == signal.SIGTERM:  # closed cleanly: the last line of the JSON lines is whole
        assert (logdir / "cockpit.jsonl").read_bytes().endswith(b"\n")


# --- SIGTERM handler: chaining, removal, where it is not installed ---------------------------------------


def _setup(**kw):
    torch.manual_seed(0)
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    return model, opt, loss_fn, Cockpit(model, opt, loss_fn, instruments=[Loss()], **kw)


def _steps(model, opt, loss_fn, n):
    for _ in range(n):
        opt.zero_grad()
        loss_fn(model(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
        opt.step()


@pytest.fixture
def user_handler():
    gc.collect()  # cockpits other tests dropped without closing no longer hold the handler
    calls = []

    def handler(signum, frame):
        calls.append(signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield handler, calls
    finally:
        signal.signal(signal.SIGTERM, old)


def test_sigterm_closes_the_run_then_calls_the_previous_handler(tmp_path, user_handler):
    handler, calls = user_handler
    model, opt, loss_fn, cp = _setup(logdir=tmp_path / "run", sinks=[])
    _steps(model, opt, loss_fn, 3)
    installed = signal.getsignal(signal.SIGTERM)
    assert installed is not handler
    installed(signal.SIGTERM, None)  # what the interpreter does when SIGTERM arrives
    assert calls == [signal.SIGTERM]
    assert cp._closed and cp.sinks[0]._f is None  # closed: sinks flushed and released
    assert signal.getsignal(signal.SIGTERM) is handler  # restored
    assert _jsonl_steps(Path(cp.logdir) / "cockpit.jsonl") == {0, 1, 2}
    _steps(model, opt, loss_fn, 1)  # the user's handler chose to go on: the loop runs, untracked


def test_the_handler_is_removed_when_the_last_cockpit_closes(user_handler):
    handler, _ = user_handler
    *_, first = _setup()
    *_, second = _setup()
    assert signal.getsignal(signal.SIGTERM) not in (handler, None)
    first.close()
    assert signal.getsignal(signal.SIGTERM) not in (handler, None)
    second.close()
    assert signal.getsignal(signal.SIGTERM) is handler


def test_no_handler_where_sigterm_is_ignored_or_off_the_main_thread():
    old = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        *_, cp = _setup()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        cp.close()
    finally:
        signal.signal(signal.SIGTERM, old)
    before, seen = signal.getsignal(signal.SIGTERM), []
    t = threading.Thread(target=lambda: seen.append(_setup()[-1]))
    t.start()
    t.join()
    assert seen and signal.getsignal(signal.SIGTERM) is before
    seen[0].close()


# --- a full or failing disk --------------------------------------------------------------------------------


class Disk:
    """Stands in for a file object's ``write``: fails with ENOSPC while ``full``; ``partial`` bytes of the
    next write land before the disk fills (a write cut short)."""

    def __init__(self, real_write):
        self.real_write, self.full, self.partial, self.failures = real_write, False, 0, 0

    def write(self, data):
        if self.partial:
            n, self.partial, self.full = self.partial, 0, True
            return self.real_write(bytes(data)[:n])
        if self.full:
            self.failures += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real_write(data)


def _disks(cp):
    jl, tb = cp.sinks
    assert isinstance(jl, JsonLines) and isinstance(tb, TensorBoard)
    files = [jl._f, tb.writer.file]
    disks = [Disk(f._f.write) for f in files]
    for f, d in zip(files, disks, strict=True):
        f._f.write = d.write
        f.max_pending = 4096  # small, to see the bound within a few steps
    return files, disks


def test_a_full_disk_never_stops_training_and_writing_resumes(tmp_path):
    model, opt, loss_fn, cp = _setup(logdir=tmp_path / "run", sinks=None)
    tb_sink = cp.sinks[1]
    tb_sink.image_every = None  # no dashboard image at close: only the records are compared
    files, disks = _disks(cp)
    _steps(model, opt, loss_fn, 5)
    before = [f.path.read_bytes() for f in files]
    for d in disks:
        d.partial = 7  # the next write is cut short, then the disk is full
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _steps(model, opt, loss_fn, 60)
        for f in files:
            assert f.pending_bytes <= f.max_pending and f.dropped > 0  # bounded; the rest dropped, counted
        for d in disks:
            d.full = False
        _steps(model, opt, loss_fn, 5)
    msgs = [str(w.message) for w in caught if issubclass(w.category, CockpitWarning)]
    for f in files:  # one warning per file naming it and the cause
        said = [m for m in msgs if str(f.path) in m]
        assert len(said) == 1 and "No space left on device" in said[0], msgs
    assert all(d.failures >= 60 for d in disks)
    with pytest.warns(CockpitWarning, match="lacks"):
        cp.close()
    for f, old in zip(files, before, strict=True):
        assert f.path.read_bytes().startswith(old)  # what was written before is kept
        assert f.closed
    jl_steps = _jsonl_steps(files[0].path)
    tb_steps = {e.step for e in accumulator(cp.logdir).Scalars("loss")}
    for steps, sink in ((jl_steps, cp.sinks[0]), (tb_steps, tb_sink)):
        assert set(range(5)) <= steps and set(range(65, 70)) <= steps  # before the fault and after it
        assert 5 in steps  # the write cut short was completed when space returned
        assert len(steps) < 70 and sink.dropped >= 70 - len(steps)  # every missing step counted


def test_a_write_cut_short_is_completed_not_torn(tmp_path):
    ef = EventFile(tmp_path)
    disk = Disk(ef.file._f.write)
    ef.file._f.write = disk.write
    from tensorboard.compat.proto.summary_pb2 import Summary

    def scalar(step):
        ef.add_summary(Summary(value=[Summary.Value(tag="x", simple_value=float(step))]), step)

    scalar(0)
    disk.partial = 5
    with pytest.warns(CockpitWarning, match="No space left on device"):
        scalar(1)  # 5 bytes land, the rest waits
    scalar(2)
    assert ef.file.pending_bytes > 0
    disk.full = False
    scalar(3)
    ef.close()
    assert [(e.step, e.value) for e in accumulator(tmp_path).Scalars("x")] == [(s, float(s)) for s in range(4)]


def test_the_first_record_after_the_disk_recovers_is_kept_with_the_queue_full(tmp_path):
    """A record that overflows the queue while the disk fails is dropped, unless the queue can be written
    now: the disk came back before the next flush, so the first record after it is kept."""
    f = AppendFile(tmp_path / "a.jsonl", max_pending=10)
    disk = Disk(f._f.write)
    f._f.write = disk.write
    disk.full = True
    with pytest.warns(CockpitWarning, match="No space left on device"):
        f.append(b"0123456\n")
        assert not f.flush()
    f.append(b"dropped\n")  # (the disk is still full: it does not fit)
    assert f.dropped == 1
    disk.full = False
    f.append(b"kept\n")  # does not fit the queue either, but the queue is written first
    assert f.flush() and f.dropped == 1
    f.close()
    assert (tmp_path / "a.jsonl").read_bytes() == b"0123456\nkept\n"


def test_close_releases_the_file_when_flushing_fails(tmp_path, monkeypatch):
    f = AppendFile(tmp_path / "a.jsonl")
    raw = f._f
    f.append(b"line\n")
    raw.write = Disk(raw.write).write
    raw.write.__self__.full = True
    with pytest.warns(CockpitWarning):
        f.close()
    assert raw.closed and f.closed and f.dropped == 1

    jl = JsonLines(tmp_path)
    jl.open(None)
    raw = jl._f._f
    monkeypatch.setattr(AppendFile, "flush", lambda self: (_ for _ in ()).throw(RuntimeError("flush failed")))
    with pytest.raises(RuntimeError, match="flush failed"):
        jl.close()
    assert raw.closed and jl._f is None


def test_a_failing_checkpoint_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    real_save = torch.save

    def save(obj, f, *a, **kw):
        Path(f).write_bytes(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1152 vs 1046")

    torch.manual_seed(0)
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    ckpt = Checkpoints(final=False)
    monkeypatch.setattr(torch, "save", save)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Cockpit(model, opt, loss_fn, instruments=[Loss(), ckpt], logdir=tmp_path / "ck", sinks=[]) as c:
            _steps(model, opt, loss_fn, 2)
    monkeypatch.setattr(torch, "save", real_save)
    directory = Path(c.logdir) / "checkpoints"
    assert not list(directory.glob("*.tmp")) and not list(directory.glob("*.pt"))
    assert any("could not be written" in str(w.message) and "step_00000000.pt" in str(w.message) for w in caught)
    assert _jsonl_steps(Path(c.logdir) / "cockpit.jsonl") == {0, 1}  # training and tracking went on
