"""The core: attaching by hooks, detaching, unchanged trajectories, bad input, schedules, streaming."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from cockpit_lite.instruments import GradNorm, Loss
from torch import nn

import cockpit_lite
from cockpit_lite import Cockpit, Instrument, Need, load
from cockpit_lite.registry import available_instruments, available_presets
from tests import models
from tests.reference import Probe, flat

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
}


def _data(n=6, b=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 6, generator=g), torch.randint(0, 3, (b,), generator=g)) for _ in range(n)]


def _train(model, opt, loss_fn, data, clip=None):
    for x, y in data:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()


@pytest.mark.parametrize("optim", list(OPTIMIZERS))
def test_trajectory_bit_identical(optim, tmp_path):
    runs = []
    for attach in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.2), nn.ReLU(), nn.Linear(8, 3))
        opt = OPTIMIZERS[optim](model.parameters())
        loss_fn = nn.CrossEntropyLoss()
        if attach:
            with Cockpit(model, opt, loss_fn, instruments="economy", logdir=tmp_path) as cockpit:
                _train(model, opt, loss_fn, _data())
            assert len(cockpit.history["loss"]) == 6
        else:
            _train(model, opt, loss_fn, _data())
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_transformer_trajectory_bit_identical():
    """The torch.func fallback recomputes attention: it must not consume the user's random stream."""
    runs = []
    for attach in (False, True):
        torch.manual_seed(0)
        model = models.TinyTransformer()
        model.head = nn.Sequential(nn.Dropout(0.3), model.head)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        loss_fn = nn.CrossEntropyLoss()
        data = [models.token_batch(4) for _ in range(3)]
        cockpit = Cockpit(model, opt, loss_fn, instruments="economy") if attach else None
        _train(model, opt, loss_fn, data)
        if cockpit:
            assert len(cockpit.history["tests/norm"]) == 3
            cockpit.close()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def _hook_count(model, opt, loss_fn):
    n = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    n += len(loss_fn._forward_hooks) + len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)
    return n


def test_leaving_the_context_removes_every_hook():
    model, loss_fn = models.mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert _hook_count(model, opt, loss_fn) == 0
    with Cockpit(model, opt, loss_fn, instruments="economy") as cockpit:
        assert _hook_count(model, opt, loss_fn) > 0
        _train(model, opt, loss_fn, _data(2))
    assert _hook_count(model, opt, loss_fn) == 0
    n = len(cockpit.history["loss"])
    _train(model, opt, loss_fn, _data(2))  # nothing is recorded after close
    assert len(cockpit.history["loss"]) == n
    cockpit.close()  # idempotent


def test_history_streams_to_disk_and_loads_back(tmp_path):
    model, loss_fn = models.mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Cockpit(model, opt, loss_fn, instruments="economy", logdir=tmp_path) as cockpit:
        _train(model, opt, loss_fn, _data(2))
        # streamed as it goes: both steps are on disk before close
        lines = (tmp_path / "cockpit.jsonl").read_text().splitlines()
        # (Alpha writes step 0's alpha with step 1, as a second line for step 0)
        assert sorted({json.loads(line)["step"] for line in lines}) == [0, 1]
    loaded = load(tmp_path)
    assert set(loaded) == set(cockpit.history)
    for tag in cockpit.history:
        for (s1, v1), (s2, v2) in zip(cockpit.history[tag], loaded[tag], strict=True):
            assert s1 == s2
            if isinstance(v1, str):  # verdicts, alpha/status
                assert v1 == v2
            else:
                np.testing.assert_allclose(v1, v2, rtol=1e-12)
    assert isinstance(loaded["persample/grad_norm"][0][1], np.ndarray)
    assert loaded["persample/grad_norm"][0][1].shape == (8,)


