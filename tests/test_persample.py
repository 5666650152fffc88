"""Per-sample norms, Gram entries and projections versus a float64 loop over samples."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cockpit_lite import Cockpit, Need
from tests import models
from tests.reference import Probe, flat, per_sample_grads_loop

RTOL, ATOL = 2e-4, 1e-6


def _run_one_step(model, loss_fn, x, y, optimizer=None, directions=None, flags=None, device="cpu"):
    """One step on ``device`` (model and loss module moved there in place): the record, the float64
    loop's per-sample gradients and the update (numpy, on the CPU). A ``fixed`` direction is declared known
    before the step (``Needs.early``: projected layer by layer during backward), the update after it."""
    model.to(device)
    loss_fn.to(device)
    x, y = x.to(device), y.to(device)
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1)
    probe = Probe(directions=directions, flags=flags, early={"fixed"})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = per_sample_grads_loop(model, loss_fn, x, y)
    with Cockpit(model, optimizer, loss_fn, instruments=[probe]):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    update = {n: (after[n] - before[n]).double().cpu().numpy() for n in before}
    return probe.records[0], ref, update


def _check_all(rec, ref, update, fixed=None):
    names = list(ref)
    for n in names:
        expected = (ref[n].reshape(len(ref[n]), -1) ** 2).sum(1)
        np.testing.assert_allclose(rec.per_sample_sq_norms_by_param[n], expected, rtol=RTOL, atol=ATOL, err_msg=n)
        g = ref[n].reshape(len(ref[n]), -1)
        np.testing.assert_allclose(rec.per_sample_gram_by_param[n], g @ g.T, rtol=RTOL, atol=ATOL, err_msg=n)
    G = flat(ref)
    np.testing.assert_allclose(rec.per_sample_sq_norms, (G**2).sum(1), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(rec.per_sample_dot_mean, G @ G.mean(0), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(rec.mean_grad_sq_norm, G.mean(0) @ G.mean(0), rtol=RTOL, atol=ATOL)
    d = np.concatenate([update[n].reshape(-1) for n in names])
    np.testing.assert_allclose(rec.projections["update"], G @ d, rtol=RTOL, atol=1e-7)
    if fixed is not None:
        v = np.concatenate([fixed[n].double().numpy().reshape(-1) for n in names])
        np.testing.assert_allclose(rec.projections["fixed"], G @ v, rtol=RTOL, atol=ATOL)


def _on_params_device(rec, d: dict) -> dict:
    return {n: v.to(next(iter(rec.params.values())).device) for n, v in d.items()}


def _directions(model, seed=1):
    """A fixed random direction (drawn on the CPU, moved to the parameters' device at the step)."""
    gen = torch.Generator().manual_seed(seed)
    fixed = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    return fixed, {"update": lambda rec: rec.update, "fixed": lambda rec: _on_params_device(rec, fixed)}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mlp_matches_float64_loop(device, reduction):
    torch.manual_seed(0)
    model = models.mlp()
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    fixed, dirs = _directions(model)
    rec, ref, update = _run_one_step(
        model, nn.CrossEntropyLoss(reduction=reduction), x, y, directions=dirs, device=device
    )
    _check_all(rec, ref, update, fixed)
    # the mini-batch gradient is the mean (or sum) of the per-sample gradients
    scale = 1 / 7 if reduction == "mean" else 1.0
    np.testing.assert_allclose(rec.grad_norm, np.linalg.norm(flat(ref).sum(0) * scale), rtol=1e-5)


def test_mse_multi_output_mean_reduction(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 3))
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    rec, ref, update = _run_one_step(model, nn.MSELoss(), x, y, directions=_directions(model)[1], device=device)
    _check_all(rec, ref, update)
    np.testing.assert_allclose(rec.per_sample_loss.mean(), rec.loss, rtol=1e-6)


@pytest.mark.parametrize("kernel", ["unfold", "grouped", "swapped"])
def test_cnn_grouped_conv_conv1d_groupnorm(device, kernel, monkeypatch):
    from cockpit_lite.persample.layers import ConvHandler

    monkeypatch.setattr(ConvHandler, "_choice", {})
    monkeypatch.setattr(ConvHandler, "_tune", lambda self, x, e: kernel)
    torch.manual_seed(0)
    model = models.GroupedCNN()
    x, y = models.cnn_batch(6)
    fixed, dirs = _directions(model)
    rec, ref, update = _run_one_step(model, nn.CrossEntropyLoss(), x, y, directions=dirs, device=device)
    _check_all(rec, ref, update, fixed)


