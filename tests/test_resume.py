"""Resuming a run from a checkpoint: ``Cockpit.state_dict()`` / ``load_state_dict()`` and every
instrument's state.

The end-to-end test trains the run of ``tests/resume_run.py`` uninterrupted for 16 steps, and separately
to step 6, saves model, optimizer, RNG and cockpit state with ``torch.save``, and resumes in a new
process (``torch.load(weights_only=True)``). The records of steps >= 6 (and those the resumed run files
under earlier steps: step 5's alpha, AGC's pending steps 4 and 5), the verdicts and the checkpoint files
must equal the uninterrupted run's **exactly**: the resumed process runs the same float operations on the
same inputs in the same order on the CPU with one thread, and every state is restored bit for bit (the
windows of Clipping are restored oldest first rather than in their ring layout, and every statistic
over them sorts first, so the order cannot change a bit either). Only ``cost/*`` (wall times) is left out.
Leaving out any one instrument's state must break the match (tested for each).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from cockpit_lite.instruments import Alpha, Checkpoints, Clipping, Distance, GradientTests, TracIn
from cockpit_lite.instruments.clipping import _Window
from torch import nn
from torch.utils.data import DataLoader

from cockpit_lite import Cockpit, load
from cockpit_lite.records import to_json
from tests import resume_run as R

ROOT = Path(__file__).resolve().parents[1]
#: instruments with state, and the tags that show it (Checkpoints counts its files in tracin/checkpoints)
STATEFUL = {
    "alpha": ("alpha", "verdict/lr"),
    "clipping": ("clip/",),
    "tracin": ("tracin/self_influence", "tracin/proponents", "tracin/opponents", "tracin/steps"),
    "distance": ("distance",),
    "checkpoints": ("tracin/checkpoints",),
}


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _plain(state, where="state"):
    """Only what torch.load(weights_only=True) reads back as saved: tensors, Python scalars, str,
    None, and lists/tuples/dicts of those (no numpy arrays or numpy scalars)."""
    if isinstance(state, dict):
        for k, v in state.items():
            assert isinstance(k, (str, int)), f"{where}: key {k!r}"
            _plain(v, f"{where}[{k!r}]")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            _plain(v, f"{where}[{i}]")
    else:
        assert state is None or type(state) in (torch.Tensor, bool, int, float, str), f"{where}: {type(state)}"


def _same(a, b) -> bool:
    if isinstance(a, dict) or isinstance(b, dict):
        same_keys = isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
        return same_keys and all(_same(a[k], b[k]) for k in a)
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and not isinstance(a, np.ndarray):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, str) or isinstance(b, str) or a is None or b is None:
        return a == b
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        return bool(np.array_equal(a.astype(np.float64), b.astype(np.float64), equal_nan=True))
    return bool(np.array_equal(a, b))


def differences(full, resumed, k: int) -> list[str]:
    """Every mismatch between two runs' records (``cost/*`` aside): the records of steps >= k must be
    the same (same steps, same values, exactly), and every record the resumed run filed under an
    earlier step must equal the uninterrupted run's at that step."""
    out = []
    for tag in sorted(set(full) | set(resumed)):
        if tag.startswith("cost/"):
            continue
        f, r = full.get(tag, []), resumed.get(tag, [])
        fk, rk = [(s, v) for s, v in f if s >= k], [(s, v) for s, v in r if s >= k]
        if [s for s, _ in fk] != [s for s, _ in rk]:
            out.append(f"{tag}: steps {[s for s, _ in fk]} uninterrupted, {[s for s, _ in rk]} resumed")
            continue
        out += [f"{tag} at step {s}: {a!r} != {b!r}" for (s, a), (_, b) in zip(fk, rk, strict=True) if not _same(a, b)]
        earlier = dict(f)
        for s, v in r:
            if s < k and not (s in earlier and _same(earlier[s], v)):
                out.append(f"{tag} at step {s} (filed by the resumed run): {earlier.get(s)!r} != {v!r}")
    return out