def test_load_skips_a_line_cut_short_by_a_crash(tmp_path):
    model, loss_fn = models.mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Cockpit(model, opt, loss_fn, instruments=[Loss()], logdir=tmp_path):
        _train(model, opt, loss_fn, _data(3))
    path = tmp_path / "cockpit.jsonl"
    path.write_text(path.read_text() + '{"step": 3, "records": {"loss": 1.')
    assert [s for s, _ in load(tmp_path)["loss"]] == [0, 1, 2]


def test_schedules_every_and_callable():
    model, loss_fn = models.mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    inst = [Loss(every=3), GradNorm(schedule=lambda s: s in (1, 4))]
    with Cockpit(model, opt, loss_fn, instruments=inst) as cockpit:
        _train(model, opt, loss_fn, _data(6))
    assert [s for s, _ in cockpit.history["loss"]] == [0, 3]
    assert [s for s, _ in cockpit.history["grad_norm"]] == [1, 4]


def test_unscheduled_step_attaches_no_per_layer_work():
    model, loss_fn = models.mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = Probe(every=2)
    with Cockpit(model, opt, loss_fn, instruments=[probe]) as cockpit:
        x, y = _data(1)[0]
        for step in range(2):
            opt.zero_grad()
            out = model(x)
            assert cockpit.engine.active == (step == 0)
            assert bool(cockpit.engine._calls) == (step == 0)  # inputs kept only when tracked
            loss_fn(out, y).backward()
            opt.step()
    assert len(probe.records) == 1


def test_bad_inputs_get_clear_errors():
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Cockpit(nn.ReLU(), opt, nn.CrossEntropyLoss())
    other = torch.optim.SGD(models.mlp().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="holds none of the model's parameters"):
        Cockpit(model, other, nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="reduction='mean'"):
        Cockpit(model, opt, nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(TypeError, match="module form"):  # a functional loss is seen without being given
        Cockpit(model, opt, torch.nn.functional.cross_entropy)
    with pytest.raises(ValueError, match="reduction="):
        Cockpit(model, opt, reduction="none")
    with pytest.raises(ValueError, match="unknown instrument preset"):
        Cockpit(model, opt, nn.CrossEntropyLoss(), instruments="luxury")
    with pytest.raises(ValueError, match="name="):
        Cockpit(model, opt, nn.CrossEntropyLoss(), instruments=[Loss(), Loss()])
    with pytest.raises(ValueError, match="positive integer"):
        Loss(every=0)


def test_two_instances_with_names_keep_separate_tags():
    model, loss_fn = models.mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Cockpit(model, opt, loss_fn, instruments=[GradNorm(), GradNorm(name="sparse", every=2)]) as c:
        _train(model, opt, loss_fn, _data(3))
    assert len(c.history["grad_norm"]) == 3 and len(c.history["sparse/grad_norm"]) == 2


def test_step_with_closure_is_tracked_at_its_first_evaluation():
    """LBFGS: the closure's first evaluation (at theta_t) is the step's forward and backward; the line
    search's later evaluations are unseen. Per-sample statistics against the float64 loop at theta_t."""
    from tests.reference import per_sample_grads_loop

    torch.manual_seed(0)
    model, loss_fn = models.mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    x, y = _data(1)[0]
    probe = Probe(flags={Need.LOSS, Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_DOT_MEAN, Need.UPDATE})

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    thetas = []
    with Cockpit(model, opt, loss_fn, instruments=[probe]) as cockpit:
        for _ in range(2):
            thetas.append(copy.deepcopy(model))
            opt.step(closure)
    assert cockpit.step == 2 and len(probe.records) == 2
    for theta, rec in zip(thetas, probe.records, strict=True):
        G = flat(per_sample_grads_loop(theta, loss_fn, x, y))
        np.testing.assert_allclose(rec.per_sample_sq_norms, (G**2).sum(1), rtol=1e-5)
        np.testing.assert_allclose(rec.per_sample_dot_mean, G @ G.mean(0), rtol=1e-5, atol=1e-9)
        assert rec.batch_size == len(y) and rec.micro_batches == [len(y)]
    d = {n: (p - q).detach() for (n, p), q in zip(model.named_parameters(), thetas[1].parameters(), strict=True)}
    assert all(torch.allclose(d[n], u) for n, u in probe.records[1].update.items())


def test_a_closure_step_matches_the_same_step_without_closure():
    """Lightning's automatic optimization calls optimizer.step(closure) with forward and backward inside:
    every record equals the plain loop's."""

    def run(with_closure):
        torch.manual_seed(0)
        model, loss_fn = models.mlp(), nn.CrossEntropyLoss()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with Cockpit(model, opt, loss_fn, instruments="economy") as ck:
            for x, y in _data(4):

                def closure(x=x, y=y):
                    opt.zero_grad()
                    loss = loss_fn(model(x), y)
                    loss.backward()
                    return loss

                if with_closure:
                    opt.step(closure=closure)
                else:
                    closure()
                    opt.step()
        return ck.history

    a, b = run(True), run(False)
    for tag in ("loss", "grad_norm", "tests/norm", "alpha", "update_size", "distance"):
        np.testing.assert_allclose([v for _, v in a[tag]], [v for _, v in b[tag]], rtol=1e-6, err_msg=tag)


def test_batch_size_one_gives_nan_tests_not_a_crash():
    model, loss_fn = models.mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Cockpit(model, opt, loss_fn, instruments="economy") as cockpit:
        _train(model, opt, loss_fn, [(torch.randn(1, 6), torch.tensor([1]))])
    assert math.isnan(cockpit.history["tests/norm"][0][1])
    assert cockpit.history["persample/grad_norm"][0][1].shape == (1,)


def test_nan_loss_is_recorded_and_training_goes_on(tmp_path):
    model, loss_fn = models.mlp(), nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 6)
    y = torch.randn(4, 3)
    y[0, 0] = float("nan")
    with Cockpit(model, opt, loss_fn, instruments="economy", logdir=tmp_path) as cockpit:
        for _ in range(2):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    assert cockpit.step == 2
    assert math.isnan(cockpit.history["loss"][0][1])
    assert math.isnan(load(tmp_path)["loss"][1][1])


