"""The coupled path (cockpit_lite/persample/coupled.py): exact per-sample gradients of models with
train-mode BatchNorm, checked against an independent float64 reference.

Reference: the model in float64 and train mode, the same batch and the same RNG state (the same
dropout masks) as the training forward, the per-sample losses l_i of that one batch forward
(``reduction="none"``), and one ``torch.autograd.grad(l_i, params, retain_graph=True)`` per example:
g_i = d l_i / d theta with the batch as it was. It shares no code with the path (no output gradient,
no scale, no replay). The path gets only what a loop's step leaves behind: the captured inputs, RNG
state and output gradient of the backward of the batch loss.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from cockpit_lite.needs import Need
from cockpit_lite.pause import paused
from cockpit_lite.persample.coupled import (
    CoupledPath,
    CoupledRecorder,
    ReplayMismatch,
    ReplayState,
    coupling_modules,
)
from tests import models
from tests.harness import assert_matches_loop, shares_loop

ALL = {
    Need.PER_SAMPLE_SQ_NORMS,
    Need.PER_SAMPLE_DOT_MEAN,
    Need.PER_SAMPLE_GRAM_BY_PARAM,
    Need.PER_SAMPLE_GRADS,
}


def bn_cnn(p_drop: float = 0.0) -> nn.Module:
    """Conv -> BatchNorm2d -> ReLU(inplace) -> Dropout -> strided conv -> BatchNorm2d -> ReLU -> Linear."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Dropout(p_drop),
        nn.Conv2d(4, 3, 3, stride=2), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 3),
    )  # fmt: skip


def bn_mlp(p_drop: float = 0.0) -> nn.Module:
    """Linear -> BatchNorm1d -> Tanh -> Dropout -> Linear -> BatchNorm1d (no affine) -> ReLU -> Linear."""
    return nn.Sequential(
        nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(p_drop),
        nn.Linear(5, 5), nn.BatchNorm1d(5, affine=False), nn.ReLU(inplace=True), nn.Linear(5, 3),
    )  # fmt: skip


def cnn_data(b=5):
    return torch.randn(b, 2, 8, 8), torch.randint(0, 3, (b,))


def mlp_data(b=6):
    return torch.randn(b, 6), torch.randint(0, 3, (b,))


def resnet_data(b=4):
    return torch.randn(b, 3, 8, 8), torch.randint(0, 10, (b,))


CASES = {
    "cnn": (bn_cnn, cnn_data),
    "mlp": (bn_mlp, mlp_data),
}


def rng_state(device="cpu") -> tuple:
    """The CPU generator's state, and the CUDA device's where ``device`` is one (dropout draws there)."""
    device = torch.device(device)
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(state: tuple, device="cpu") -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], torch.device(device))


def same_rng_state(a: tuple, b: tuple) -> bool:
    return all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b, strict=True))


class Step:
    """One loop step ``loss_fn(model(x), y).backward()`` with a CoupledRecorder attached, and the float64
    per-example reference for the same batch and RNG state, on ``device`` (model and data moved there)."""

    def __init__(self, model, x, y, reduction="mean", dtype=torch.float64, seed=1, device="cpu"):
        self.device = device
        self.model = model.to(device=device, dtype=dtype)
        self.x, self.y = x.to(device=device, dtype=dtype), y.to(device)
        self.reduction = reduction
        self.before = copy.deepcopy(self.model)  # theta_t and the buffers before the step
        self.rec = CoupledRecorder(self.model)
        torch.manual_seed(seed)
        self.rng = rng_state(device)
        self.z = self.model(self.x)
        nn.CrossEntropyLoss(reduction=reduction)(self.z, self.y).backward()
        self.rec.close()  # keeps what it captured
        self.names = [n for n, _ in self.model.named_parameters()]
        self.batch = x.shape[0]
        self.scale = float(self.batch) if reduction == "mean" else 1.0
        self.model_dtype = dtype

    def path(self, **kw) -> CoupledPath:
        return CoupledPath(self.model, dict(self.model.named_parameters()), **kw)

    def stats(self, path, needs=ALL, directions=None, **kw):
        rec = self.rec
        args = (rec.args, rec.kwargs, rec.output_grads, self.scale, needs, directions)
        return path.statistics(*args, state=rec.state, outputs=rec.outputs, **kw)

    def reference(self, model=None) -> dict[str, np.ndarray]:
        """{name: (B, *shape)} g_i = d l_i / d theta, float64, one autograd call per example."""
        m = copy.deepcopy(model if model is not None else self.before).double()
        m.train(self.model.training)
        params = dict(m.named_parameters())
        set_rng_state(self.rng, self.device)
        z = m(self.x.double())
        losses = nn.CrossEntropyLoss(reduction="none")(z, self.y)
        out = {n: [] for n in params}
        for i in range(self.batch):
            gs = torch.autograd.grad(losses[i], list(params.values()), retain_graph=True, allow_unused=True)
            for n, g, p in zip(params, gs, params.values(), strict=True):
                out[n].append(torch.zeros_like(p) if g is None else g)
        self.ref_output = z.detach()
        return {n: torch.stack(v).cpu().numpy() for n, v in out.items()}