def _by_key(cockpit):
    return {i.key: i for i in cockpit.instruments}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted run (records, verdicts, checkpoint files) and the checkpoint at step K."""
    d = tmp_path_factory.mktemp("resume")
    with torch.random.fork_rng():
        model, opt, loss_fn, cockpit = R.build(d / "full", d / "ck_full")
        R.train(model, opt, loss_fn, cockpit, 0, R.STEPS)
        cockpit.close()
        verdicts = cockpit.verdicts()

        model, opt, loss_fn, part = R.build(d / "part", d / "ck_part")
        R.train(model, opt, loss_fn, part, 0, R.K)
        state = part.state_dict()
        R.save(d / "checkpoint.pt", model, opt, part)
        part.close()
    return types.SimpleNamespace(dir=d, full=load(d / "full"), verdicts=verdicts, state=state, part=_by_key(part))


def test_checkpoint_premise(runs):
    """The checkpoint is taken where resuming is hard: Alpha waits for the end point of step K-1, the
    clipping windows are partly filled and AGC holds steps not yet computed; TracIn has sums."""
    st, inst = runs.state["instruments"], runs.part
    assert runs.state["step"] == R.K and runs.state["version"] == 1
    _plain(runs.state)
    assert st["alpha"]["pending"]["step"] == R.K - 1
    assert 0 < len(st["alpha"]["alphas"]) < inst["alpha"].window
    assert [p["step"] for p in st["clipping"]["agc_pending"]] == [R.K - 2, R.K - 1]
    assert 0 < len(st["clipping"]["global_norms"]) == R.K < inst["clipping"].window
    assert st["tracin"]["steps"] == st["tracin"]["probe_steps"] == R.K
    assert st["gradient_tests"] == st["loss"] == {}


def test_resume_in_a_new_process_continues_the_run_exactly(runs, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    logdir, ckdir = tmp_path / "resumed", tmp_path / "ck_resumed"
    cmd = [sys.executable, "-m", "tests.resume_run", str(runs.dir / "checkpoint.pt"), str(logdir), str(ckdir)]
    done = subprocess.run([*cmd, str(R.STEPS)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    resumed = load(logdir)

    assert differences(runs.full, resumed, R.K) == []
    # the resumed run finished what was pending at the checkpoint, under the steps it belongs to
    assert [s for s, _ in resumed["alpha"]][0] == R.K - 1
    assert [s for s, _ in resumed["clip/agc/ratio/p50"]][:2] == [R.K - 2, R.K - 1]
    # records of every instrument are there (GradientTests keeps no state and still matches)
    for tag in ("tests/norm", "distance", "loss", "clip/global/norm", "tracin/self_influence", "tracin/checkpoints"):
        assert [s for s, _ in resumed[tag]] == [s for s, _ in runs.full[tag] if s >= R.K], tag
    assert json.loads((logdir / "verdicts.json").read_text()) == runs.verdicts
    assert len(runs.verdicts) == 2  # the learning-rate and the clipping verdicts, both compared

    # checkpoint files continue with the same names and contents (those from before live in ck_part)
    full_files = sorted(p.name for p in (runs.dir / "ck_full").glob("step_*.pt"))
    ours = sorted(p.name for p in ckdir.glob("step_*.pt"))
    assert ours == [n for n in full_files if int(n[5:13]) >= R.K] and ours[-1] == f"step_{R.STEPS:08d}.pt"
    for name in ours:
        a = torch.load(runs.dir / "ck_full" / name, weights_only=True)
        b = torch.load(ckdir / name, weights_only=True)
        assert _same(a, b), name


@pytest.mark.parametrize("drop", [None, *STATEFUL])
def test_leaving_out_any_instrument_state_breaks_the_match(runs, tmp_path, drop):
    """The same resumption in this process, with one instrument's saved state left out: the records
    then differ, in that instrument's tags. Without leaving anything out they match (the control)."""
    with torch.random.fork_rng():
        R.resume(runs.dir / "checkpoint.pt", tmp_path / "run", tmp_path / "ck", R.STEPS, drop=drop)
    diff = differences(runs.full, load(tmp_path / "run"), R.K)
    if drop is None:
        assert diff == []
    else:
        assert diff, f"dropping {drop}'s state changed no record"
        assert all(d.startswith(STATEFUL[drop]) for d in diff), diff