class _StridedCNN(nn.Module):
    """groups = 1 convs whose swapped kernel yields more than k outputs (stride 2 on an even input),
    a dilated rectangular kernel with a rectangular stride, and a strided Conv1d."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, stride=2, padding=1)  # 10x10 -> 5x5
        self.conv2 = nn.Conv2d(5, 4, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(1, 1))
        self.conv1d = nn.Conv1d(4, 3, 3, stride=2)
        self.head = nn.Linear(21, 3)

    def forward(self, x):
        x = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))  # (B, 4, 3, 5)
        return self.head(self.conv1d(x.flatten(2)).flatten(1))


@pytest.mark.parametrize("kernel", ["unfold", "grouped", "swapped"])
def test_strided_dilated_convs_every_kernel(device, kernel, monkeypatch):
    from cockpit_lite.persample.layers import ConvHandler

    monkeypatch.setattr(ConvHandler, "_choice", {})
    monkeypatch.setattr(ConvHandler, "_tune", lambda self, x, e: kernel)
    torch.manual_seed(0)
    model = _StridedCNN()
    x, y = torch.randn(6, 3, 10, 10), torch.randint(0, 3, (6,))
    fixed, dirs = _directions(model)
    rec, ref, update = _run_one_step(model, nn.CrossEntropyLoss(), x, y, directions=dirs, device=device)
    _check_all(rec, ref, update, fixed)


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_embedding_attention_layernorm(device, batch_first):
    torch.manual_seed(0)
    model = models.TinyTransformer(batch_first=batch_first)
    x, y = models.token_batch(5)
    fixed, dirs = _directions(model)
    rec, ref, update = _run_one_step(model, nn.CrossEntropyLoss(), x, y, directions=dirs, device=device)
    _check_all(rec, ref, update, fixed)


def test_matches_backpack_batchgrad(device):
    """A second, independent reference: BackPACK's BatchGrad (right also for grouped conv)."""
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import BatchGrad

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x, y = models.cnn_batch(6)
    loss_fn = nn.CrossEntropyLoss()
    ext_model, ext_loss = backpack.extend(copy.deepcopy(model)), backpack.extend(nn.CrossEntropyLoss())
    rec, _, _ = _run_one_step(model, loss_fn, x, y, device=device)
    with backpack.backpack(BatchGrad()):
        ext_loss(ext_model(x), y).backward()
    for n, p in ext_model.named_parameters():
        gb = (p.grad_batch * len(y)).reshape(len(y), -1).double()  # BackPACK returns g_i / B for a mean
        np.testing.assert_allclose(rec.per_sample_sq_norms_by_param[n], (gb**2).sum(1).numpy(), rtol=RTOL)


def test_sq_norms_only_path_uses_no_gram(device):
    """Norms alone (ghost path for T > 1 when cheaper) agree with the loop too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 16, 3), nn.ReLU(), nn.Conv1d(16, 16, 3), nn.Flatten(), nn.Linear(16 * 4, 2))
    x, y = torch.randn(4, 3, 8), torch.randint(0, 2, (4,))
    rec, ref, _ = _run_one_step(
        model,
        nn.CrossEntropyLoss(),
        x,
        y,
        flags={Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_SQ_NORMS_BY_PARAM},
        device=device,
    )
    for n in ref:
        np.testing.assert_allclose(
            rec.per_sample_sq_norms_by_param[n], (ref[n].reshape(4, -1) ** 2).sum(1), rtol=RTOL, err_msg=n
        )
    assert rec.per_sample_gram is None


@pytest.mark.parametrize("batch", [130, 260])
def test_dot_mean_from_gram_panels_at_large_batches(device, batch):
    """g_i . gbar from the factors' Grams (full products below B = 256; above, only their four upper
    row panels, cut unevenly here), and the squared norms from those Grams' diagonals, agree with the
    loop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 3))
    x, y = torch.randn(batch, 784), torch.randint(0, 3, (batch,))
    flags = {Need.PER_SAMPLE_DOT_MEAN, Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_SQ_NORMS_BY_PARAM}
    rec, ref, _ = _run_one_step(model, nn.CrossEntropyLoss(), x, y, flags=flags, device=device)
    G = flat(ref)
    np.testing.assert_allclose(rec.per_sample_dot_mean, G @ G.mean(0), rtol=RTOL, atol=ATOL)
    for n in ref:
        np.testing.assert_allclose(
            rec.per_sample_sq_norms_by_param[n], (ref[n].reshape(batch, -1) ** 2).sum(1), rtol=RTOL, err_msg=n
        )
    assert rec.per_sample_gram is None