def test_no_gradients_noted_not_crashed():
    model, loss_fn = models.mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = Probe(flags={Need.GRAD_NORMS})
    with Cockpit(model, opt, loss_fn, instruments=[probe]):
        x, y = _data(1)[0]
        opt.zero_grad()
        with torch.no_grad():
            loss_fn(model(x), y)
        opt.step()  # the user forgot backward
    assert probe.records[0].grad_norms == {}
    assert any("backward" in n for n in probe.records[0].notes)


def test_an_instrument_that_raises_does_not_break_training():
    class Broken(Instrument):
        NEEDS = frozenset({Need.LOSS})

        def compute(self, record):
            raise ZeroDivisionError("boom")

    model, loss_fn = models.mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="broken.compute failed"):
        with Cockpit(model, opt, loss_fn, instruments=[Broken(), Loss()]) as cockpit:
            _train(model, opt, loss_fn, _data(2))
    assert len(cockpit.history["loss"]) == 2


def test_sum_reduction_gives_same_per_sample_gradients_as_mean():
    out = {}
    for reduction in ("mean", "sum"):
        torch.manual_seed(0)
        model = models.mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        loss_fn = nn.CrossEntropyLoss(reduction=reduction)
        with Cockpit(model, opt, loss_fn, instruments="economy") as cockpit:
            _train(model, opt, loss_fn, _data(1))
        out[reduction] = cockpit.history
    for tag in ("persample/grad_norm", "tests/norm", "tests/inner", "tests/ortho"):
        np.testing.assert_allclose(out["mean"][tag][0][1], out["sum"][tag][0][1], rtol=1e-5)


def test_plugins_come_from_entry_points():
    names = available_instruments()
    assert {"loss", "grad_norm", "update_size", "distance", "persample_grad_norms", "gradient_tests"} <= set(names)
    assert {"economy", "minimal", "full"} <= set(available_presets())
    model, loss_fn = models.mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Cockpit(model, opt, loss_fn, instruments=["loss", "grad_norm"]) as cockpit:
        _train(model, opt, loss_fn, _data(1))
    assert "grad_norm" in cockpit.history


