"""Sharpness against the exact Hessian (torch.autograd.functional.hessian on a flat float64 parameter
vector, torch.linalg.eigvalsh): SGD's lambda_max(H), Adam's lambda_max(P^-1/2 H P^-1/2) with P read
from the optimizer's own state after its step; the training run bit-identical with and without the
instrument (dropout, BatchNorm); a loss inside the model's forward; the verdicts; the state round trip."""

from __future__ import annotations

import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch
from cockpit_lite.instruments.sharpness import Sharpness, largest_eigenvalue
from torch import nn
from torch.func import functional_call

from cockpit_lite import Cockpit
from cockpit_lite.pause import paused
from tests import models


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batches(n: int, b: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inputs with one feature 3x the others: the Hessian has a clear top eigenvalue."""
    g = torch.Generator().manual_seed(1)
    scale = torch.tensor([3.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    return [
        (torch.randn(b, 4, generator=g, dtype=torch.float64) * scale, torch.randint(0, 3, (b,), generator=g))
        for _ in range(n)
    ]


def exact_hessian(model: nn.Module, loss_of) -> torch.Tensor:
    """The Hessian of ``loss_of(output)`` in the flat parameter vector (float64, autograd.functional)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()

    def f(t: torch.Tensor) -> torch.Tensor:
        ps, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            ps[n] = t[i : i + s.numel()].reshape(s)
            i += s.numel()
        return loss_of(lambda *a: functional_call(model, ps, a))

    with paused():  # the reference is no model call of the run
        return torch.autograd.functional.hessian(f, theta)


def _top_two(matrix: torch.Tensor) -> tuple[float, float]:
    ev = torch.linalg.eigvalsh(matrix)
    # the test models have a clear top eigenvalue: the gap to the next is at least 5% of the spread (both
    # power-iteration runs, the plain one and the shifted one for a dominant negative eigenvalue, converge)
    assert ev[-1] > 0 and ev[-1] - ev[-2] > 0.05 * (ev[-1] - ev[0])
    return float(ev[-1]), float(ev[-2])


def _measure(**kw) -> Sharpness:
    return Sharpness(every=1, iterations=1000, tol=1e-10, **kw)


def test_sgd_lambda_max_matches_exact_hessian():
    model, lf = _mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = _batches(3)
    cp = Cockpit(model, opt, loss_fn=lf, instruments=[_measure()])
    want = {}
    for step, (x, y) in enumerate(batches):
        want[step] = _top_two(exact_hessian(model, lambda m, x=x, y=y: lf(m(x), y)))[0]
        opt.zero_grad()
        lf(model(x), y).backward()
        opt.step()
    cp.close()
    got = dict(cp.history.get("sharpness/lambda_max"))
    assert set(got) == set(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-3)
    assert dict(cp.history.get("sharpness/limit"))[0] == pytest.approx((2 + 2 * 0.9) / 0.1)
    assert all(v == 1.0 for _, v in cp.history.get("sharpness/converged"))


ADAMS = {
    "adam": (torch.optim.Adam, {}),
    "adam_coupled_wd": (torch.optim.Adam, {"weight_decay": 0.5}),
    "adamw": (torch.optim.AdamW, {"weight_decay": 0.5}),
    "amsgrad": (torch.optim.Adam, {"amsgrad": True}),
    "two_groups": (torch.optim.Adam, {"groups": True}),
}


@pytest.mark.parametrize("case", list(ADAMS))
def test_adam_preconditioned_sharpness_matches_direct(case):
    """lambda_max(D^1/2 P^-1/2 H P^-1/2 D^1/2) at step 2 against eigvalsh, P = (1 - beta1^t)(sqrt(v_hat) +
    eps) with v_t read from a reference optimizer's state after its step t (t = 3): ``exp_avg_sq``, or
    ``max_exp_avg_sq`` for AMSGrad; D = lr_group / lr_max (1 with one group)."""
    cls, kwargs = ADAMS[case]
    kwargs = dict(kwargs)
    groups = kwargs.pop("groups", False)
    batches = _batches(3)
    lf = nn.CrossEntropyLoss()
    lr, betas, eps = 1e-2, (0.9, 0.99), 1e-3  # eps keeps P^-1 moderate: a clear top eigenvalue

    def optimizer(model):
        params = list(model.parameters())
        if groups:  # the second layer at a quarter of the learning rate
            return cls([{"params": params[:2]}, {"params": params[2:], "lr": lr / 4}], lr=lr, betas=betas, eps=eps)
        return cls(params, lr=lr, betas=betas, eps=eps, **kwargs)

    ref = _mlp()
    ref_opt = optimizer(ref)
    for step, (x, y) in enumerate(batches):
        if step == 2:
            h = exact_hessian(copy.deepcopy(ref), lambda m, x=x, y=y: lf(m(x), y))
        ref_opt.zero_grad()
        lf(ref(x), y).backward()
        ref_opt.step()
    t = 3
    key = "max_exp_avg_sq" if kwargs.get("amsgrad") else "exp_avg_sq"
    v = torch.cat([ref_opt.state[p][key].reshape(-1) for p in ref.parameters()])
    assert all(int(ref_opt.state[p]["step"]) == t for p in ref.parameters())
    p_diag = (1 - betas[0] ** t) * ((v / (1 - betas[1] ** t)).sqrt() + eps)
    d = torch.cat(
        [torch.full((p.numel(),), g["lr"] / lr, dtype=torch.float64) for g in ref_opt.param_groups for p in g["params"]]
    )
    s = (d / p_diag).sqrt()
    want, _ = _top_two(s[:, None] * h * s[None, :])

    model = _mlp()
    opt = optimizer(model)
    cp = Cockpit(model, opt, loss_fn=lf, instruments=[_measure()])
    for x, y in batches:
        opt.zero_grad()
        lf(model(x), y).backward()
        opt.step()
    cp.close()
    assert dict(cp.history.get("sharpness/lambda_max"))[2] == pytest.approx(want, rel=1e-3)
    assert dict(cp.history.get("sharpness/limit"))[2] == pytest.approx(38 / lr)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):  # training untouched
        assert torch.equal(a, b)


class DropoutBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))

    def forward(self, x):
        return self.body(x)


def _train(with_instrument: bool, steps: int = 5) -> tuple[nn.Module, torch.Tensor, Cockpit | None]:
    torch.manual_seed(0)
    model = DropoutBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    lf = nn.CrossEntropyLoss()
    cp = Cockpit(model, opt, loss_fn=lf, instruments=[Sharpness(every=2, iterations=5)]) if with_instrument else None
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x, y = torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
        opt.zero_grad()
        lf(model(x), y).backward()
        opt.step()
    if cp is not None:
        cp.close()
    return model, torch.get_rng_state(), cp


def test_training_bit_identical_with_dropout_and_batchnorm():
    plain, rng_plain, _ = _train(False)
    measured, rng_measured, cp = _train(True)
    assert cp is not None
    steps = [s for s, v in cp.history.get("sharpness/lambda_max")]
    assert steps == [0, 2, 4] and all(math.isfinite(v) for _, v in cp.history.get("sharpness/lambda_max"))
    notes = " ".join(v for _, v in cp.history.get("note/sharpness") or [])
    assert "differs" not in notes and "recomputed" not in notes  # the replay reproduced the step (dropout masks)
    for (n, a), b in zip(plain.state_dict().items(), measured.state_dict().values(), strict=True):
        assert torch.equal(a, b), n  # parameters, BatchNorm running statistics, num_batches_tracked
    assert torch.equal(rng_plain, rng_measured)