def test_weights_shared_by_two_linear_modules(device):
    """A tied weight's per-sample gradient is the sum over its uses (with the cross terms between
    them): the engine forms and adds each use's g_i at the end of backward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    model[2].weight = model[0].weight  # the biases stay separate
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    fixed, dirs = _directions(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the gradient-sum check passes too
        rec, ref, update = _run_one_step(model, nn.CrossEntropyLoss(), x, y, directions=dirs, device=device)
    assert set(rec.per_sample_sq_norms_by_param) == set(ref) == {"0.weight", "0.bias", "2.bias", "4.weight", "4.bias"}
    _check_all(rec, ref, update, fixed)


class _TiedLM(nn.Module):
    """Input embedding and output layer share one matrix, as in GPT-2 (wte = lm_head)."""

    def __init__(self, vocab=7, d=4, bias=False, pooled=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.mix = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=bias)
        self.lm_head.weight = self.emb.weight
        self.pooled = pooled

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.emb(tokens)))
        if self.pooled:  # the output layer at one position per sample
            return self.lm_head(h.mean(1))
        return self.lm_head(h).mean(1)  # (B, vocab)


@pytest.mark.parametrize("formed,hooked", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("bias,pooled", [(False, False), (True, False), (True, True)])
def test_tied_input_embedding_and_output_layer(device, bias, pooled, formed, hooked, monkeypatch):
    """By TiedEmbeddingView, never by forming each use's g_i and adding them (so no memory limit): in factor
    form, or with the B x V x d g_i formed once where they fit in TIED_FORMED_BYTES (gbar from the output
    layer's own weight gradient, or where that node is not hooked from the formed g_i)."""
    from cockpit_lite.persample import engine, views
    from cockpit_lite.persample.layers import LinearHandler

    if not hooked:
        monkeypatch.setattr(LinearHandler, "weight_grad_node", lambda self, outputs: None)

    def never(*args):
        raise AssertionError("the tied embedding took the other route")

    monkeypatch.setattr(engine, "combined", never)
    monkeypatch.setattr(engine, "TIED_BYTES", 100)
    monkeypatch.setattr(views, "TIED_FORMED_BYTES", 1 << 30 if formed else 0)
    monkeypatch.setattr(views.TiedEmbeddingView, "_cross" if formed else "_formed", never)
    torch.manual_seed(0)
    model = _TiedLM(bias=bias, pooled=pooled)
    x, y = torch.randint(0, 7, (5, 6)), torch.randint(0, 7, (5,))
    fixed, dirs = _directions(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec, ref, update = _run_one_step(model, nn.CrossEntropyLoss(), x, y, directions=dirs, device=device)
    assert "emb.weight" in rec.per_sample_sq_norms_by_param
    _check_all(rec, ref, update, fixed)


def test_tied_weights_too_large_to_form_are_refused(device, monkeypatch):
    from cockpit_lite.persample import engine

    monkeypatch.setattr(engine, "TIED_BYTES", 100)
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Tanh(), nn.Linear(4, 4, bias=False), nn.Linear(4, 3))
    model[2].weight = model[0].weight
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with pytest.warns(RuntimeWarning, match=r"shared by several modules \(0.weight\) need their per-sample"):
        rec, _, _ = _run_one_step(model, nn.CrossEntropyLoss(), x, y, device=device)
    assert rec.per_sample_sq_norms is None and rec.per_sample_dot_mean is None
    assert any("untie the weights" in n for n in rec.notes)
    assert rec.loss is not None and rec.grad_norms  # the other records are unaffected


def test_train_mode_batchnorm_is_served_by_the_coupled_path(device):
    """Train-mode BatchNorm couples the examples: g_i = d l_i / d theta with the batch as it was, from
    the coupled path (tests/test_coupled.py checks it in depth), against the float64 loop over examples
    on the whole batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)).to(device)
    x, y = torch.randn(6, 4, device=device), torch.randint(0, 2, (6,), device=device)
    m = copy.deepcopy(model).double()
    losses = nn.functional.cross_entropy(m(x.double()), y, reduction="none")
    ref = [
        sum(float((g**2).sum()) for g in torch.autograd.grad(losses[i], list(m.parameters()), retain_graph=True))
        for i in range(6)
    ]
    probe, opt, loss_fn = Probe(), torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss()
    with Cockpit(model, opt, loss_fn, instruments=[probe]):
        loss_fn(model(x), y).backward()
        opt.step()
    rec = probe.records[0]
    np.testing.assert_allclose(rec.per_sample_sq_norms, ref, rtol=1e-4)
    assert rec.loss is not None and rec.grad_norms


def test_eval_mode_batchnorm_is_served(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2)
    model[1].eval()
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    rec, ref, update = _run_one_step(
        model, nn.CrossEntropyLoss(), x, y, directions=_directions(model)[1], device=device
    )
    _check_all(rec, ref, update)


def test_weighted_cross_entropy_with_ignore_index(device):
    torch.manual_seed(0)
    model = models.mlp().to(device)
    x, y = torch.randn(6, 6, device=device), torch.tensor([0, 1, 2, -100, 1, 0], device=device)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], device=device))
    probe = Probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Cockpit(model, opt, loss_fn, instruments=[probe]):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    rec = probe.records[0]
    np.testing.assert_allclose(rec.per_sample_loss.mean(), loss.item(), rtol=1e-6)
    # the mean of the per-sample gradients is the mini-batch gradient
    g = probe.grads_before_step[0]
    np.testing.assert_allclose(
        rec.mean_grad_sq_norm, sum(float((v.double() ** 2).sum()) for v in g.values()), rtol=1e-4
    )


def test_cross_entropy_with_ignored_targets_per_sample_losses(device):
    """Unweighted class-index targets, some ignored: l_i = B u_i / N, N the targets counted (the loss's
    own mean), from an independent evaluation per example; all ignored: the loss is 0/0, so is every l_i."""
    torch.manual_seed(0)
    model = models.mlp().to(device)
    x = torch.randn(6, 6, device=device)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    probe = Probe()
    targets = [torch.tensor([0, 1, 2, -100, 1, -100], device=device), torch.full((6,), -100, device=device)]
    with Cockpit(model, opt, loss_fn, instruments=[probe]):
        for y in targets:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    with torch.no_grad():
        logits = model(x).double()
    y = targets[0]
    expected = [
        0.0 if int(y[i]) == -100 else 6 * float(F.cross_entropy(logits[i : i + 1], y[i : i + 1], reduction="sum")) / 4
        for i in range(6)
    ]
    np.testing.assert_allclose(probe.records[0].per_sample_loss, expected, rtol=1e-6, atol=1e-12)
    assert np.isnan(probe.records[1].per_sample_loss).all()


def test_ambiguous_batch_axis_is_resolved_not_guessed(device):
    """A (T, B, d) activation with T == B has two axes of the batch size: the shape probe (the model on
    B - 1 examples) tells the sample axis. Every parameter is covered, equal to the float64 loop."""
    torch.manual_seed(0)
    model = models.TinyTransformer(batch_first=False)
    x, y = models.token_batch(b=6, t=6)
    loss_fn = nn.CrossEntropyLoss()
    fixed, directions = _directions(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec, ref, update = _run_one_step(model, loss_fn, x, y, directions=directions, device=device)
    assert not rec.per_sample_uncovered and set(rec.per_sample_sq_norms_by_param) == set(ref)
    _check_all(rec, ref, update, fixed)


def test_flattened_token_loss_gives_per_sequence_statistics(device):
    """A loss over flattened tokens ((B*T) rows through attention): a sample is a whole sequence, its
    loss the mean over its tokens (L = mean_i l_i), its gradient that of l_i: against a float64 loop
    running each sequence alone."""
    torch.manual_seed(0)

    class TokenModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = models.TinyTransformer()
            self.out = nn.Linear(8, 3)

        def forward(self, tokens):
            h = self.body.layer(self.body.emb(tokens))
            return self.out(h).reshape(-1, 3)

    model = TokenModel().to(device)
    x = torch.randint(1, 11, (4, 5), device=device)
    y = torch.randint(0, 3, (20,), device=device)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ref = copy.deepcopy(model).double()
    ref_params = [p for n, p in ref.named_parameters() if n in names]
    sq, losses = [], []
    for i in range(4):
        li = nn.functional.cross_entropy(ref(x[i : i + 1]), y[5 * i : 5 * i + 5])
        gs = torch.autograd.grad(li, ref_params, allow_unused=True)
        sq.append(sum(float((g**2).sum()) for g in gs if g is not None))
        losses.append(float(li))
    probe, opt, loss_fn = Probe(), torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss()
    with Cockpit(model, opt, loss_fn, instruments=[probe]):
        loss_fn(model(x), y).backward()
        opt.step()
    rec = probe.records[0]
    assert rec.batch_size == 4
    np.testing.assert_allclose(rec.per_sample_loss, losses, rtol=1e-5)
    np.testing.assert_allclose(rec.per_sample_sq_norms, sq, rtol=1e-4)


class WideConv(nn.Module):
    """Convs whose per-sample gradients are larger than their factors: the view keeps the factors and
    projects through the layer's forward convolution (stride, dilation, circular padding, groups)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1, padding_mode="circular", groups=1)
        self.c2 = nn.Conv2d(16, 24, 3, stride=2, dilation=2, padding=2, groups=4)
        self.c3 = nn.Conv1d(24, 32, 2, bias=False)
        self.head = nn.Linear(32 * 3, 3)

    def forward(self, x):
        x = torch.tanh(self.c2(torch.relu(self.c1(x))))  # (B, 24, 2, 2)
        x = self.c3(x.flatten(2))  # (B, 32, 3)
        return self.head(x.flatten(1))


def test_conv_projections_through_the_forward_convolution(device):
    from cockpit_lite.persample.views import ConvView

    kept = []
    original = ConvView.release

    def spy(self):
        original(self)
        kept.append(bool(self._g))

    torch.manual_seed(0)
    model = WideConv()
    x, y = torch.randn(5, 3, 4, 4), torch.randint(0, 3, (5,))
    fixed, dirs = _directions(model)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ConvView, "release", spy)
        rec, ref, update = _run_one_step(model, nn.CrossEntropyLoss(), x, y, directions=dirs, device=device)
    assert kept.count(False) >= 2  # at least two layers kept their factors, not g_i
    _check_all(rec, ref, update, fixed)