def test_core_imports_no_concrete_instrument():
    root = Path(cockpit_lite.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import)\s+instruments\b", text, re.M), path


def test_a_deepcopy_of_the_model_does_not_feed_the_cockpit(tmp_path):
    """deepcopy copies module hooks: an EMA or checkpoint copy must not start steps or add records."""
    import copy

    model, loss_fn = models.mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Cockpit(model, opt, loss_fn, instruments="economy", logdir=tmp_path) as cockpit:
        ema = copy.deepcopy(model)  # an open log file must not make this fail
        for x, y in _data(2):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            ema(x)  # the copy runs inside the step
            copy.deepcopy(loss_fn)(ema(x), y)
            opt.step()
    assert [s for s, _ in cockpit.history["tests/norm"]] == [0, 1]
    assert not cockpit._warned and not cockpit.engine.warned


def test_amp_grad_scaler_scaled_backward_and_skipped_steps():
    """scaler.scale(loss).backward(): per-sample statistics and norms after backward are those of the
    loss module, not of the scaled loss; a step the scaler skips (inf gradients) is not merged with
    the next attempt."""
    from tests.reference import flat, per_sample_grads_loop

    torch.manual_seed(0)
    model, loss_fn = models.mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    ref = per_sample_grads_loop(model, loss_fn, x, y)
    probe = Probe(flags={Need.PER_SAMPLE_SQ_NORMS, Need.BACKWARD_GRAD_NORMS, Need.GRAD_NORMS})
    scaler = torch.amp.GradScaler("cpu", init_scale=float("inf"))  # inf gradients: the scaler skips
    with Cockpit(model, opt, loss_fn, instruments=[probe]) as cockpit:
        with pytest.warns(RuntimeWarning, match="loss times inf"):
            for _ in range(2):
                opt.zero_grad()
                scaler.scale(loss_fn(model(x), y)).backward()
                scaler.step(opt)
                scaler.update()
        assert cockpit.step == 0  # the scaler skipped both attempts
        scaler.update(1024.0)
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        scaler.scale(loss_fn(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
    assert cockpit.step == 1 and len(probe.records) == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    rec = probe.records[0]
    assert rec.backward_scale == 1024.0
    np.testing.assert_allclose(rec.per_sample_sq_norms, (flat(ref) ** 2).sum(1), rtol=2e-4)
    gbar = flat(ref).mean(0)
    np.testing.assert_allclose(StepRecordNorm(rec.backward_grad_norms), np.linalg.norm(gbar), rtol=1e-4)
    np.testing.assert_allclose(rec.grad_norm, np.linalg.norm(gbar), rtol=1e-4)  # unscaled by the scaler


def StepRecordNorm(norms):  # noqa: N802
    return float(np.sqrt(sum(v * v for v in norms.values())))


def test_torch_compiled_model_keeps_its_own_parameter_names():
    """A torch.compile'd model (here with the eager backend: dynamo only, no C++ build) is tracked like
    the module it wraps: tags without "_orig_mod.", per-sample statistics, the same trajectory."""
    runs = []
    for attach in (False, True):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        model = torch.compile(net, backend="eager")
        opt, loss_fn = torch.optim.SGD(net.parameters(), lr=0.1), nn.CrossEntropyLoss()
        if attach:
            with Cockpit(model, opt, loss_fn, instruments=["loss", "grad_norm", "gradient_tests"]) as cockpit:
                _train(model, opt, loss_fn, _data())
            assert "grad_norm/0.weight" in cockpit.history and not any("_orig_mod" in t for t in cockpit.history)
            assert len(cockpit.history["tests/norm"]) == 6 and cockpit.engine.checks_left == 0
        else:
            _train(model, opt, loss_fn, _data())
        runs.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