def test_batchnorm_statistics_untouched_by_the_measurement():
    torch.manual_seed(0)
    model = DropoutBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    lf = nn.CrossEntropyLoss()
    bn = model.body[1]
    seen = {}

    class Spy(Sharpness):
        def on_before_step(self, record):
            before = [b.clone() for b in bn.buffers()]
            super().on_before_step(record)
            seen["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, bn.buffers(), strict=True))
            seen["measured"] = self._result is not None

    cp = Cockpit(model, opt, loss_fn=lf, instruments=[Spy(every=1, iterations=3)])
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    opt.zero_grad()
    lf(model(x), y).backward()
    opt.step()
    cp.close()
    assert seen == {"unchanged": True, "measured": True}
    assert int(bn.num_batches_tracked) == 1


class LossInside(nn.Module):
    """nanoGPT style: forward(x, targets) -> (logits, loss)."""

    def __init__(self):
        super().__init__()
        self.net = _mlp()

    def forward(self, x, targets):
        logits = self.net(x)
        return logits, nn.functional.cross_entropy(logits, targets)


def test_loss_inside_forward():
    model = LossInside()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ((x, y),) = _batches(1)
    want, _ = _top_two(exact_hessian(model, lambda m: m(x, y)[1]))
    cp = Cockpit(model, opt, instruments=[_measure()])
    opt.zero_grad()
    model(x, y)[1].backward()
    opt.step()
    cp.close()
    assert dict(cp.history.get("sharpness/lambda_max"))[0] == pytest.approx(want, rel=1e-3)
    assert dict(cp.history.get("sharpness/limit"))[0] == pytest.approx(2 / 0.1)


def test_reshaped_prediction_and_gradient_accumulation():
    """A token loss on logits.view(-1, V) over two micro-batches of (loss / 2): the step's loss is
    (L_1 + L_2) / 2, its Hessian the mean of the two."""
    model, lf = _mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(5)
    parts = [
        (torch.randn(4, 3, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (4, 3), generator=g))
        for _ in range(2)
    ]

    def step_loss(m):
        return sum(lf(m(x).view(-1, 3), y.view(-1)) / 2 for x, y in parts)

    want, _ = _top_two(exact_hessian(model, step_loss))
    cp = Cockpit(model, opt, loss_fn=lf, instruments=[_measure()])
    opt.zero_grad()
    for x, y in parts:
        (lf(model(x).view(-1, 3), y.view(-1)) / 2).backward()
    opt.step()
    cp.close()
    assert dict(cp.history.get("sharpness/lambda_max"))[0] == pytest.approx(want, rel=1e-3)


def test_a_loss_the_cockpit_cannot_replay_is_a_note():
    model, lf = _mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ((x, y),) = _batches(1)
    cp = Cockpit(model, opt, loss_fn=lf, instruments=[Sharpness(every=1)])
    opt.zero_grad()
    (lf(model(x), y) + 0.1 * sum((p**2).sum() for p in model.parameters())).backward()  # a penalty in the loop
    opt.step()
    cp.close()
    assert cp.history.get("sharpness/lambda_max") is None
    assert "the gradient of the recomputed loss has norm" in dict(cp.history.get("note/sharpness"))[0]


def test_largest_eigenvalue_is_algebraic():
    """The dominant eigenvalue -5 is negative: the shifted second run finds the largest one, 3."""
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([-5.0, 3.0, 1.0, 0.5, -1.0, 0.0], dtype=torch.float64)) @ q.T
    start = [torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)]
    lam, used, ok = largest_eigenvalue(lambda v: [a @ v[0]], start, iterations=500, tol=1e-13)
    assert ok and lam == pytest.approx(3.0, rel=1e-6) and used > 500 // 10
    lam, _, _ = largest_eigenvalue(lambda v: [-a @ v[0]], start, iterations=500, tol=1e-13)
    assert lam == pytest.approx(5.0, rel=1e-6)


class Quadratic(nn.Module):
    """L(w) = 0.5 sum_j a_j w_j^2 (the batch only scales by 1): H = diag(a)."""

    def __init__(self, a: list[float]):
        super().__init__()
        self.register_buffer("a", torch.tensor(a, dtype=torch.float64))
        self.w = nn.Parameter(torch.ones(len(a), dtype=torch.float64))

    def forward(self, x):
        return 0.5 * (self.a * self.w**2).sum() + 0.0 * x.sum()