def test_resume_into_the_same_logdir(runs, tmp_path):
    """The recipe of docs/quickstart.md: cut the interrupted run's JSON lines back to their length at the
    checkpoint and resume into the same logdir; the file then reads back as the uninterrupted run's,
    every step of it."""
    logdir = tmp_path / "run"
    shutil.copytree(runs.dir / "part", logdir)  # the interrupted run wrote on after the checkpoint (its close)
    checkpoint = runs.dir / "checkpoint.pt"
    with open(logdir / "cockpit.jsonl", "r+b") as f:
        f.truncate(torch.load(checkpoint, weights_only=True)["jsonl_bytes"])
    with torch.random.fork_rng():
        R.resume(checkpoint, logdir, tmp_path / "ck", R.STEPS)
    resumed = load(logdir)
    assert differences(runs.full, resumed, 0) == []
    assert {t for t in resumed if not t.startswith("cost/")} == {t for t in runs.full if not t.startswith("cost/")}


def test_resume_into_the_same_logdir_without_cutting_it(runs, tmp_path):
    """``resume=True`` appends; ``load()`` keeps the later value of each (step, tag), so every record the
    resumed run wrote reads back as it wrote it, once, and the records before the checkpoint are the
    uninterrupted run's. (Records the interrupted run filed at its close and the resumed run does not
    file again stay: cut the file back as above to have the uninterrupted run exactly.)"""
    logdir = tmp_path / "run"
    shutil.copytree(runs.dir / "part", logdir)
    with torch.random.fork_rng():
        cockpit = R.resume(runs.dir / "checkpoint.pt", logdir, tmp_path / "ck", R.STEPS)
    run = load(logdir)
    assert not (tmp_path / "run-2").exists()
    for tag, pairs in run.items():
        steps = [s for s, _ in pairs]
        assert len(steps) == len(set(steps)), tag
    for tag, pairs in cockpit.history.items():
        if not tag.startswith("cost/"):
            for s, v in pairs:  # compared as written: JSON of the values
                assert json.dumps(to_json(run.value_at(tag, s))) == json.dumps(to_json(v)), (tag, s)
    assert run["loss"][: R.K] == runs.full["loss"][: R.K]