def close(got, want, rtol, what, noise=0.0):
    """|got - want| <= rtol * max |want| + noise, elementwise (noise: the round-off carried by the g_i)."""
    got = np.asarray(got.detach().double().cpu() if torch.is_tensor(got) else got, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    tol = rtol * float(np.abs(want).max()) + np.broadcast_to(noise, want.shape)
    err = np.abs(got - want)
    i = np.unravel_index(int(np.argmax(err - tol)), want.shape)
    assert np.all(err <= tol), f"{what}: error {err[i]:.3g} > tolerance {tol[i]:.3g} at {i} (want {want[i]:.6g})"


def directions(names_shapes, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    v = {n: torch.randn(s, generator=gen, dtype=torch.float64).to(device) for n, s in names_shapes.items()}
    first = next(iter(v))
    return {"v": v, f"v/{first}": {first: v[first]}, "none": {}}


#: round-off of a computed g_i relative to its whole norm ||g_i|| (all parameters)
EPS = {torch.float64: 1e-12, torch.float32: 1e-6}


def check_all(step: Step, res, ref, dirs, rtol):
    """Every statistic of ``res`` against the reference g_i, within rtol of its scale plus the
    round-off each g_i carries (a bias followed by BatchNorm has g_i = 0 exactly, and round-off)."""
    names, b = step.names, step.batch
    flat = {n: ref[n].reshape(b, -1) for n in names}
    G = np.concatenate([flat[n] for n in names], 1)
    gbar = G.mean(0)
    delta = EPS[step.model_dtype] * np.linalg.norm(G, axis=1)  # (B,)
    for n in names:
        norm = np.linalg.norm(flat[n], axis=1)
        close(res.sq_norms[n], norm**2, rtol, f"||g_i||^2 of {n}", delta * (2 * norm + delta))
        gram_noise = delta[:, None] * norm[None, :] + norm[:, None] * delta[None, :] + np.outer(delta, delta)
        close(res.gram[n], flat[n] @ flat[n].T, rtol, f"Gram of {n}", gram_noise)
        close(res.grads[n], ref[n], rtol, f"g_i of {n}", delta.reshape((b,) + (1,) * (ref[n].ndim - 1)))
    dot_noise = delta * np.linalg.norm(gbar) + np.linalg.norm(G, axis=1) * delta.mean()
    close(res.dot_mean, G @ gbar, rtol, "g_i . gbar", dot_noise)
    for key, d in dirs.items():
        v = {n: t.double().cpu().numpy().reshape(-1) for n, t in d.items()}
        want = sum((flat[n] @ v[n] for n in v), np.zeros(b))
        vnorm = np.sqrt(sum(float(x @ x) for x in v.values()))
        close(res.projections[key], want, rtol, f"g_i . {key}", delta * vnorm)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("p_drop", [0.0, 0.4])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(device, case, p_drop, reduction):
    build, data = CASES[case]
    torch.manual_seed(0)
    model = build(p_drop)
    x, y = data()
    step = Step(model, x, y, reduction, device=device)
    assert coupling_modules(step.model)  # train-mode BatchNorm: the factor engine does not apply
    running = {n: b.clone() for n, b in step.model.named_buffers()}
    grads = {n: p.grad.clone() for n, p in step.model.named_parameters()}
    torch.manual_seed(123)
    stream = rng_state(device)
    dirs = directions({n: p.shape for n, p in step.model.named_parameters()}, device=device)
    res = step.stats(step.path(), directions=dirs)
    # the path leaves the model, p.grad and the user's random streams as they were
    assert same_rng_state(rng_state(device), stream)
    for n, b in step.model.named_buffers():
        assert torch.equal(b, running[n]), f"buffer {n} changed"
    for n, p in step.model.named_parameters():
        assert torch.equal(p.grad, grads[n]), f"p.grad of {n} changed"
    ref = step.reference()
    assert torch.equal(step.ref_output, step.z.detach())  # the reference saw the same dropout masks
    check_all(step, res, ref, dirs, 1e-10)
    # sum_i g_i = B p.grad (mean), p.grad (sum): for the path and for the reference
    factor = step.batch if reduction == "mean" else 1
    G = np.concatenate([r.reshape(step.batch, -1) for r in ref.values()], 1)
    noise = EPS[torch.float64] * np.linalg.norm(G, axis=1).sum()
    for n, p in step.model.named_parameters():
        close(res.grads[n].sum(0), factor * p.grad.cpu().numpy(), 1e-10, f"sum_i g_i of {n}", noise)
        close(torch.as_tensor(ref[n].sum(0)), factor * p.grad.cpu().numpy(), 1e-10, f"reference sum of {n}", noise)
    assert res.covered == frozenset(step.names)


def test_resnet18_cifar_narrow(device):
    torch.manual_seed(0)
    model = models.resnet18_cifar(width=2, classes=4)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    step = Step(model, x, y, device=device)
    dirs = directions({n: p.shape for n, p in step.model.named_parameters()}, device=device)
    res = step.stats(step.path(chunk=3), directions=dirs)
    check_all(step, res, step.reference(), dirs, 1e-10)


@pytest.mark.parametrize("case", list(CASES))
def test_chunks_loop_and_double_vjp_agree(device, case):
    """Chunks smaller than the batch (Gram blocks across chunks), one backward per example, and
    reverse-over-reverse projections give the reference's numbers too."""
    build, data = CASES[case]
    torch.manual_seed(0)
    step = Step(build(0.3), *data(7), device=device)
    ref = step.reference()
    dirs = directions({n: p.shape for n, p in step.model.named_parameters()}, device=device)
    path = step.path(chunk=3)
    check_all(step, step.stats(path, directions=dirs), ref, dirs, 1e-10)  # batched
    assert path.last_chunk is None and path.vjp_mode == "auto"  # the chunk was given, not estimated
    check_all(step, step.stats(path, directions=dirs), ref, dirs, 1e-10)  # the trial: one chunk each way
    assert set(path.vjp_times) == {"batched", "loop"} and path.vjp_mode in path.vjp_times
    check_all(step, step.stats(path, directions=dirs), ref, dirs, 1e-10)  # the chosen way alone
    path = step.path(chunk=4)
    path.vjp_mode = "batched"
    check_all(step, step.stats(path, directions=dirs), ref, dirs, 1e-10)
    assert path.vjp_mode == "batched"
    path = step.path(chunk_bytes=1)  # the estimate: one example per chunk
    path.vjp_mode = "loop"
    check_all(step, step.stats(path, directions=dirs), ref, dirs, 1e-10)
    assert path.last_chunk[0] == 1
    path = step.path()
    path.projection_method = "double_vjp"
    res = step.stats(path, needs={Need.PER_SAMPLE_DOT_MEAN}, directions=dirs)
    b = step.batch
    G = np.concatenate([ref[n].reshape(b, -1) for n in step.names], 1)
    close(res.dot_mean, G @ G.mean(0), 1e-10, "g_i . gbar by double vjp")
    v = np.concatenate([dirs["v"][n].cpu().numpy().reshape(-1) for n in step.names])
    close(res.projections["v"], G @ v, 1e-10, "v")
    assert not res.sq_norms and not res.gram and not res.grads


def test_projections_alone_and_given_mean_gradient(device):
    """Without a chunk pass: g_i . gbar and projections by JVP alone, with gbar given (s/B p.grad) or
    computed from the replay; sum_ratio is 1 when p.grad holds the batch's gradient."""
    torch.manual_seed(0)
    step = Step(bn_cnn(0.3), *cnn_data(6), device=device)
    ref = step.reference()
    b = step.batch
    G = np.concatenate([ref[n].reshape(b, -1) for n in step.names], 1)
    dirs = directions({n: p.shape for n, p in step.model.named_parameters()}, device=device)
    gbar = {n: p.grad * (step.scale / b) for n, p in step.model.named_parameters()}
    for mean_grad in (None, gbar):
        path = step.path()
        res = step.stats(path, needs={Need.PER_SAMPLE_DOT_MEAN}, directions=dirs, mean_grad=mean_grad)
        close(res.dot_mean, G @ G.mean(0), 1e-10, "g_i . gbar")
        v = np.concatenate([dirs["v"][n].cpu().numpy().reshape(-1) for n in step.names])
        close(res.projections["v"], G @ v, 1e-10, "g_i . v")
    assert path.sum_ratio == pytest.approx(1.0, rel=1e-10)
    # a wrong gbar shows in the ratio
    step.stats(path, needs={Need.PER_SAMPLE_DOT_MEAN}, mean_grad={n: 2 * g for n, g in gbar.items()})
    assert path.sum_ratio == pytest.approx(0.5, rel=1e-10)


def test_float32_model_against_float64_reference(device):
    torch.manual_seed(0)
    model = bn_cnn(0.0)
    x, y = cnn_data(6)
    step = Step(model, x, y, dtype=torch.float32, device=device)
    ref = step.reference(step.before)
    dirs = directions({n: p.shape for n, p in step.model.named_parameters()}, device=device)
    dirs = {k: {n: t.float() for n, t in d.items()} for k, d in dirs.items()}
    res = step.stats(step.path(), directions=dirs)
    assert res.sq_norms[step.names[0]].dtype == torch.float32
    check_all(step, res, ref, dirs, 2e-5)


def test_directions_after_the_step_at_theta_t(device):
    """The update d = theta_{t+1} - theta_t is known only after optimizer.step(): project onto it at
    theta_t (the snapshot taken before the step), as Alpha needs."""
    torch.manual_seed(0)
    step = Step(bn_mlp(0.3), *mlp_data(6), device=device)
    path = step.path()
    theta_t = path.snapshot()
    opt = torch.optim.SGD(step.model.parameters(), lr=0.1, momentum=0.0)
    opt.step()
    d = {n: (p.detach() - theta_t[n]) for n, p in step.model.named_parameters()}
    res = step.stats(path, needs=set(), directions={"update": d}, values=theta_t)
    ref = step.reference()  # at theta_t (the copy from before the step)
    b = step.batch
    G = np.concatenate([ref[n].reshape(b, -1) for n in step.names], 1)
    dd = np.concatenate([d[n].cpu().numpy().reshape(-1) for n in step.names])
    close(res.projections["update"], G @ dd, 1e-10, "d")
    # without the snapshot the replay runs at theta_{t+1}, does not reproduce the batch's output, and is refused
    with pytest.raises(ReplayMismatch):
        step.stats(path, needs=set(), directions={"update": d})


class TwoHeads(nn.Module):
    """A tuple output: logits, an auxiliary head and a tensor no loss uses."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Dropout(0.3))
        self.head, self.aux = nn.Linear(5, 3), nn.Linear(5, 2)

    def forward(self, x, *, shift):
        h = self.body(x + shift)
        return self.head(h), {"aux": self.aux(h), "unused": h.detach() * 0 + 1}


def test_several_outputs_and_keyword_inputs(device):
    torch.manual_seed(0)
    model = TwoHeads().double().to(device)
    x, y = torch.randn(5, 6, dtype=torch.float64).to(device), torch.randint(0, 3, (5,)).to(device)
    t = torch.randn(5, 2, dtype=torch.float64).to(device)
    shift = torch.tensor(0.5, dtype=torch.float64, device=device)
    before = copy.deepcopy(model)
    rec = CoupledRecorder(model)
    torch.manual_seed(2)
    rng = rng_state(device)
    logits, extra = model(x, shift=shift)
    loss = nn.functional.cross_entropy(logits, y) + ((extra["aux"] - t) ** 2).sum(1).mean()
    loss.backward()
    assert rec.calls == 1 and rec.output_grads[2] is None  # no gradient reached the unused output
    path = CoupledPath(model, dict(model.named_parameters()))
    res = path.statistics(rec.args, rec.kwargs, rec.output_grads, 5.0, ALL, state=rec.state, outputs=rec.outputs)
    # reference: l_i = ce_i + ||aux_i - t_i||^2, one autograd call each
    set_rng_state(rng, device)
    lo, ex = before(x, shift=shift)
    losses = nn.functional.cross_entropy(lo, y, reduction="none") + ((ex["aux"] - t) ** 2).sum(1)
    params = dict(before.named_parameters())
    ref = {n: [] for n in params}
    for i in range(5):
        for n, g in zip(params, torch.autograd.grad(losses[i], list(params.values()), retain_graph=True), strict=True):
            ref[n].append(g)
    flat = {n: torch.stack(ref[n]).reshape(5, -1).cpu().numpy() for n in params}
    delta = EPS[torch.float64] * np.linalg.norm(np.concatenate(list(flat.values()), 1), axis=1)
    for n, r in flat.items():
        norm = np.linalg.norm(r, axis=1)
        close(res.sq_norms[n], norm**2, 1e-10, f"||g_i||^2 of {n}", delta * (2 * norm + delta))
        close(res.grads[n].sum(0), 5 * model.get_parameter(n).grad.cpu().numpy(), 1e-10, f"sum of {n}", delta.sum())
    rec.close()


def test_replay_without_the_rng_state_is_caught(device):
    """A replay that draws other dropout masks is refused, not silently wrong."""
    torch.manual_seed(0)
    step = Step(bn_cnn(0.5), *cnn_data(5), device=device)
    rec = step.rec
    with pytest.raises(ReplayMismatch):
        step.path().statistics(rec.args, rec.kwargs, rec.output_grads, step.scale, ALL, outputs=rec.outputs)
    with pytest.raises(ReplayMismatch):  # the projection-only path checks its replay too
        step.path().statistics(
            rec.args, rec.kwargs, rec.output_grads, step.scale, {Need.PER_SAMPLE_DOT_MEAN}, outputs=rec.outputs,
            mean_grad={n: p.grad for n, p in step.model.named_parameters()},
        )  # fmt: skip


def test_bad_output_gradients_are_refused(device):
    torch.manual_seed(0)
    step = Step(bn_mlp(), *mlp_data(5), device=device)
    rec, path = step.rec, step.path()
    with pytest.raises(ValueError, match="no output gradient"):
        path.statistics(rec.args, rec.kwargs, [None], step.scale, ALL, state=rec.state)
    with pytest.raises(ValueError, match="no batch axis"):
        path.statistics(rec.args, rec.kwargs, [torch.ones((), device=device)], step.scale, ALL, state=rec.state)
    for needs in (ALL, {Need.PER_SAMPLE_DOT_MEAN}):  # the chunk pass and the JVP alone
        gbar = {n: p.grad for n, p in step.model.named_parameters()}
        with pytest.raises(ValueError, match="leaves"):
            twice = rec.output_grads * 2
            path.statistics(rec.args, rec.kwargs, twice, step.scale, needs, state=rec.state, mean_grad=gbar)
        with pytest.raises(ValueError, match="the gradient backward brought to it"):
            wrong = [rec.output_grads[0][:, :2]]
            path.statistics(rec.args, rec.kwargs, wrong, step.scale, needs, state=rec.state, mean_grad=gbar)


def test_recorder_ignores_paused_calls_and_counts_the_others():
    model = bn_mlp()
    rec = CoupledRecorder(model)
    x, _ = mlp_data(4)
    with paused():
        model(x)
    assert rec.calls == 0 and rec.state is None
    model(x)
    model(x)
    assert rec.calls == 2 and isinstance(rec.state, ReplayState)
    rec.close()
    model(x)
    assert rec.calls == 2  # no longer hooked; what it captured is kept until reset()
    rec.reset()
    assert rec.calls == 0 and rec.state is None and not rec.output_grads


# --- what keeps the factor engine: eval-mode and frozen BatchNorm -----------------------------------
def _eval_bn(frozen: bool) -> nn.Module:
    torch.manual_seed(0)
    model = bn_cnn(0.0)
    with torch.no_grad():
        for _ in range(3):  # running statistics that differ from the defaults
            model(torch.randn(8, 2, 8, 8) * 2 + 1)
    model.eval()
    if frozen:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.requires_grad_(False)
                m.bias.requires_grad_(False)
    return model


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_eval_and_frozen_batchnorm_keep_the_factor_engine(device, frozen, reduction):
    model = _eval_bn(frozen)
    assert coupling_modules(model) == []
    x, y = cnn_data(6)
    checked = assert_matches_loop(model, x, y, nn.CrossEntropyLoss(reduction=reduction), device=device)
    assert not checked.warnings


def test_coupling_modules_follow_the_mode():
    model = bn_mlp()
    assert coupling_modules(model) == ["1", "5"]
    model.eval()
    assert coupling_modules(model) == []
    no_stats = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, track_running_stats=False)).eval()
    assert coupling_modules(no_stats) == ["1"]  # batch statistics in eval mode too


def test_coupled_path_on_an_uncoupled_model_matches_the_harness_split(device):
    """Where examples do not interact (eval-mode BatchNorm) the coupled definition is the harness's
    (and the factor engine's): g_i = B x example i's share of p.grad."""
    model = _eval_bn(False).to(device)
    x, y = (t.to(device) for t in cnn_data(5))
    names = [n for n, _ in model.named_parameters()]
    want = shares_loop(model, x, y, nn.CrossEntropyLoss(), names)
    step = Step(model, x, y, device=device)  # float64, eval mode
    res = step.stats(step.path(chunk=2), needs={Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_GRADS})
    for n in names:
        close(res.grads[n], want[n], 1e-10, f"g_i of {n}")
        close(res.sq_norms[n], (want[n].reshape(5, -1) ** 2).sum(1), 1e-10, f"||g_i||^2 of {n}")


def test_sync_batchnorm_across_processes_is_refused(monkeypatch):
    """Across ranks SyncBatchNorm couples every process's examples; a replay on one rank would wait in
    collectives the others never start. (Two ranks simulated: the refusal comes before any replay.)"""
    model = nn.Sequential(nn.Linear(6, 5), nn.SyncBatchNorm(5), nn.Linear(5, 3))
    path = CoupledPath(model, dict(model.named_parameters()))
    grads = [torch.ones(4, 3)]
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match="SyncBatchNorm"):
        path.statistics((torch.randn(4, 6),), {}, grads, 4.0, ALL)
    model.eval()  # running statistics: nothing couples, nothing is refused here
    path._refuse_collectives()


def test_recorder_fed_by_the_owners_hooks(device):
    """hooks=False: an owner (the per-sample provider) calls before_forward/after_forward itself; the
    statistics are the reference's."""
    torch.manual_seed(0)
    model = bn_mlp(0.3).double().to(device)
    x, y = (t.to(device) for t in mlp_data(5))
    x = x.double()
    before = copy.deepcopy(model)
    rec = CoupledRecorder(model, hooks=False)
    pre = model.register_forward_pre_hook(lambda m, a, kw: rec.before_forward(a, kw), with_kwargs=True)
    post = model.register_forward_hook(lambda m, a, out: rec.after_forward(out))
    torch.manual_seed(3)
    rng = rng_state(device)
    nn.CrossEntropyLoss()(model(x), y).backward()
    pre.remove()
    post.remove()
    path = CoupledPath(model, dict(model.named_parameters()))
    res = path.statistics(rec.args, rec.kwargs, rec.output_grads, 5.0, {Need.PER_SAMPLE_SQ_NORMS}, state=rec.state)
    set_rng_state(rng, device)
    losses = nn.CrossEntropyLoss(reduction="none")(before(x), y)
    params = list(before.parameters())
    ref = [torch.autograd.grad(losses[i], params, retain_graph=True) for i in range(5)]
    G = torch.stack([torch.cat([g.reshape(-1) for g in gs]) for gs in ref]).cpu().numpy()
    got = sum(res.sq_norms.values())
    close(got, (G**2).sum(1), 1e-10, "||g_i||^2", EPS[torch.float64] * np.linalg.norm(G, axis=1) ** 2 * 3)


def test_autocast_is_replayed(device):
    """A forward under autocast (bfloat16, on the device's type) is replayed under autocast: without it
    the replay would run in float32 and differ from the captured bfloat16 output (refused); with it the
    g_i add up to B p.grad to bfloat16 precision."""
    torch.manual_seed(0)
    model = bn_cnn(0.3).to(device)
    x, y = (t.to(device) for t in cnn_data(6))
    kind = torch.device(device).type
    rec = CoupledRecorder(model)
    with torch.autocast(kind, dtype=torch.bfloat16):
        out = model(x)
    nn.CrossEntropyLoss()(out.float(), y).backward()
    rec.close()
    assert rec.state.amp == ((kind, torch.bfloat16),) and rec.outputs[0].dtype == torch.bfloat16
    path = CoupledPath(model, dict(model.named_parameters()))
    args = (rec.args, rec.kwargs, rec.output_grads, 6.0, {Need.PER_SAMPLE_GRADS})
    res = path.statistics(*args, state=rec.state, outputs=rec.outputs)
    got = torch.cat([res.grads[n].sum(0).reshape(-1) for n, _ in model.named_parameters()])
    want = torch.cat([6 * p.grad.reshape(-1) for p in model.parameters()])
    assert float((got - want).norm()) <= 2e-2 * float(want.norm())
    plain = ReplayState(rec.state.cpu_rng, rec.state.cuda_rng, ())  # the same masks, no autocast
    with pytest.raises(ReplayMismatch):
        path.statistics(*args, state=plain, outputs=rec.outputs)