def _quadratic_run(lr: float, steps: int, inst: Sharpness, logdir=None) -> Cockpit:
    model = Quadratic([19.0, 3.0, 1.0])
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    cp = Cockpit(model, opt, instruments=[inst], logdir=logdir)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.ones(4, 1, dtype=torch.float64)).backward()
        opt.step()
    return cp


def test_verdicts_at_the_edge_and_well_below():
    # lambda_max = 19 = 0.95 x 2/0.1: at the edge from the first measurement on, said after 3
    cp = _quadratic_run(0.1, 6, Sharpness(every=2, iterations=200, tol=1e-10))
    verdicts = dict(cp.history.get("verdict/sharpness"))
    assert verdicts[0].startswith("approaching the edge of stability") and verdicts[2].startswith("approaching")
    assert verdicts[4].startswith("at the edge of stability since step 0")
    assert dict(cp.history.get("sharpness/lambda_max"))[4] == pytest.approx(19.0, rel=1e-6)
    assert dict(cp.history.get("sharpness/ratio"))[4] == pytest.approx(0.95, rel=1e-6)
    assert any("at the edge of stability since step 0" in v for v in cp.verdicts())
    cp.close()
    # lr 0.01: limit 200, ratio 0.095
    cp = _quadratic_run(0.01, 2, Sharpness(every=1, iterations=200, tol=1e-10))
    assert dict(cp.history.get("verdict/sharpness"))[1].startswith("well below the stability limit")
    cp.close()


def test_state_dict_round_trip():
    inst = Sharpness(every=1, iterations=200, tol=1e-10)
    cp = _quadratic_run(0.1, 2, inst)
    state = inst.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restored = Sharpness(every=1, iterations=200, tol=1e-10)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.state_dict() == state and restored.verdicts() == inst.verdicts()
    cp.close()
    # resumed: the third measurement completes the streak started at step 0
    cp2 = _quadratic_run(0.1, 1, restored)
    assert restored.verdicts()[0].startswith("sharpness: at the edge of stability since step 0")
    cp2.close()


class TargetsAsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _mlp()

    def forward(self, x, y):
        return self.net(x)


def test_a_loss_fn_callable_is_replayed():
    """No loss module: the loop calls a functional loss; the Cockpit's loss_fn(output, *args) gives the
    per-example losses the replay reduces (mean)."""
    model = TargetsAsInput()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ((x, y),) = _batches(1)
    want, _ = _top_two(exact_hessian(model, lambda m: nn.functional.cross_entropy(m(x, y), y)))
    fn = lambda out, x, y: nn.functional.cross_entropy(out, y, reduction="none")  # noqa: E731
    cp = Cockpit(model, opt, loss_fn=fn, instruments=[_measure()])
    opt.zero_grad()
    nn.functional.cross_entropy(model(x, y), y).backward()
    opt.step()
    cp.close()
    assert dict(cp.history.get("sharpness/lambda_max"))[0] == pytest.approx(want, rel=1e-3)


