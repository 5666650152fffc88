"""Issue 14, Musts 5-7: abandoned iterations recorded as skipped, sparse gradients, arguments checked at
attach, a closed cockpit used again, files following the umask, no bare library warnings."""

from __future__ import annotations

import copy
import math
import os
import stat
import warnings

import numpy as np
import pytest
import torch
from cockpit_lite.instruments.agc import clip_, unitwise_norm
from cockpit_lite.instruments.clipping import Clipping
from cockpit_lite.instruments.gradnorm import GradNorm
from cockpit_lite.instruments.tracin import TracIn
from cockpit_lite.instruments.update import Distance, UpdateSize
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cockpit_lite import Cockpit, attach
from cockpit_lite.pause import paused
from cockpit_lite.sinks.dashboard import write_atomic
from tests import models


def _mlp_sgd() -> tuple[nn.Module, torch.optim.Optimizer, nn.Module]:
    """``models.mlp()`` (seed 0), SGD at lr 0.1 over all of it, and a cross-entropy loss module."""
    torch.manual_seed(0)
    model = models.mlp()
    return model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss()


def _batch(b: int = 6, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randint(0, 3, (b,), generator=g)


# --- Must 5: an abandoned iteration is recorded as skipped ------------------------------------------------
def _run_with_abandoned(abandon_after_backward: bool, instruments: str | list = "economy") -> Cockpit:
    model, opt, lf = _mlp_sgd()
    with Cockpit(model, opt, lf, instruments=instruments) as cp:
        for i in range(4):
            x, y = _batch(seed=i)
            opt.zero_grad()
            loss = lf(model(x), y)
            if i == 1:
                loss = loss * float("inf")
                if abandon_after_backward:
                    loss.backward()  # then no step: the next zero_grad and forward retry
            if not torch.isfinite(loss):
                continue
            loss.backward()
            opt.step()
    return cp


@pytest.mark.parametrize("after_backward", [False, True])
def test_an_abandoned_iteration_is_recorded_as_skipped_and_the_next_step_is_whole(after_backward):
    cp = _run_with_abandoned(after_backward)
    assert cp.step == 3
    assert cp.history["skipped"] == [(1, 1)]  # under the step that followed it, once
    # the next step is the retry's batch alone: its loss and per-sample losses are those of that batch
    torch.manual_seed(0)
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in (0, 2):
        x, y = _batch(seed=i)
        opt.zero_grad()
        out = model(x)
        if i == 2:
            per = nn.functional.cross_entropy(out.double(), y, reduction="none").detach().numpy()
            np.testing.assert_allclose(cp.history.value_at("loss", 1), per.mean(), rtol=1e-5)
            np.testing.assert_allclose(cp.history.value_at("loss/per_sample", 1), per, rtol=1e-5)
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
    assert np.isfinite(cp.history.value_at("persample/grad_norm", 1)).all()


def test_skipped_is_recorded_on_an_unscheduled_step_too():
    cp = _run_with_abandoned(False, instruments=[GradNorm(every=100)])  # step 1 is not scheduled
    assert cp.history["skipped"] == [(1, 1)]
    assert [s for s, _ in cp.history["grad_norm"]] == [0]


def test_gradient_accumulation_and_a_loss_over_two_calls_are_no_skipped_iterations():
    model, opt, lf = _mlp_sgd()
    with Cockpit(model, opt, lf, instruments="economy") as cp:
        for i in range(2):
            opt.zero_grad()
            for k in range(3):  # accumulation: three forwards and backwards per step
                x, y = _batch(seed=10 * i + k)
                (lf(model(x), y) / 3).backward()
            opt.step()
        x1, y1 = _batch(seed=5)
        x2, y2 = _batch(seed=6)
        opt.zero_grad()
        (lf(model(x1), y1) + lf(model(x2), y2)).backward()  # one loss over two model calls
        opt.step()
    assert "skipped" not in cp.history
    assert cp.history["loss"][0][0] == 0 and len(cp.history["loss"]) == 3


def test_an_abandoned_micro_batch_between_two_trained_ones_is_one_skipped_iteration():
    model, opt, lf = _mlp_sgd()
    with Cockpit(model, opt, lf, instruments="economy") as cp:
        opt.zero_grad()
        for k in range(3):
            x, y = _batch(seed=k)
            loss = lf(model(x), y) * (float("nan") if k == 1 else 1.0)
            if torch.isfinite(loss):
                loss.backward()
        opt.step()
    assert cp.history["skipped"] == [(0, 1)]
    assert cp.history.last("loss/per_sample").shape == (12,)


def _loss_of(form: str, lf: nn.Module, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss of a model call in one of the forms a loop writes: the loss module on the output itself
    (its hook stands for the output's), on a view of it, or without the loss module."""
    if form == "module":
        return lf(out, y)
    if form == "view":
        return lf(out.view(out.shape[0], -1), y)
    return nn.functional.cross_entropy(out, y)


@pytest.mark.parametrize("form", ["module", "view", "functional"])
def test_backward_reaching_a_model_call_is_seen_whatever_computes_the_loss(form):
    """Which model calls backward reached decides the skipped iterations and what the per-sample statistics
    cover: an abandoned micro-batch between two trained ones is one skipped iteration, and the step's
    per-sample norms are those of the two trained batches (against one autograd call per example)."""
    model, opt, lf = _mlp_sgd()
    batches = [_batch(seed=k) for k in range(3)]
    with Cockpit(model, opt, lf, instruments="economy") as cp:
        opt.zero_grad()
        for k, (x, y) in enumerate(batches):
            loss = _loss_of(form, lf, model(x), y) * (float("nan") if k == 1 else 1.0)
            if torch.isfinite(loss):
                loss.backward()
        opt.step()
    assert cp.history["skipped"] == [(0, 1)]
    x = torch.cat([batches[0][0], batches[2][0]])
    y = torch.cat([batches[0][1], batches[2][1]])
    g = _per_sample_grads(x, y, scale=2.0)  # g_i = 12 x (1/6) grad l_i: two micro-batches' means of 6
    np.testing.assert_allclose(cp.history.last("persample/grad_norm"), np.linalg.norm(g, axis=1), rtol=1e-4)
    _assert_gradient_tests(cp, g)


def _per_sample_grads(x: torch.Tensor, y: torch.Tensor, scale: float, ref: nn.Module | None = None) -> np.ndarray:
    """(B, D) float64: ``scale`` x the gradient of each example's cross-entropy at the initial
    ``models.mlp()`` (or at ``ref``, a float64 copy at other parameters), one autograd call per example."""
    if ref is None:
        torch.manual_seed(0)
        ref = models.mlp().double()
    rows = []
    for i in range(len(x)):
        ref.zero_grad()
        nn.functional.cross_entropy(ref(x[i : i + 1].double()), y[i : i + 1]).backward()
        rows.append(scale * torch.cat([p.grad.reshape(-1) for p in ref.parameters()]).numpy())
    return np.stack(rows)


def _assert_gradient_tests(cp: Cockpit, g: np.ndarray) -> None:
    """The norm, inner-product and orthogonality tests of the last step, from the paper's formulas
    (Bollapragada et al. 2018, Byrd et al. 2012) evaluated on the float64 per-sample gradients ``g``."""
    b, gbar = len(g), g.mean(0)
    g2 = gbar @ gbar
    dots = g @ gbar
    denom = b * (b - 1) * g2
    expect = {
        "tests/norm": math.sqrt(max((np.linalg.norm(g, axis=1) ** 2).sum() - b * g2, 0.0) / denom),
        "tests/inner": math.sqrt(((dots - g2) ** 2).sum() / (denom * g2)),
        "tests/ortho": math.sqrt(((g - np.outer(dots / g2, gbar)) ** 2).sum() / denom),
    }
    for tag, value in expect.items():
        np.testing.assert_allclose(cp.history.last(tag), value, rtol=1e-4, err_msg=tag)


class _Boxed:
    """A model output the cockpit cannot look into (no tuple, dict or ModelOutput): no hook on its tensors."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits


class _BoxedMLP(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.boxed = True

    def forward(self, x: torch.Tensor) -> _Boxed | torch.Tensor:
        out = self.inner(x)
        return _Boxed(out) if self.boxed else out


@pytest.mark.parametrize("boxed", [False, True])
def test_the_end_of_backward_is_seen_from_the_loss_or_from_the_models_output(boxed):
    """Backward's end is queued by the first of the cockpit's gradient hooks it meets: on the model's output
    where the loss module took it as it is (no hook on the loss then), else on the loss module's output (a
    model output the cockpit cannot look into). Either way every step is complete and exact (two micro-batches
    accumulated: the second one's end is told too), against one autograd call per example."""
    model, opt, lf = _mlp_sgd()
    net = _BoxedMLP(model) if boxed else model
    batches = [_batch(seed=k) for k in range(2)]
    with Cockpit(net, opt, lf, instruments="economy") as cp:
        opt.zero_grad()
        for x, y in batches:
            out = net(x)
            lf(out.logits if boxed else out, y).backward()
        opt.step()
    x, y = (torch.cat(t) for t in zip(*batches, strict=True))
    g = _per_sample_grads(x, y, scale=2.0)
    np.testing.assert_allclose(cp.history.last("persample/grad_norm"), np.linalg.norm(g, axis=1), rtol=1e-4)
    _assert_gradient_tests(cp, g)
    assert cp.history.last("loss/per_sample").shape == (12,)


def test_a_loss_taking_its_input_by_keyword_keeps_its_hook():
    """Two micro-batches: the first call's output (hooked, then dropped) and a second call whose output the
    cockpit cannot look into, its loss given by keyword: that loss's hook tells the second backward's end
    (a dead reference to the first output is no match for it). Exact against the float64 loop."""
    model, opt, lf = _mlp_sgd()
    net = _BoxedMLP(model)
    (x1, y1), (x2, y2) = _batch(seed=0), _batch(seed=1)
    with Cockpit(net, opt, lf, instruments="economy") as cp:
        opt.zero_grad()
        net.boxed = False
        lf(net(x1), y1).backward()
        net.boxed = True
        lf(input=net(x2).logits, target=y2).backward()
        opt.step()
    g = _per_sample_grads(torch.cat([x1, x2]), torch.cat([y1, y2]), scale=2.0)
    np.testing.assert_allclose(cp.history.last("persample/grad_norm"), np.linalg.norm(g, axis=1), rtol=1e-4)
    _assert_gradient_tests(cp, g)


@pytest.mark.parametrize("accumulate", [False, True])
def test_one_backward_over_two_model_calls_leaves_per_sample_statistics_out_with_the_reason(accumulate):
    """The engine splits gradients within one model call: a loss over two calls (their examples are
    different ones) is said, never reported as the examples of one call."""
    model, opt, lf = _mlp_sgd()
    (x1, y1), (x2, y2), (x3, y3) = (_batch(seed=k) for k in range(3))
    with pytest.warns(Warning, match="one backward reached 2 calls of the model"):
        with Cockpit(model, opt, lf, instruments="economy") as cp:
            opt.zero_grad()
            if accumulate:
                lf(model(x3), y3).backward()
            (lf(model(x1), y1) + lf(model(x2), y2)).backward()
            opt.step()
    assert "persample/grad_norm" not in cp.history and "tests/norm" not in cp.history
    assert "one backward reached 2 calls" in cp.history.last("note/gradient_tests")
    assert "grad_norm" in cp.history and "loss" in cp.history  # (the rest is computed)


@pytest.mark.parametrize("form", ["module", "view", "functional", "none"])
def test_an_abandoned_calls_graph_is_not_kept_past_the_next_model_call(form):
    """The cockpit keeps nothing of an abandoned model call's graph: it is freed once the loop drops it, before
    the next call's activations exist (a reference kept by the cockpit, to its outputs or their nodes, would hold
    an abandoned iteration's activations, as an out-of-memory retry cannot afford)."""
    import weakref

    model, opt, lf = _mlp_sgd()
    with Cockpit(model, opt, lf, instruments="economy"):
        x, y = _batch(seed=0)
        out = model(x)
        if form != "none":
            _loss_of(form, lf, out, y)  # (computed, never trained on)
        gone = weakref.ref(out)
        del out
        freed = []  # (checked as the next call's first layer runs: before its activations exist)
        hook = model[0].register_forward_pre_hook(lambda m, a: freed.append(gone() is None))
        x, y = _batch(seed=1)
        loss = lf(model(x), y)
        hook.remove()
        assert freed == [True]
        loss.backward()
        opt.step()


def _two_head_losses(x: torch.Tensor, y: torch.Tensor, y2: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per example, float64 at the initial ``models.mlp(classes=6)``, one autograd call each: the losses
    a_i + b_i of the two 3-class heads and the gradients of a_i + b_i (rows of (B, D))."""
    torch.manual_seed(0)
    ref = models.mlp(classes=6).double()
    losses, rows = [], []
    for i in range(len(x)):
        ref.zero_grad()
        out = ref(x[i : i + 1].double())
        ce = nn.functional.cross_entropy
        loss = ce(out[:, :3], y[i : i + 1]) + ce(out[:, 3:], y2[i : i + 1])
        loss.backward()
        losses.append(float(loss))
        rows.append(torch.cat([p.grad.reshape(-1) for p in ref.parameters()]).numpy())
    return np.array(losses), np.stack(rows)


def _two_heads() -> tuple[nn.Module, torch.optim.Optimizer, nn.Module, tuple[torch.Tensor, ...]]:
    """``models.mlp(classes=6)`` read as two 3-class heads, its optimizer and loss module, and a batch with a
    target for each head."""
    torch.manual_seed(0)
    model = models.mlp(classes=6)
    x, y = _batch()
    return model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), (x, y, (y + 1) % 3)


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_two_loss_module_calls_on_one_output_add_up_per_example(weight):
    """A loss over two heads, lf(out[:, :3], y) + w lf(out[:, 3:], y2): per-example losses a_i + b_i when
    backward starts from their sum; with another weight they cannot be split, and are left out with a note.
    The per-sample gradients are exact either way."""
    model, opt, lf, (x, y, y2) = _two_heads()
    with Cockpit(model, opt, lf, instruments="economy") as cp:
        opt.zero_grad()
        out = model(x)
        (lf(out[:, :3], y) + weight * lf(out[:, 3:], y2)).backward()
        opt.step()
    losses, g = _two_head_losses(x, y, y2)
    if weight == 1.0:
        np.testing.assert_allclose(cp.history.last("loss/per_sample"), losses, rtol=1e-5)
        np.testing.assert_allclose(cp.history.last("loss"), losses.mean(), rtol=1e-5)
        np.testing.assert_allclose(cp.history.last("persample/grad_norm"), np.linalg.norm(g, axis=1), rtol=1e-4)
    else:
        assert "loss/per_sample" not in cp.history
        assert "is not the mean of their per-example sums" in cp.history.last("note/loss")
        assert cp.history.last("persample/grad_norm") is not None


def test_two_backward_passes_through_one_model_call_are_said_not_split_wrongly():
    """loss_a.backward(retain_graph=True); loss_b.backward(): the step's loss and per-example losses are
    a + b; per-sample statistics (the engine takes a call's gradients at its first backward) are left out
    with the reason, never reported as loss_a's alone."""
    model, opt, lf, (x, y, y2) = _two_heads()
    with pytest.warns(Warning, match="a second backward through the same model call"):
        with Cockpit(model, opt, lf, instruments="economy") as cp:
            opt.zero_grad()
            out = model(x)
            lf(out[:, :3], y).backward(retain_graph=True)
            lf(out[:, 3:], y2).backward()
            opt.step()
    losses, _ = _two_head_losses(x, y, y2)
    np.testing.assert_allclose(cp.history.last("loss/per_sample"), losses, rtol=1e-5)
    np.testing.assert_allclose(cp.history.last("loss"), losses.mean(), rtol=1e-5)
    assert "persample/grad_norm" not in cp.history and "tests/norm" not in cp.history
    assert "a second backward through the same model call" in cp.history.last("note/gradient_tests")


@pytest.mark.parametrize("form", ["module", "functional"])
def test_gradients_taken_by_autograd_grad_are_split_exactly(form):
    """A loop that takes the gradients with torch.autograd.grad (no backward(): no root is seen) and sets
    p.grad itself: the model's outputs are then hooked by no backward and, with a functional loss, by no loss
    call; the per-sample norms of the second step are still the float64 loop's."""
    model, opt, lf = _mlp_sgd()
    with Cockpit(model, opt, lf, instruments="economy") as cp:
        for s in range(2):
            x, y = _batch(seed=s)
            opt.zero_grad()
            out = model(x)
            loss = lf(out, y) if form == "module" else nn.functional.cross_entropy(out, y)
            for p, g in zip(model.parameters(), torch.autograd.grad(loss, list(model.parameters())), strict=True):
                p.grad = g
            opt.step()
    torch.manual_seed(0)
    ref = models.mlp().double()
    x0, y0 = _batch(seed=0)
    nn.functional.cross_entropy(ref(x0.double()), y0).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad
    x, y = _batch(seed=1)
    norms = np.linalg.norm(_per_sample_grads(x, y, 1.0, ref), axis=1)
    np.testing.assert_allclose(cp.history.last("persample/grad_norm"), norms, rtol=1e-5)


# --- Must 6: sparse gradients -----------------------------------------------------------------------------
class _Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 4, sparse=True)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(x).mean(1))


def test_sparse_gradients_grad_norm_update_size_distance_against_direct_computation():
    torch.manual_seed(0)
    model = _Bag()
    opt = torch.optim.SparseAdam(list(model.emb.parameters()), lr=0.1)
    dense = torch.optim.SGD(model.out.parameters(), lr=0.1)
    lf = nn.CrossEntropyLoss()
    theta0 = model.emb.weight.detach().clone()
    g = torch.Generator().manual_seed(1)
    expected_grad, expected_update, expected_dist = [], [], []
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with Cockpit(model, opt, lf, instruments=[GradNorm(), UpdateSize(), Distance()]) as cp:
            for _ in range(3):
                x = torch.randint(0, 20, (6, 5), generator=g)  # repeated indices: duplicates to coalesce
                y = torch.randint(0, 3, (6,), generator=g)
                opt.zero_grad()
                dense.zero_grad()
                lf(model(x), y).backward()
                expected_grad.append(model.emb.weight.grad.to_dense().double().norm().item())
                before = model.emb.weight.detach().clone()
                expected_dist.append((before - theta0).double().norm().item())  # theta_t before step t
                opt.step()
                dense.step()
                expected_update.append((model.emb.weight.detach() - before).double().norm().item())
    # the one thing said: the dense layer, stepped by the other optimizer, is in no statistic (on step 0's records)
    assert [str(w.message) for w in said] == ["cockpit-lite: " + attach.untracked_note(["out.weight", "out.bias"], 1)]
    assert "does not hold them (out.weight, out.bias)" in cp.history.value_at("note/grad_norm", 0)
    np.testing.assert_allclose(cp.history.values("grad_norm/emb.weight"), expected_grad, rtol=1e-5)
    np.testing.assert_allclose(cp.history.values("update_size/emb.weight"), expected_update, rtol=1e-5)
    np.testing.assert_allclose(cp.history.values("distance/emb.weight"), expected_dist, rtol=1e-5, atol=1e-7)
    assert expected_dist[-1] > 0


def test_unitwise_norm_of_a_sparse_gradient_matches_the_dense_one():
    i = torch.tensor([[3, 0, 3, 7]])
    v = torch.randn(4, 5, dtype=torch.float64)
    x = torch.sparse_coo_tensor(i, v, (9, 5), check_invariants=True)  # uncoalesced: row 3 twice
    for p in (2.0, 1.0, 3.0, math.inf):
        want = x.to_dense().norm(p, dim=1, keepdim=True)
        torch.testing.assert_close(unitwise_norm(x, p), want)
    torch.testing.assert_close(unitwise_norm(x.sum(1), 2.0), x.to_dense().sum(1).norm())


def test_clipping_agc_statistics_on_a_sparse_gradient_warn_nothing():
    torch.manual_seed(0)
    model = _Bag()
    opt = torch.optim.SparseAdam(list(model.emb.parameters()), lr=0.1)
    lf = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*the optimizer the cockpit was given does not hold them")
        with Cockpit(model, opt, lf, instruments=[Clipping()]) as cp:
            x, y = torch.randint(0, 20, (6, 5)), torch.randint(0, 3, (6,))
            lf(model(x), y).backward()
            want = model.emb.weight.grad.to_dense().norm().item()
            opt.step()
    assert cp.history.last("clip/global/norm") == pytest.approx(want, rel=1e-5)
    assert cp.history.last("clip/agc/units") == 20


def test_agc_with_every_trained_parameter_excluded_says_so():
    """Only the final layer trained (AGC leaves it unclipped by default): no AGC statistics, and a note that
    says why and how to include it, never a silent absence."""
    torch.manual_seed(0)
    model = _Bag()
    model.emb.requires_grad_(False)
    opt = torch.optim.SGD(model.out.parameters(), lr=0.1)
    lf = nn.CrossEntropyLoss()
    with Cockpit(model, opt, lf, instruments=[Clipping()]) as cp:
        x, y = torch.randint(0, 20, (6, 5)), torch.randint(0, 3, (6,))
        lf(model(x), y).backward()
        opt.step()
    assert not [t for t in cp.history if t.startswith("clip/agc")]
    assert "agc_exclude=()" in cp.history.last("note/clipping")
    assert cp.history.last("clip/global/norm") is not None


def test_tracin_tables_with_a_sparse_embedding_against_a_loop_over_examples():
    """TracIn(z, z') = sum_t eta c g_t(z) . g_t(z') with a sparse Embedding trained by SparseAdam,
    against one autograd call per example at theta_t (the sparse gradients made dense)."""
    torch.manual_seed(0)
    model = _Bag()
    model.out.requires_grad_(False)
    lr, b = 0.1, 4
    opt = torch.optim.SparseAdam([model.emb.weight], lr=lr)
    lf = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randint(0, 20, (12, 5), generator=g), torch.randint(0, 3, (12,), generator=g))
    px, py = torch.randint(0, 20, (3, 5), generator=g), torch.randint(0, 3, (3,), generator=g)
    tracin = TracIn(probes=(px, py))

    def grads(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows = []
        for i in range(len(x)):  # under paused(): the reference's forwards are no part of the step
            with paused():
                loss = lf(model(x[i : i + 1]).double(), y[i : i + 1])
            rows.append(torch.autograd.grad(loss, model.emb.weight)[0].to_dense().reshape(-1))
        return torch.stack(rows)

    self_ref, infl_ref = np.zeros(12), np.zeros((12, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Cockpit(model, opt, lf, instruments=[tracin]) as cp:
            for step, (x, y) in enumerate(cp.track(DataLoader(data, batch_size=b))):
                G, H = grads(x, y), grads(px, py)
                idx = np.arange(step * b, (step + 1) * b)
                self_ref[idx] += (lr / b) * (G**2).sum(1).double().numpy()
                infl_ref[idx] += (lr / b) * (G @ H.T).double().numpy()
                opt.zero_grad()
                lf(model(x), y).backward()
                opt.step()
    np.testing.assert_allclose(tracin.self_influence(), self_ref, rtol=1e-4)
    np.testing.assert_allclose(tracin.influence(), infl_ref, rtol=1e-4, atol=1e-9)
    assert np.abs(infl_ref).max() > 0


# --- Must 7: arguments at attach, a closed cockpit, the umask, warnings ----------------------------------
def _tracin_cockpit(probes) -> Cockpit:
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return Cockpit(model, opt, nn.CrossEntropyLoss(), instruments=[TracIn(probes=probes)])


@pytest.mark.parametrize(
    "inputs, fragment",
    [
        (torch.randn(4, 7), "fails on the probe inputs"),  # 7 features for a 6-feature model
        (torch.randn(4, 6, dtype=torch.float64), "fails on the probe inputs"),  # dtype
        (torch.randn(6), "returns 3 rows for 6 probes"),  # one example without its batch axis
    ],
)
def test_tracin_probes_of_the_wrong_shape_or_dtype_are_refused_at_attach(inputs, fragment):
    probes = (inputs, torch.zeros(len(inputs), dtype=torch.long))
    with pytest.raises(ValueError, match="TracIn") as e:
        _tracin_cockpit(probes)
    assert fragment in str(e.value)


def test_tracin_attach_probe_leaves_training_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Dropout(0.5), nn.Linear(5, 3))
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cp = Cockpit(model, opt, nn.CrossEntropyLoss(), instruments=[TracIn(probes=_batch(4))])
    cp.close()
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_a_closed_cockpit_used_again_raises_a_clear_error():
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cp = Cockpit(model, opt, instruments="minimal")
    cp.close()
    with pytest.raises(RuntimeError, match="closed Cockpit"):
        with cp:
            pass
    with pytest.raises(RuntimeError, match="closed Cockpit"):
        cp.track([1, 2])
    with pytest.raises(RuntimeError, match="closed Cockpit"):
        cp.model_called((torch.zeros(2, 6),))
    x, y = _batch()
    nn.functional.cross_entropy(model(x), y).backward()  # training after close is untouched, unrecorded
    opt.step()
    assert cp.step == 0


def test_a_backward_after_close_through_outputs_of_a_tracked_forward_is_silent():
    model = models.mlp()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Cockpit(model, opt, nn.CrossEntropyLoss(), instruments="economy") as cp:
            loss = nn.CrossEntropyLoss()(model(x), y)  # the cockpit's hooks sit on this graph
        loss.backward()  # after close: the hooks on the graph's tensors find no step
    nn.CrossEntropyLoss()(ref(x), y).backward()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    opt.step()
    assert cp.step == 0 and "loss" not in cp.history


def test_the_dashboard_png_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a.png", b"png")
        (tmp_path / "b.txt").write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.png").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "a.png").stat().st_mode) == stat.S_IMODE((tmp_path / "b.txt").stat().st_mode)


@pytest.mark.parametrize("preset", ["economy", "full"])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_non_finite_loss_leaks_no_library_warning(preset, bad):
    model, opt, lf = _mlp_sgd()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Cockpit(model, opt, lf, instruments=preset) as cp:
            for i in range(4):
                x, y = _batch(seed=i)
                opt.zero_grad()
                out = model(x)
                if i == 1:  # one example's loss is non-finite, then the whole batch's
                    out = out.index_put((torch.tensor([0]), y[:1]), torch.tensor(-bad))
                loss = lf(out, y) * (bad if i == 2 else 1.0)
                loss.backward()
                opt.step()
            cp.verdicts()
    leaked = [w for w in caught if "CockpitWarning" not in w.category.__name__]
    assert not leaked, [str(w.message) for w in leaked]


def test_agc_clip_refuses_a_sparse_gradient_with_one_message():
    emb = nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1, 1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradient"):
        clip_(emb.parameters(), 0.01)


# --- several optimizers (Muon beside AdamW): one step of them all ------------------------------------------
def _norm(ts) -> float:
    """The float64 2-norm of tensors taken together."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in ts))


def test_several_optimizers_step_the_model_together():
    """Cockpit(model, [sgd, adam]): a step ends when both have stepped; the gradient norm, the update (both
    optimizers' steps) and the distance cover every parameter, against direct computation at each step;
    the first step's per-sample norms against the float64 loop; nothing said."""
    torch.manual_seed(0)
    model = models.mlp()
    params = list(model.parameters())
    sgd, adam = torch.optim.SGD(params[:2], lr=0.1, momentum=0.9), torch.optim.Adam(params[2:], lr=0.01)
    lf = nn.CrossEntropyLoss()
    theta0 = [p.detach().clone() for p in params]
    want: dict[str, list[float]] = {"grad_norm": [], "update_size": [], "distance": []}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Cockpit(model, [sgd, adam], lf, instruments="economy") as cp:
            for s in range(3):
                x, y = _batch(seed=s)
                sgd.zero_grad()
                adam.zero_grad()
                lf(model(x), y).backward()
                before = [p.detach().clone() for p in params]
                want["grad_norm"].append(_norm(p.grad for p in params))
                want["distance"].append(_norm(b - t for b, t in zip(before, theta0, strict=True)))
                sgd.step()
                adam.step()
                want["update_size"].append(_norm(p.detach() - b for p, b in zip(params, before, strict=True)))
    assert cp.step == 3
    for tag, values in want.items():
        np.testing.assert_allclose(cp.history.values(tag), values, rtol=1e-5, atol=1e-8, err_msg=tag)
    x, y = _batch(seed=0)
    g = _per_sample_grads(x, y, scale=1.0)  # (step 0: the initial parameters)
    np.testing.assert_allclose(cp.history.value_at("persample/grad_norm", 0), np.linalg.norm(g, axis=1), rtol=1e-4)


def test_a_parameter_two_optimizers_hold_is_refused():
    model = models.mlp()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="held by two of the optimizers"):
        Cockpit(model, [torch.optim.SGD(params, lr=0.1), torch.optim.SGD(params[:2], lr=0.1)])


def test_a_step_where_one_of_several_optimizers_did_not_step_leaves_nothing_to_the_next():
    """Cockpit(model, [sgd, adam]) where an iteration steps only sgd (then zeroes the gradients): that
    iteration never ends a step, and counts as skipped; the next iteration, where both step, is a whole
    step of its own: its gradient norm, update and per-sample norms against direct computation."""
    torch.manual_seed(0)
    model = models.mlp()
    params = list(model.parameters())
    sgd, adam = torch.optim.SGD(params[:2], lr=0.1), torch.optim.Adam(params[2:], lr=0.01)
    lf = nn.CrossEntropyLoss()

    with Cockpit(model, [sgd, adam], lf, instruments="economy") as cp:
        for s, both in enumerate([True, False, True]):
            x, y = _batch(seed=s)
            sgd.zero_grad()
            adam.zero_grad()
            lf(model(x), y).backward()
            before = [p.detach().clone() for p in params]
            grad_norm = _norm(p.grad for p in params)
            sgd.step()
            if both:
                adam.step()
            update = _norm(p.detach() - b for p, b in zip(params, before, strict=True))
    assert cp.step == 2 and cp.history["skipped"] == [(1, 1)]
    np.testing.assert_allclose(cp.history.value_at("grad_norm", 1), grad_norm, rtol=1e-5)
    np.testing.assert_allclose(cp.history.value_at("update_size", 1), update, rtol=1e-5)
    ref = models.mlp().double()
    ref.load_state_dict({n: b for n, b in zip(dict(model.named_parameters()), before, strict=True)})
    want = np.linalg.norm(_per_sample_grads(x, y, 1.0, ref), axis=1)
    np.testing.assert_allclose(cp.history.value_at("persample/grad_norm", 1), want, rtol=1e-4)


def test_a_model_called_by_its_parts_is_followed_from_its_third_step():
    """The loop calls the model's parts (model.enc(x), then model.head(h)) with a functional loss: the model's
    forward never runs. Before: nothing recorded and nothing said. Now, after two optimizer steps with no
    forward seen (a cockpit built inside a step misses one), each step's first call of a part is the model's
    call: loss, gradient norm and per-sample norms against a float64 loop over examples, one warning; a
    model whose trained parameters no part holds is said (warning, note on disk), not dark."""
    from cockpit_lite.instruments import Loss, PerSampleGradNorms

    from cockpit_lite import CockpitWarning

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

    torch.manual_seed(0)
    model = Pair().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    ce = nn.functional.cross_entropy
    want = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Cockpit(model, opt, instruments=[Loss(), GradNorm(), PerSampleGradNorms()], sinks=[]) as cockpit:
            for _ in range(5):
                x, y = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
                ref = copy.deepcopy(model)
                rows = []
                for i in range(5):
                    li = ce(ref.head(torch.tanh(ref.enc(x[i : i + 1]))), y[i : i + 1])
                    rows.append(torch.cat([t.reshape(-1) for t in torch.autograd.grad(li, list(ref.parameters()))]))
                rows = torch.stack(rows).numpy()
                opt.zero_grad()
                loss = ce(model.head(torch.tanh(model.enc(x))), y)
                loss.backward()
                opt.step()
                want.append((float(loss), np.linalg.norm(rows, axis=1), np.linalg.norm(rows.mean(0))))
    h = cockpit.history
    assert [s for s, _ in h["loss"]] == [2, 3, 4]  # (steps count the optimizer's steps, the first two unseen)
    for k, (loss, norms, grad_norm) in enumerate(want[2:]):
        step = 2 + k
        assert h.value_at("loss", step) == pytest.approx(loss, rel=1e-12)
        np.testing.assert_allclose(h.value_at("persample/grad_norm", step), norms, rtol=1e-10)
        assert h.value_at("grad_norm", step) == pytest.approx(grad_norm, rel=1e-10)
    said = [w for w in caught if issubclass(w.category, CockpitWarning) and "is never called" in str(w.message)]
    assert len(said) == 1 and "model.encoder(x)" in str(said[0].message)

    class Bare(nn.Module):  # (its parameter is its own: no part to follow)
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3))

    bare = Bare()
    opt = torch.optim.SGD(bare.parameters(), lr=0.1)
    with pytest.warns(CockpitWarning, match="was never called, nor a submodule"):
        with Cockpit(bare, opt, sinks=[]) as cockpit:
            for _ in range(3):
                opt.zero_grad()
                (torch.randn(5, 4) @ bare.w).square().mean().backward()
                opt.step()
    assert list(cockpit.history) == ["note/cockpit"]


def _share_norms(model: nn.Module, x: torch.Tensor, loss_of) -> list[float]:
    """||g_i|| = B ||example i's share of p.grad|| for the loss ``loss_of(out)`` of ``model(x)``, float64, one
    autograd call per example: the gradient flows back through example i's row of the output only."""
    ref = copy.deepcopy(model)
    b, norms = len(x), []
    for i in range(b):
        out = ref(x)
        row = torch.zeros(b, 1, dtype=out.dtype)
        row[i] = 1.0
        own = out * row + (out * (1 - row)).detach()  # example i's row carries the gradient
        share = torch.autograd.grad(loss_of(own), list(ref.parameters()))
        norms.append(float(b * torch.cat([q.reshape(-1) for q in share]).norm()))
    return norms


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
@pytest.mark.parametrize("select", ["mask", "indices", "repeated", "permuted"])
def test_a_loss_over_a_selection_of_the_batch_keeps_the_models_examples(select, functional):
    """``lf(out[mask], y[mask])``: a loss over the examples that have labels. The examples are still the model's
    B rows: per-sample gradient norms (0 for an example left out) and per-sample losses (B values, those left
    out 0, the others B / n times their own for a mean over the n selected, so that the loss is their mean)
    against a float64 loop over examples, one autograd call each (example i's share of p.grad through its row
    of the output). A loss module, or a functional cross-entropy (per-sample losses from its node). Before: the
    loss's n rows were taken for the batch, and every layer was left out; the functional one's rows were folded
    as if they were the batch's in order (a permutation gave each example another's loss)."""
    from cockpit_lite.instruments import Loss, PerSampleGradNorms

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lf = nn.CrossEntropyLoss()
    b = 6
    sel = {
        "mask": torch.tensor([True, False, True, True, False, True]),
        "indices": torch.tensor([5, 0, 3]),
        "repeated": torch.tensor([1, 1, 4]),
        "permuted": torch.tensor([5, 4, 3, 2, 1, 0]),
    }[select]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(b, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (b,), generator=g)
    norms = _share_norms(model, x, lambda out: nn.functional.cross_entropy(out[sel], y[sel]))
    losses = np.zeros(b)
    n = int(sel.sum()) if sel.dtype == torch.bool else len(sel)
    each = nn.functional.cross_entropy(model(x)[sel], y[sel], reduction="none").detach()
    rows = sel.nonzero().squeeze(1) if sel.dtype == torch.bool else sel
    for r, l in zip(rows.tolist(), each.tolist(), strict=True):
        losses[r] += l * b / n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Cockpit(
            model, opt, None if functional else lf, instruments=[Loss(), PerSampleGradNorms()], sinks=[]
        ) as cockpit:
            # (the output itself is dropped at once)
            loss = (nn.functional.cross_entropy if functional else lf)(model(x)[sel], y[sel])
            loss.backward()
            opt.step()
    h = cockpit.history
    np.testing.assert_allclose(h.last("persample/grad_norm"), norms, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(h.last("loss/per_sample"), losses, rtol=1e-10, atol=1e-12)
    assert h.last("loss") == pytest.approx(float(loss), rel=1e-12) == pytest.approx(losses.mean(), rel=1e-10)
    assert not [t for t in h if t.startswith("note/")]


@pytest.mark.parametrize("micro", [1, 2])
def test_a_forward_after_the_last_backward_is_no_part_of_the_step(micro):
    """A loop that evaluates another batch with gradients on after its last backward and before the step (a
    logged loss without ``torch.no_grad()``): that call gets no backward and is no part of the step. Per-sample
    norms, per-sample losses and the norm test against the float64 loop over the trained examples, with one and
    two micro-batches. Before: its examples were joined as a micro-batch of zero rows (12 values, the others
    2.4 times too large)."""
    from cockpit_lite.instruments import GradientTests, Loss, PerSampleGradNorms

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lf = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(micro)]
    ys = [torch.randint(0, 3, (5,), generator=g) for _ in range(micro)]
    x, y = torch.cat(xs), torch.cat(ys)
    ref = copy.deepcopy(model)
    rows = []
    for i in range(len(x)):
        li = nn.functional.cross_entropy(ref(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([t.reshape(-1) for t in torch.autograd.grad(li, list(ref.parameters()))]))
    rows = torch.stack(rows).numpy()
    gbar = rows.mean(0)
    b = len(x)
    norm_test = np.sqrt(((rows - gbar) ** 2).sum() / (b * (b - 1) * (gbar @ gbar)))
    losses = nn.functional.cross_entropy(ref(x), y, reduction="none").detach().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        instruments = [Loss(), PerSampleGradNorms(), GradientTests()]
        with Cockpit(model, opt, lf, instruments=instruments, sinks=[]) as cockpit:
            for xm, ym in zip(xs, ys, strict=True):
                (lf(model(xm), ym) / micro).backward()
            lf(model(torch.randn(7, 4, dtype=torch.float64)), torch.randint(0, 3, (7,)))  # logged, never trained on
            opt.step()
    h = cockpit.history
    np.testing.assert_allclose(h.last("persample/grad_norm"), np.linalg.norm(rows, axis=1), rtol=1e-10)
    np.testing.assert_allclose(h.last("loss/per_sample"), losses, rtol=1e-10)
    assert h.last("tests/norm") == pytest.approx(norm_test, rel=1e-8)
    assert "no backward" in h.last("note/gradient_tests")  # (the call left out is said)


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
@pytest.mark.parametrize("form", ["sequences", "tokens"])
def test_a_token_loss_over_selected_rows_keeps_the_models_examples(form, functional):
    """A token loss over a selection, the examples still the model's B sequences:

    - ``sequences``: ``lf(out.view(B, T, V)[mask].reshape(-1, V), y[mask].reshape(-1))``, the selected
      sequences' tokens; each one's per-sample loss is its mean token loss, B / n times (n selected);
    - ``tokens``: ``lf(out.view(B T, V)[keep], y.view(-1)[keep])``, the kept tokens; each sequence's loss is the
      sum of its kept token losses, B / n times (n kept tokens; a sequence with none: 0).

    Per-sample norms and losses against the float64 loop, with a loss module and a functional cross-entropy.
    Before: the token rows were taken for the batch, every layer was left out and 'loss/per_sample' held token
    losses."""
    from cockpit_lite.instruments import Loss, PerSampleGradNorms

    torch.manual_seed(0)
    b, t, v = 6, 5, 3
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, t * v)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    lf = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(b, 4, generator=g, dtype=torch.float64), torch.randint(0, v, (b, t), generator=g)
    if form == "sequences":
        sel = torch.tensor([True, True, False, True, True, True])

        def rows_of(out):
            return out.view(b, t, v)[sel].reshape(-1, v), y[sel].reshape(-1)

        with torch.no_grad():
            tokens = nn.functional.cross_entropy(*rows_of(model(x)), reduction="none")
        losses = torch.zeros(b, dtype=torch.float64)
        losses[sel] = tokens.view(-1, t).mean(1) * b / int(sel.sum())
    else:
        keep = torch.rand(b * t, generator=g) > 0.3
        keep[t * 2 : t * 3] = False  # (a sequence with no kept token: 0)

        def rows_of(out):
            return out.view(b * t, v)[keep], y.view(-1)[keep]

        with torch.no_grad():
            tokens = nn.functional.cross_entropy(*rows_of(model(x)), reduction="none")
        owner = keep.nonzero().squeeze(1) // t
        losses = torch.zeros(b, dtype=torch.float64).index_add_(0, owner, tokens) * b / int(keep.sum())
    norms = _share_norms(model, x, lambda out: nn.functional.cross_entropy(*rows_of(out)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Cockpit(
            model, opt, None if functional else lf, instruments=[Loss(), PerSampleGradNorms()], sinks=[]
        ) as cp:
            opt.zero_grad()
            (nn.functional.cross_entropy if functional else lf)(*rows_of(model(x))).backward()
            opt.step()
    h = cp.history
    np.testing.assert_allclose(h.last("persample/grad_norm"), norms, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(h.last("loss/per_sample"), losses.numpy(), rtol=1e-10, atol=1e-12)
    assert not [tag for tag in h if tag.startswith("note/")]