# --- each instrument's state: round trip, contents, other settings -----------------------------------------
def _train(insts, steps, width=5, seed=0, setup=None):
    """A short run of the resume test's data (``setup()`` called once the cockpit is attached); returns
    the cockpit, the model and the parameters before each step (for independent checks)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    cockpit = Cockpit(model, opt, loss_fn, instruments=insts, sinks=[])
    if setup is not None:
        setup()
    before = []
    loader = DataLoader(R.dataset(), batch_sampler=R.batches()[:steps], generator=torch.Generator())
    for x, y in cockpit.track(loader):
        before.append({n: p.detach().clone() for n, p in model.named_parameters()})
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    before.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return cockpit, model, before


def _attach(inst, width=5):
    """``inst`` attached to a fresh model of the same shape (as a resumed run builds it)."""
    model = nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 3))
    Cockpit(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), instruments=[inst], sinks=[])
    return inst


def test_alpha_state(tmp_path):
    alpha = Alpha(window=4, verdict_every=3, min_alphas=2)
    cockpit, model, before = _train([alpha], 7)
    state = alpha.state_dict()
    _plain(state)
    # contents against the run itself: the pending update is theta_7 - theta_6, the window holds the last
    # finite alphas written, the counts those of the statuses written
    assert state["pending"]["step"] == 6
    for n, d in state["pending"]["update"].items():
        assert torch.equal(d, before[7][n] - before[6][n]), n  # the same float32 subtraction
    assert state["pending"]["s"] == pytest.approx(
        math.sqrt(sum(float((before[7][n] - before[6][n]).double().square().sum()) for n in before[0])), rel=1e-6
    )
    alphas = [v for _, v in cockpit.history["alpha"]]
    assert state["alphas"] == [a for a in alphas if math.isfinite(a)][-4:]
    assert sum(state["counts"].values()) == len(alphas) == 6
    assert state["since_verdict"] == sum(math.isfinite(a) for a in alphas) % 3

    fresh = _attach(Alpha(window=4, verdict_every=3, min_alphas=2))
    fresh.load_state_dict(_roundtrip(state))
    assert _same(fresh.state_dict(), state) and fresh.verdicts() == alpha.verdicts()
    # a shorter window keeps the most recent alphas; a float64 model gets a float64 update
    short = Alpha(window=2)
    model64 = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    Cockpit(model64, torch.optim.SGD(model64.parameters(), lr=0.1), nn.CrossEntropyLoss(), instruments=[short])
    short.load_state_dict(_roundtrip(state))
    assert list(short._alphas) == state["alphas"][-2:]
    assert all(t.dtype == torch.float64 for t in short.state_dict()["pending"]["update"].values())
    # another model is refused, naming the fix
    with pytest.raises(ValueError, match="leave 'alpha' out of the state"):
        _attach(Alpha(), width=7).load_state_dict(_roundtrip(state))
    # loaded before attaching: kept, and placed when the cockpit attaches
    early = Alpha(window=4)
    early.load_state_dict(_roundtrip(state))
    _attach(early)
    assert _same(early.state_dict()["pending"], state["pending"])


def test_distance_state():
    dist = Distance()
    _, model, before = _train([dist], 3)
    state = dist.state_dict()
    _plain(state)
    assert _same(state["theta0"], before[0])  # the parameters before step 0
    fresh = _attach(Distance())
    fresh.load_state_dict(_roundtrip(state))
    assert _same(fresh.state_dict(), state)
    early = Distance()  # loaded before attaching: on_attach keeps the loaded theta_0
    early.load_state_dict(_roundtrip(state))
    _attach(early)
    assert _same(early.state_dict(), state)
    with pytest.raises(ValueError, match="leave 'distance' out of the state"):
        _attach(Distance(), width=7).load_state_dict(_roundtrip(state))


def _unit_norms(t: torch.Tensor) -> np.ndarray:
    """||W_i|| per row (per tensor for a vector), by an explicit loop."""
    t = t.double()
    if t.dim() <= 1:
        return np.array([math.sqrt(float((t * t).sum()))])
    return np.array([math.sqrt(float((row * row).sum())) for row in t])


def test_clipping_state():
    clip = Clipping(max_norm=0.5, agc_clip=0.05, per_sample_clip=0.5, window=5, batch_steps=4, agc_exclude=())
    cockpit, model, before = _train([clip], 7)
    state = clip.state_dict()
    _plain(state)
    norms = [v for _, v in cockpit.history["clip/global/norm"]]
    np.testing.assert_array_equal(state["global_norms"].numpy()[:, 0], norms[-5:])  # oldest first, wrapped
    assert len(state["ps_levels"]) == 5 and len(state["agc_levels"]) == 4  # AGC: steps 0-3 computed so far
    # AGC steps 4, 5, 6 wait for a batch of 4; w holds the weights' unit norms before each of them
    assert [p["step"] for p in state["agc_pending"]] == [4, 5, 6]
    for p in state["agc_pending"]:
        assert p["names"] == [n for n, _ in model.named_parameters()]
        want = np.concatenate([_unit_norms(before[p["step"]][n]) for n in p["names"]])
        np.testing.assert_allclose(p["w"].numpy(), want, rtol=1e-6)
        assert sum(p["sizes"]) == len(want) == len(p["g"])

    fresh = _attach(Clipping(max_norm=0.5, agc_clip=0.05, per_sample_clip=0.5, window=5, batch_steps=4))
    fresh.load_state_dict(_roundtrip(state))
    assert _same(fresh.state_dict(), state) and fresh.verdicts() == clip.verdicts()
    # a shorter window keeps the most recent norms; the next step's suggestion is over the last two of
    # them and its own norm
    short = Clipping(kinds=("global",), window=3)
    loaded = _roundtrip(state)
    c2, _, _ = _train([short], 1, setup=lambda: short.load_state_dict(loaded))
    new = c2.history["clip/global/norm"][0][1]
    want = np.quantile(norms[-2:] + [new], [0.5, 0.9])
    got = [c2.history[f"clip/suggest/global/{k}"][0][1] for k in ("p50", "p90")]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_array_equal(short.state_dict()["global_norms"].numpy()[:, 0], norms[-2:] + [new])
    # other suggestion levels are refused, naming the fix
    with pytest.raises(ValueError, match=r"suggest=\(0.5, 0.9\)"):
        Clipping(suggest=(0.5,)).load_state_dict(_roundtrip(state))


def test_window_rows_oldest_first():
    w = _Window(3, 1)
    added = []
    for v in range(7):
        w.add(float(v))
        added.append(float(v))
        np.testing.assert_array_equal(w.rows()[:, 0], added[-3:])
    w2 = _Window(4, 1)
    w2.load(w.rows())
    w2.add(7.0)
    w2.add(8.0)
    np.testing.assert_array_equal(w2.rows()[:, 0], [5.0, 6.0, 7.0, 8.0])


def test_tracin_state():
    probes = R.probes()
    tracin = TracIn(probes=probes)
    _train([tracin], 4)
    state = tracin.state_dict()
    _plain(state)
    fresh = TracIn(probes=R.probes())
    fresh.load_state_dict(_roundtrip(state))
    assert _same(fresh.state_dict(), state)
    np.testing.assert_array_equal(fresh.self_influence(), tracin.self_influence())
    np.testing.assert_array_equal(fresh.influence(), tracin.influence())
    np.testing.assert_array_equal(fresh.seen(), tracin.seen())
    assert fresh.seen().sum() == len(set(sum(R.batches()[:4], [])))  # the examples of the 4 batches
    # sums for other probes, another number of probes or another projection are refused
    other = (probes[0] + 1.0, probes[1])
    shuffled = (probes[0].flip(0), probes[1].flip(0))
    for bad in (TracIn(probes=other), TracIn(probes=shuffled), TracIn(), TracIn(probes=probes, projection_dim=2)):
        with pytest.raises(ValueError, match="leave 'tracin' out of the state"):
            bad.load_state_dict(_roundtrip(state))
    # without probes: the self-influence alone
    plain = TracIn()
    _train([plain], 2)
    again = TracIn()
    again.load_state_dict(_roundtrip(plain.state_dict()))
    np.testing.assert_array_equal(again.self_influence(), plain.self_influence())


def test_checkpoints_state(tmp_path):
    ck = Checkpoints(every=2, directory=tmp_path / "a")
    _train([ck], 5)
    state = ck.state_dict()
    _plain(state)
    assert state["paths"] == [str(p) for p in sorted((tmp_path / "a").glob("step_*.pt"))]
    assert state["last"][0] == 4 and state["steps"] == 5
    fresh = Checkpoints(every=2, directory=tmp_path / "b")
    fresh.load_state_dict(_roundtrip(state))
    assert fresh.state_dict() == state
    # closed at once, the final checkpoint is still labelled by the step count and the last batch
    fresh._model, fresh._optimizer = ck._model, ck._optimizer
    fresh.on_close()
    final = torch.load(tmp_path / "b" / "step_00000005.pt", weights_only=True)
    assert final["step"] == 5 and final["batch_size"] == len(R.batches()[4])


def test_gradient_tests_keep_no_state():
    assert GradientTests().state_dict() == {}