def test_conv_ghost_norms_and_dot_with_the_batch_gradient(device):
    """Norms and g_i . gbar without forming g_i (few positions, wide layers): ghost form and a
    projection of the factors onto the batch gradient."""
    from cockpit_lite.persample.views import ConvView

    formed = []
    original = ConvView.grads

    def spy(self):
        formed.append(self.w)
        return original(self)

    torch.manual_seed(0)
    model = WideConv()
    x, y = torch.randn(5, 3, 4, 4), torch.randint(0, 3, (5,))
    flags = {Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_SQ_NORMS_BY_PARAM, Need.PER_SAMPLE_DOT_MEAN}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ConvView, "grads", spy)
        rec, ref, _ = _run_one_step(model, nn.CrossEntropyLoss(), x, y, flags=flags, device=device)
    assert "c2.weight" not in formed and "c3.weight" not in formed  # the ghost path served them
    for n in ref:
        np.testing.assert_allclose(
            rec.per_sample_sq_norms_by_param[n], (ref[n].reshape(5, -1) ** 2).sum(1), rtol=RTOL, err_msg=n
        )
    G = flat(ref)
    np.testing.assert_allclose(rec.per_sample_dot_mean, G @ G.mean(0), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("hook_node", [True, False, "user hook"])
def test_conv_ghost_takes_the_batch_gradient_from_autograd(device, hook_node):
    """The ghost path's sum_i g_i comes from the convolution's own backward node (not recomputed), also
    where a forward hook of the user's replaces the output (the engine's hook runs first and sees the
    convolution's own); where that node cannot be hooked it is recomputed. All agree with the loop,
    also with a mean loss scaled by an AMP-like backward factor."""
    from cockpit_lite.persample.layers import ConvHandler

    recomputed = []
    original = ConvHandler._batch_grad

    def spy(self, inputs, out_grads):
        recomputed.append(self.names["weight"])
        return original(self, inputs, out_grads)

    torch.manual_seed(0)
    model = WideConv()
    if hook_node == "user hook":
        for m in (model.c2, model.c3):
            m.register_forward_hook(lambda mod, args, out: out * 1.0)
    model.to(device)
    x, y = torch.randn(5, 3, 4, 4, device=device), torch.randint(0, 3, (5,), device=device)
    ref = per_sample_grads_loop(model, nn.CrossEntropyLoss(), x, y)
    probe = Probe(flags={Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_SQ_NORMS_BY_PARAM, Need.PER_SAMPLE_DOT_MEAN})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler(torch.device(device).type, init_scale=1024.0)
    with pytest.MonkeyPatch.context() as mp, Cockpit(model, opt, loss_fn, instruments=[probe]):
        mp.setattr(ConvHandler, "_batch_grad", spy)
        if hook_node is False:  # (as for an output autograd did not make by the convolution's own node)
            mp.setattr(ConvHandler, "weight_grad_node", lambda self, outputs: None)
        opt.zero_grad()
        scaler.scale(loss_fn(model(x), y)).backward()  # backward starts from 1024: the scale is divided out
        scaler.step(opt)
        scaler.update()
    assert sorted(recomputed) == ([] if hook_node else ["c2.weight", "c3.weight"])  # (c1 takes the formed route)
    G = flat(ref)
    np.testing.assert_allclose(probe.records[0].per_sample_dot_mean, G @ G.mean(0), rtol=RTOL, atol=ATOL)


class _PartlyFrozen(nn.Module):
    """Frozen weights with trainable biases (BitFit-style) in Linear (T = 1 and T > 1) and Conv2d, a
    frozen bias with a trainable weight, and LayerNorm with a frozen gain."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.seq = nn.Linear(3, 4)  # applied at 16 positions
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(64, 5)
        self.head = nn.Linear(5, 3)
        for p in (self.conv.weight, self.seq.weight, self.norm.weight, self.fc.weight, self.head.bias):
            p.requires_grad_(False)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(2).transpose(1, 2)  # (B, 16, 3)
        h = self.norm(torch.tanh(self.seq(h)))  # (B, 16, 4)
        return self.head(torch.tanh(self.fc(h.flatten(1))))


def test_frozen_weights_with_trainable_biases(device):
    """Only trainable parameters count: a frozen weight must not add to a layer's per-sample norms,
    Gram entries, dot products or projections (it once did, through its factors)."""
    torch.manual_seed(0)
    model = _PartlyFrozen().to(device)
    x, y = torch.randn(6, 2, 4, 4, device=device), torch.randint(0, 3, (6,), device=device)
    fixed, dirs = _directions(model)
    probe, loss_fn = Probe(directions=dirs), nn.CrossEntropyLoss()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = per_sample_grads_loop(model, loss_fn, x, y)
    assert "fc.bias" in ref and "fc.weight" not in ref
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the gradient-sum check passes too
        with Cockpit(model, opt, loss_fn, instruments=[probe]):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    rec = probe.records[0]
    assert set(rec.per_sample_sq_norms_by_param) == set(ref)
    update = {n: (p.detach() - before[n]).double().cpu().numpy() for n, p in model.named_parameters() if n in ref}
    _check_all(rec, ref, update, {n: v for n, v in fixed.items() if n in ref})


def test_per_sample_statistics_cover_the_optimizers_parameters_only(device):
    """A body left with requires_grad=True but not trained (optimizer built for the head) is not part
    of the per-sample statistics, as it is not part of GradNorm or UpdateSize."""
    torch.manual_seed(0)
    model = models.mlp()
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    head = ["4.weight", "4.bias"]
    opt = torch.optim.SGD(model[4].parameters(), lr=0.1)
    ref = per_sample_grads_loop(model, nn.CrossEntropyLoss(), x, y, names=head)
    rec, _, update = _run_one_step(model, nn.CrossEntropyLoss(), x, y, optimizer=opt, device=device)
    assert set(rec.per_sample_sq_norms_by_param) == set(head) == set(rec.grad_norms)
    np.testing.assert_allclose(rec.per_sample_sq_norms, (flat(ref) ** 2).sum(1), rtol=RTOL, atol=ATOL)
    G = flat(ref)
    np.testing.assert_allclose(rec.per_sample_dot_mean, G @ G.mean(0), rtol=RTOL, atol=ATOL)


class _Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(4, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0].mean(1))


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
def test_recurrent_layers_by_torch_func_or_its_loop(device, cell):
    """LSTM goes through vmap; vmap cannot batch GRU's in-place state update, so its per-sample
    gradients come from a loop over samples, with a warning saying so; both exact."""
    torch.manual_seed(0)
    model = _Recurrent(cell)
    x, y = torch.randn(6, 5, 4), torch.randint(0, 3, (6,))
    fixed, dirs = _directions(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec, ref, update = _run_one_step(model, nn.CrossEntropyLoss(), x, y, directions=dirs, device=device)
    looped = [w for w in caught if "loop over the samples" in str(w.message)]
    if torch.device(device).type == "cpu":
        assert len(looped) == (1 if cell is nn.GRU else 0)
    else:  # (cuDNN is off for the replay: PyTorch's fused CUDA cells, which vmap may batch or not)
        assert len(looped) <= 1
    _check_all(rec, ref, update, fixed)


class _CountingScale(nn.Module):
    """A custom module that updates a buffer in place in its forward (torch.func cannot replay it)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return x * self.scale


def test_a_module_that_mutates_its_buffers_is_not_replayed_into_the_model(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), _CountingScale(), nn.Linear(4, 3)).to(device)
    opt, loss_fn = torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss()
    probe = Probe()
    with pytest.warns(RuntimeWarning, match="leave out _CountingScale"):
        with Cockpit(model, opt, loss_fn, instruments=[probe]):
            for _ in range(3):
                opt.zero_grad()
                loss_fn(model(torch.randn(6, 4, device=device)), torch.randint(0, 3, (6,), device=device)).backward()
                opt.step()
    assert model[1].calls.item() == 3  # the user's three forwards, none of the cockpit's
    assert "1.scale" in probe.records[-1].per_sample_uncovered and probe.records[-1].loss is not None
    assert "1.scale" not in probe.records[-1].per_sample_sq_norms_by_param