def test_panel_charts_and_summary(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2

    from cockpit_lite.figure import DashboardFigure
    from cockpit_lite.presentation import assemble, summary_text
    from tests.sinks_util import accumulator

    cp = _quadratic_run(0.1, 4, Sharpness(every=1, iterations=200, tol=1e-10), logdir=tmp_path)
    cp.close()
    events = accumulator(tmp_path)
    assert [e.value for e in events.Scalars("sharpness/limit")] == pytest.approx([20.0] * 4)
    layout = layout_pb2.Layout.FromString(events.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    charts = {c.title: {chart.title: chart for chart in c.chart} for c in layout.category}
    chart = charts["Stability"]["sharpness: lambda_max and the limit"]
    assert list(chart.multiline.tag) == ["^sharpness/lambda_max$", "^sharpness/limit$"]
    h = cp.history
    fig = DashboardFigure(instruments=cp.instruments)
    fig.update(h)
    panel = fig.panel("Sharpness and the stability limit")
    assert panel.ax.get_yscale() == "log"
    for tag in ("sharpness/lambda_max", "sharpness/limit"):
        assert list(panel._lines[tag].get_ydata()) == pytest.approx(h.values(tag))
    presentation = assemble(h, cp.instruments)
    assert not presentation.undeclared
    assert presentation.charts["Stability"]["sharpness: lambda_max and the limit"] == [
        "Multiline",
        ["^sharpness/lambda_max$", "^sharpness/limit$"],
    ]
    text = summary_text(h, instruments=cp.instruments)
    assert "lambda_max of the Hessian (preconditioned for Adam)" in text
    assert "at the edge of stability since step 0" in text


def test_a_forward_under_autocast_is_replayed_under_it():
    """bfloat16 autocast on the CPU: the replay reproduces the step's loss and gradient (no note) and
    the training run is unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    ref = copy.deepcopy(model)
    lf = nn.CrossEntropyLoss()
    ((x, y),) = _batches(1)
    x = x.float()

    def run(m, instruments):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        cp = Cockpit(m, opt, loss_fn=lf, instruments=instruments) if instruments else None
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lf(m(x), y)
        loss.backward()
        opt.step()
        return cp

    cp = run(model, [Sharpness(every=1, iterations=50)])
    run(ref, None)
    cp.close()
    notes = " ".join(v for _, v in cp.history.get("note/sharpness") or [])
    assert "recomputed" not in notes and "differs" not in notes
    assert math.isfinite(dict(cp.history.get("sharpness/lambda_max"))[0])
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_next_to_the_economy_preset_changes_no_other_record():
    """Per-sample instruments (economy preset: per-sample norms, gradient tests, Alpha) record the same
    values with Sharpness measuring at the same steps, and Sharpness matches the exact Hessian."""
    from cockpit_lite.instruments.presets import economy

    batches = _batches(3)
    lf = nn.CrossEntropyLoss()

    def run(extra):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        cp = Cockpit(model, opt, loss_fn=lf, instruments=[*economy(), *extra])
        want = []
        for x, y in batches:
            if extra:
                want.append(_top_two(exact_hessian(model, lambda m, x=x, y=y: lf(m(x), y)))[0])
            opt.zero_grad()
            lf(model(x), y).backward()
            opt.step()
        cp.close()
        return cp.history, want

    plain, _ = run([])
    measured, want = run([_measure()])
    assert [v for _, v in measured.get("sharpness/lambda_max")] == pytest.approx(want, rel=1e-3)
    for tag in ("alpha", "tests/norm", "persample/grad_norm", "loss", "grad_norm"):
        a, b = plain.get(tag), measured.get(tag)
        assert a is not None and len(a) == len(b), tag
        for (s1, v1), (s2, v2) in zip(a, b, strict=True):
            assert s1 == s2 and np.array_equal(np.asarray(v1), np.asarray(v2), equal_nan=True), tag


def test_a_loss_computed_in_the_loop_is_a_note():
    """A functional loss and no loss_fn: nothing to replay; the note names the fix."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ((x, y),) = _batches(1)
    cp = Cockpit(model, opt, instruments=[Sharpness(every=1)])
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    cp.close()
    assert cp.history.get("sharpness/lambda_max") is None
    assert "no replay of the loss" in dict(cp.history.get("note/sharpness"))[0]
    assert "loss_fn" in dict(cp.history.get("note/sharpness"))[0]


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"momentum": 0.9}, {"momentum": 0.5, "dampening": 0.3}, {"momentum": 0.9, "nesterov": True}],
)
def test_sgd_limits_are_where_torch_sgd_turns_unstable(kwargs):
    """The limit from stability_limit against torch.optim.SGD itself on f(x) = a x^2 / 2: curvature
    0.95 x limit converges, 1.05 x limit diverges."""
    from cockpit_lite.instruments.sharpness import stability_limit

    lr = 0.1
    probe = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr, **kwargs)
    kind, eta, limit, _ = stability_limit(probe)
    assert kind == "sgd" and eta == lr

    def final(a: float) -> float:
        x = nn.Parameter(torch.ones(1, dtype=torch.float64))
        opt = torch.optim.SGD([x], lr=lr, **kwargs)
        for _ in range(800):
            opt.zero_grad()
            (0.5 * a * x**2).sum().backward()
            opt.step()
        return abs(float(x.detach()))

    assert final(0.95 * limit) < 1e-2 and final(1.05 * limit) > 1e2


def test_nanogpt_with_dropout_and_tied_weights_trains_bit_identically():
    """nanoGPT (loss inside forward, logits.view(-1, V), tied embedding, dropout): the replay passes its
    loss and gradient checks (the step's dropout masks) and training is unchanged."""
    from tests.models_lm import NanoGPT

    def run(instruments):
        torch.manual_seed(0)
        model = NanoGPT(vocab_size=11, block_size=6, n_layer=1, n_head=2, d=8, dropout=0.2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        cp = Cockpit(model, opt, instruments=instruments) if instruments else None
        g = torch.Generator().manual_seed(4)
        for _ in range(3):
            idx, tg = torch.randint(0, 11, (4, 6), generator=g), torch.randint(0, 11, (4, 6), generator=g)
            opt.zero_grad()
            model(idx, tg)[1].backward()
            opt.step()
        if cp is not None:
            cp.close()
        return model, torch.get_rng_state(), cp

    plain, rng_plain, _ = run(None)
    measured, rng_measured, cp = run([Sharpness(every=1, iterations=10)])
    values = cp.history.get("sharpness/lambda_max")
    assert [s for s, _ in values] == [0, 1, 2] and all(math.isfinite(v) and v > 0 for _, v in values)
    assert dict(cp.history.get("sharpness/limit"))[0] == pytest.approx(38 / 1e-2)
    notes = " ".join(v for _, v in cp.history.get("note/sharpness") or [])
    assert "recomputed" not in notes and "differs" not in notes
    for a, b in zip(plain.parameters(), measured.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(rng_plain, rng_measured)


def test_attention_by_a_fused_kernel_is_measured_by_the_math_kernel():
    """nn.TransformerEncoderLayer runs scaled dot-product attention by a fused CPU kernel that has no second
    derivative; the replay behind the Hessian-vector products takes the math kernel: lambda_max is the
    exact Hessian's (the reference by the math kernel too), and the training step is the fused one."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model, lf = models.TinyTransformer().double(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = models.token_batch(b=4, t=5)
    with sdpa_kernel(SDPBackend.MATH):
        want = float(torch.linalg.eigvalsh(exact_hessian(model, lambda m: lf(m(x), y)))[-1])
    twin = copy.deepcopy(model)
    cp = Cockpit(model, opt, loss_fn=lf, instruments=[_measure()])
    opt.zero_grad()
    lf(model(x), y).backward()
    opt.step()
    cp.close()
    assert "note/sharpness" not in cp.history
    assert dict(cp.history.get("sharpness/lambda_max"))[0] == pytest.approx(want, rel=1e-3)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    lf(twin(x), y).backward()
    twin_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))


def test_an_op_without_a_second_derivative_is_a_note():
    """A custom autograd Function marked once_differentiable: no Hessian-vector product exists; the step's
    note says so, no warning of a failed instrument, training unaffected."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    model = nn.Sequential(lin)
    model.register_forward_hook(lambda m, a, out: models.OnceDifferentiableTanh.apply(out))
    opt, lf = torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss()
    ((x, y),) = _batches(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cp = Cockpit(model, opt, loss_fn=lf, instruments=[Sharpness(every=1)])
        opt.zero_grad()
        lf(model(x), y).backward()
        opt.step()
        cp.close()
    assert not [w for w in caught if "failed" in str(w.message)]
    assert cp.history.get("sharpness/lambda_max") is None
    assert "has no second derivative" in dict(cp.history.get("note/sharpness"))[0]