@pytest.mark.parametrize("backward_inside", [False, True])
def test_bfloat16_autocast(device, backward_inside):
    """Under autocast, layer inputs arrive in float32 and output gradients in bfloat16: the conv kernels
    once failed on the mixed dtypes (oneDNN 'could not create a primitive descriptor'). Per-sample
    numbers now match the float64 loop to bfloat16 precision, and the gradient-sum check uses a
    tolerance fit for it (no false warning), also when backward runs inside the autocast context."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 16), nn.LayerNorm(16), nn.Linear(16, 5)
    ).to(device)
    x, y = torch.randn(16, 3, 8, 8, device=device), torch.randint(0, 5, (16,), device=device)
    ref = flat(per_sample_grads_loop(model, nn.CrossEntropyLoss(), x, y))
    opt, loss_fn, probe = torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), Probe()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Cockpit(model, opt, loss_fn, instruments=[probe]) as ck:
            opt.zero_grad()
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                loss = loss_fn(model(x), y)
                if backward_inside:
                    loss.backward()
            if not backward_inside:
                loss.backward()
            opt.step()
    rec = probe.records[0]
    assert ck.engine.checks_left == 0
    sq, dots = (ref**2).sum(1), ref @ ref.mean(0)
    np.testing.assert_allclose(rec.per_sample_sq_norms, sq, atol=3e-2 * sq.max())
    np.testing.assert_allclose(rec.per_sample_dot_mean, dots, atol=3e-2 * np.abs(dots).max())


@pytest.mark.parametrize("scaled_first", [False, True])
@pytest.mark.parametrize("shape", [(6, 5, 3), (6, 3, 40), (300, 7, 4), (4, 20, 30)])
def test_factor_view_dot_mean_and_norms_against_formed_gradients(shape, scaled_first):
    """A (B, i) Linear view with its output-gradient scale s and the batch weight gradient of autograd
    (unscaled): ||g_i||^2 and g_i . gbar by every route (Gram of the factors, either product with the
    batch gradient; the output gradients scaled before or after) equal those of the formed float64 g_i, and so
    does their total sum_p ||g_i(p)||^2 alone (``sq_total``), before and after g_i . gbar."""
    from cockpit_lite.persample.views import FactorView

    bsz, i, o = shape
    torch.manual_seed(0)
    x, g, s = torch.randn(bsz, i, dtype=torch.float64), torch.randn(bsz, o, dtype=torch.float64), 2.5
    gw = s * g[:, :, None] * x[:, None, :]  # g_i of the weight (B, o, i), of the bias s e_i
    G = torch.cat([gw.reshape(bsz, -1), s * g], 1)
    want_dot, want_sq = G @ G.mean(0), (G**2).sum(1)
    for with_parts in (False, True):
        views = [
            FactorView(x.reshape(bsz, 1, 1, i), g.reshape(bsz, 1, 1, o), "w", "b", (o, i), e_scale=s, flat=(x, g))
            for _ in range(3)
        ]
        for v in views:
            if with_parts:
                v.batch_grad_parts = ([g.T @ x], s)
            if scaled_first:
                v.e  # noqa: B018 (the output gradients scaled before the statistics)
        v, alone, after = views
        torch.testing.assert_close(v.dot_mean(), want_dot, rtol=1e-10, atol=1e-10)
        sq = v.sq_norms()
        torch.testing.assert_close(sq["w"] + sq["b"], want_sq, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(alone.sq_total(), want_sq, rtol=1e-10, atol=1e-10)
        after.dot_mean()
        torch.testing.assert_close(after.sq_total(), want_sq, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scaled_first", [False, True])
@pytest.mark.parametrize("names", [("w", "b"), ("w", None), (None, "b")])
@pytest.mark.parametrize("shape", [(5, 1, 7, 3, 4), (4, 1, 3, 20, 30), (3, 2, 4, 5, 6), (3, 2, 2, 10, 12)])
def test_factor_view_of_sequences_against_formed_gradients(shape, names, scaled_first):
    """A Linear view at T positions in g groups, its output gradients still to be scaled by s: squared norms
    (ghost form and formed g_i), g_i . gbar (gbar from the formed g_i, or from autograd's weight gradient
    where the engine kept it: then, where the ghost form is the cheaper, a projection onto it without g_i
    formed), Gram entries and the g_i themselves equal the formed float64 g_i's, whichever is asked first and
    whether e was scaled before."""
    from cockpit_lite.persample.views import FactorView

    bsz, grp, t, i, o = shape
    w_name, b_name = names
    torch.manual_seed(0)
    a, e, s = torch.randn(bsz, grp, t, i, dtype=torch.float64), torch.randn(bsz, grp, t, o, dtype=torch.float64), 2.5
    gw = s * torch.einsum("bgto,bgti->bgoi", e, a).reshape(bsz, grp * o, i)  # (B, g o, i)
    gb = s * e.sum(2).reshape(bsz, grp * o)
    G = torch.cat([x for x, n in ((gw.reshape(bsz, -1), w_name), (gb, b_name)) if n is not None], 1)
    want_dot, want_sq = G @ G.mean(0), (G**2).sum(1)
    unscaled_sum = (gw.sum(0) / s).reshape(grp * o, i)  # autograd's weight gradient: sum_i g_i = s W'
    for with_parts, order in [(False, "dot"), (True, "dot"), (False, "sq"), (True, "sq")]:
        v = FactorView(a, e, w_name, b_name, (grp * o, i), e_scale=s)
        if with_parts:
            v.batch_grad_parts = ([unscaled_sum / 2, unscaled_sum / 2], s)  # (two calls' parts)
        if scaled_first:
            v.e  # noqa: B018
        if order == "sq":
            sq = v.sq_norms()
        torch.testing.assert_close(v.dot_mean(), want_dot, rtol=1e-10, atol=1e-10)
        if order == "dot":
            sq = v.sq_norms()
        torch.testing.assert_close(sum(sq.values()), want_sq, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(v.sq_total(), want_sq, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(sum(v.gram().values()), G @ G.T, rtol=1e-10, atol=1e-10)
        got = v.grads()
        if w_name is not None:
            torch.testing.assert_close(got[w_name], gw.reshape(bsz, grp * o, i), rtol=1e-12, atol=1e-12)
        if b_name is not None:
            torch.testing.assert_close(got[b_name], gb, rtol=1e-12, atol=1e-12)


def test_transposed_factor_view_takes_no_batch_gradient_of_the_other_layout():
    """A Conv1D-style view (weight stored (i, o)) of a square layer: a weight gradient given in the stored layout
    has the shape (o, i) too, and must not be read as one."""
    from cockpit_lite.persample.views import TransposedFactorView

    torch.manual_seed(0)
    bsz, t, d, s = 4, 5, 3, 2.0
    a, e = torch.randn(bsz, 1, t, d, dtype=torch.float64), torch.randn(bsz, 1, t, d, dtype=torch.float64)
    gw = s * torch.einsum("bgto,bgti->boi", e, a)  # (B, o, i): the (o, i) layout
    want = gw.reshape(bsz, -1) @ gw.reshape(bsz, -1).mean(0)
    v = TransposedFactorView(a, e, "w", None, (d, d))
    v.e_scale = s
    v.batch_grad_parts = ([(gw.sum(0) / s).T.contiguous()], s)  # the stored layout, (i, o)
    torch.testing.assert_close(v.dot_mean(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("formed", [False, True])
def test_transposed_factor_view_projects_in_the_stored_layout(formed):
    """A Conv1D-style view (weight stored (i, o), i != o, with a bias) at T positions: projections onto
    directions given in the stored layout equal the float64 g_i's, from the kept factors or from the g_i
    that g_i . gbar formed (the engine's route for a direction known before the step)."""
    from cockpit_lite.persample.views import TransposedFactorView

    torch.manual_seed(0)
    bsz, t, i, o, s = 4, 5, 3, 6, 2.0
    a, e = torch.randn(bsz, 1, t, i, dtype=torch.float64), torch.randn(bsz, 1, t, o, dtype=torch.float64)
    gw = s * torch.einsum("bgto,bgti->bio", e, a)  # (B, i, o): the stored layout
    gb = s * e.sum(2).reshape(bsz, o)
    dirs = {k: {"w": torch.randn(i, o, dtype=torch.float64), "b": torch.randn(o, dtype=torch.float64)} for k in "pq"}
    v = TransposedFactorView(a, e, "w", "b", (i, o))
    v.e_scale = s
    if formed:
        v.dot_mean()
    assert v.formed_now() == formed
    got = v.project_many(dirs)
    for k, d in dirs.items():
        want = gw.reshape(bsz, -1) @ d["w"].reshape(-1) + gb @ d["b"]
        torch.testing.assert_close(got[k], want, rtol=1e-10, atol=1e-10)


def test_host_float64_is_exact_for_every_float_dtype():
    from cockpit_lite.providers.base import host_float64

    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        t = torch.randn(7).to(dtype)
        a = host_float64(t)
        assert a.dtype == np.float64
        assert [float(x) for x in a] == [float(x) for x in t]  # each value as the dtype holds it


@pytest.mark.parametrize("early", [False, True])
def test_sequences_take_g_i_dot_gbar_by_projection_unless_formed_g_i_pay(device, early, monkeypatch):
    """Linear calls at T < FORM_AT_T positions, where the ghost form is the cheaper for the norms: g_i . gbar
    is a projection onto autograd's weight gradient and no g_i is formed; with a direction known before the
    step (Alpha's d_{t-1}) the g_i are formed, g_i . gbar and that projection both come from them. Either
    way the squared norms, g_i . gbar and the projections equal the float64 loop's."""
    from cockpit_lite.persample.views import FORM_AT_T, FactorView

    formed = []
    weight_grads = FactorView._weight_grads
    monkeypatch.setattr(FactorView, "_weight_grads", lambda self: (formed.append(self.w), weight_grads(self))[1])

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(6, 16), nn.Linear(16, 8)

        def forward(self, x):  # (B, T, 6) -> (B, 8)
            return self.down(torch.tanh(self.up(x))).mean(1)

    torch.manual_seed(0)
    model = Seq()
    x, y = torch.randn(5, 4, 6), torch.randint(0, 8, (5,))
    assert x.shape[1] < FORM_AT_T and 4 * (6 + 16) < 6 * 16 and 4 * (16 + 8) < 16 * 8  # (the ghost is cheaper)
    fixed, dirs = _directions(model)
    if not early:
        dirs = {"update": dirs["update"]}
    flags = {Need.LOSS, Need.PER_SAMPLE_LOSS, Need.UPDATE, Need.PER_SAMPLE_SQ_NORMS_BY_PARAM, Need.PER_SAMPLE_DOT_MEAN}
    rec, ref, update = _run_one_step(model, nn.CrossEntropyLoss(), x, y, directions=dirs, flags=flags, device=device)
    assert sorted(set(formed)) == (["down.weight", "up.weight"] if early else [])
    G = flat(ref)
    for n in ref:
        want = (ref[n].reshape(len(ref[n]), -1) ** 2).sum(1)
        np.testing.assert_allclose(rec.per_sample_sq_norms_by_param[n], want, rtol=RTOL, atol=ATOL, err_msg=n)
    np.testing.assert_allclose(rec.per_sample_dot_mean, G @ G.mean(0), rtol=RTOL, atol=ATOL)
    d = np.concatenate([update[n].reshape(-1) for n in ref])
    np.testing.assert_allclose(rec.projections["update"], G @ d, rtol=RTOL, atol=1e-7)
    if early:
        v = np.concatenate([fixed[n].double().numpy().reshape(-1) for n in ref])
        np.testing.assert_allclose(rec.projections["fixed"], G @ v, rtol=RTOL, atol=ATOL)
