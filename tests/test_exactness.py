"""The per-sample split, not only its sum: every model of the layer zoo through the exactness harness
(tests/harness.py: per-parameter ||g_i||^2, g_i . gbar and projections against a float64 loop over
samples), and proof that the harness fails on a wrong split that still adds up."""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

from cockpit_lite.persample import views as views_mod
from cockpit_lite.persample.engine import PerSampleEngine
from tests import models
from tests import test_persample as tp
from tests.harness import assert_matches_loop
from tests.test_grad_sum_check import LAYERS


def _labels(b):
    return torch.randint(0, 3, (b,))


# --- models of tests/models.py and the layer zoo of tests/test_grad_sum_check.py ----------------------
MODELS = {
    "mlp": (models.mlp, lambda: (torch.randn(7, 6), _labels(7))),
    "grouped cnn": (models.GroupedCNN, lambda: models.cnn_batch(6)),
    "tiny transformer": (models.TinyTransformer, lambda: models.token_batch(5)),
    "tiny transformer (T, B, d)": (lambda: models.TinyTransformer(batch_first=False), lambda: models.token_batch(5)),
}
for _name, (_build, _data) in LAYERS.items():
    MODELS[_name] = (_build, lambda data=_data: (data(), _labels(6)))
BATCH_AXIS = {"Linear on (T, B, d)": 1}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(MODELS))
def test_layer_zoo_split_matches_the_loop(device, name, reduction):
    build, data = MODELS[name]
    torch.manual_seed(0)
    model = build()
    x, y = data()
    checked = assert_matches_loop(
        model, x, y, nn.CrossEntropyLoss(reduction=reduction), batch_axis=BATCH_AXIS.get(name, 0), device=device
    )
    assert not checked.warnings


# --- more handler paths: several calls per step, mixed shapes, the Gram path, tied and frozen weights --
class _Twice(nn.Module):
    """One module called twice per step, on different inputs."""

    def __init__(self, mod, head_in):
        super().__init__()
        self.mod, self.head = mod, nn.Linear(head_in, 3)

    def forward(self, x):
        h = [torch.tanh(self.mod(x)).flatten(1), torch.tanh(self.mod(x * 0.5)).flatten(1)]
        return self.head(torch.cat(h, 1))


class _LinearMixed(nn.Module):
    """One Linear on (B, d) and on (B, T, d) in the same step."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x[:, 0])) + torch.tanh(self.lin(x)).mean(1))


class _EmbeddingTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(10, 4, padding_idx=1), nn.Linear(4, 3)

    def forward(self, t):
        return self.head(self.emb(t).mean(1) * self.emb(t[:, :2]).sum(1))


class _FrequencyScaled(nn.Module):
    """An embedding whose backward divides each row by its token's count over the whole call."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4, padding_idx=0, scale_grad_by_freq=True)
        self.head = nn.Linear(4, 3)

    def forward(self, t):
        return self.head(self.emb(t).mean(1) + self.emb(t[:, :2]).sum(1))


class _MaskedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.head = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        mask[:, -1] = True
        return self.head(self.attn(x, x, x, key_padding_mask=mask, need_weights=False)[0].mean(1))


class _Linear4d(nn.Module):
    """Linear on (B, 2, 3, d) and a LayerNorm over two axes."""

    def __init__(self):
        super().__init__()
        self.lin, self.norm, self.head = nn.Linear(4, 6), nn.LayerNorm([3, 6]), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.lin(x))).mean((1, 2)))


class _ConvTwiceGhost(nn.Module):
    """A wide strided conv called twice: ghost norms and g_i . gbar from two hooked backward nodes."""

    def __init__(self):
        super().__init__()
        self.c, self.head = nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.Linear(24 * 4 * 2, 3)

    def forward(self, x):
        return self.head(torch.cat([self.c(x).flatten(1), torch.tanh(self.c(x * 0.5)).flatten(1)], 1))


class _Conv3d(nn.Module):
    """No handler of its own: torch.func."""

    def __init__(self):
        super().__init__()
        self.c, self.head = nn.Conv3d(2, 3, 2), nn.Linear(3 * 27, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.c(x)).flatten(1))


class _Seq2Seq(nn.Module):
    """An encoder RNN's final state passed as the decoder's initial state (h_n on axis 1, whatever
    batch_first says; an LSTM's a tuple (h, c))."""

    def __init__(self, cell, batch_first=True):
        super().__init__()
        self.enc, self.dec = cell(4, 5, batch_first=batch_first), cell(4, 5, batch_first=batch_first)
        self.head, self.seq = nn.Linear(5, 3), 1 if batch_first else 0

    def forward(self, x):
        _, state = self.enc(x)
        out, _ = self.dec(x.flip(self.seq), state)
        return self.head(out.mean(self.seq))


class _AttentionTimeFirst(nn.Module):
    """(T, B, d) attention with a shared causal attn_mask (L, S) and a per-sample key_padding_mask
    (B, S), whose attention weights also reach the loss."""

    def __init__(self):
        super().__init__()
        self.attn, self.head = nn.MultiheadAttention(8, 2), nn.Linear(8, 3)

    def forward(self, x):
        t = x.shape[0]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
        padding = (x[..., 0] > 0.3).T.clone()
        padding[:, 0] = False
        h, w = self.attn(x, x, x, key_padding_mask=padding, attn_mask=causal)
        return self.head(h.mean(0)) + w.sum((1, 2))[:, None]


class _Checkpointed(nn.Module):
    """A block under activation checkpointing: its layers' forward runs again inside backward (the
    engine's hooks see that call too). Non-reentrant (as recommended): the graph is the first forward's;
    reentrant: the first forward runs under no_grad and backward builds the block's graph anew."""

    def __init__(self, reentrant: bool = False):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6))
        self.head, self.reentrant = nn.Linear(6, 3), reentrant

    def forward(self, x):
        return self.head(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.reentrant))


def _tied_linears():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    model[2].weight = model[0].weight
    return model


def _eval_batchnorm():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2)
    return model.eval()


def _regression():
    return nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 3))


MORE = {
    "Linear called twice": (lambda: _Twice(nn.Linear(4, 5), 10), lambda: torch.randn(6, 4)),
    "Conv2d called twice": (lambda: _Twice(nn.Conv2d(2, 3, 3, padding=1), 96), lambda: torch.randn(6, 2, 4, 4)),
    "wide Conv2d called twice (ghost)": (_ConvTwiceGhost, lambda: torch.randn(6, 16, 4, 4)),
    "LayerNorm called twice": (lambda: _Twice(nn.LayerNorm(4), 8), lambda: torch.randn(6, 4)),
    "GroupNorm called twice": (lambda: _Twice(nn.GroupNorm(2, 4), 8), lambda: torch.randn(6, 4)),
    "Linear on (B, d) and (B, T, d)": (_LinearMixed, lambda: torch.randn(6, 5, 4)),
    "Embedding called twice": (_EmbeddingTwice, lambda: torch.randint(0, 10, (6, 5))),
    "Embedding with scale_grad_by_freq, called twice": (_FrequencyScaled, lambda: torch.randint(0, 4, (6, 5))),
    "attention with key_padding_mask": (_MaskedAttention, lambda: torch.randn(6, 5, 8)),
    "Linear on 4-D input, 2-D LayerNorm": (_Linear4d, lambda: torch.randn(6, 2, 3, 4)),
    "wide MLP (Gram of the factors)": (
        lambda: nn.Sequential(nn.Linear(32, 40), nn.Tanh(), nn.Linear(40, 36), nn.Tanh(), nn.Linear(36, 3)),
        lambda: torch.randn(6, 32),
    ),
    "Conv3d (torch.func)": (_Conv3d, lambda: torch.randn(6, 2, 4, 4, 4)),
    "strided, dilated convs": (tp._StridedCNN, lambda: torch.randn(6, 3, 10, 10)),
    "wide convs (factors kept)": (tp.WideConv, lambda: torch.randn(5, 3, 4, 4)),
    "weights tied across Linears": (_tied_linears, lambda: torch.randn(5, 4)),
    "tied embedding and output layer": (lambda: tp._TiedLM(bias=True), lambda: torch.randint(0, 7, (5, 6))),
    "tied embedding, pooled output": (lambda: tp._TiedLM(bias=True, pooled=True), lambda: torch.randint(0, 7, (5, 6))),
    "frozen weights, trainable biases": (tp._PartlyFrozen, lambda: torch.randn(6, 2, 4, 4)),
    "GRU (torch.func loop)": (lambda: tp._Recurrent(nn.GRU), lambda: torch.randn(6, 5, 4)),
    "LSTM (torch.func)": (lambda: tp._Recurrent(nn.LSTM), lambda: torch.randn(6, 5, 4)),
    "eval-mode BatchNorm": (_eval_batchnorm, lambda: torch.randn(6, 4)),
    "GRU with an initial state (torch.func loop)": (lambda: _Seq2Seq(nn.GRU), lambda: torch.randn(6, 5, 4)),
    "LSTM with an initial (h, c)": (lambda: _Seq2Seq(nn.LSTM), lambda: torch.randn(6, 5, 4)),
    "LSTM (T, B, d) with an initial (h, c)": (lambda: _Seq2Seq(nn.LSTM, False), lambda: torch.randn(5, 6, 4)),
    "attention (T, B, d), masks, T = B": (_AttentionTimeFirst, lambda: torch.randn(6, 6, 8)),
    "attention (T, B, d), masks": (_AttentionTimeFirst, lambda: torch.randn(5, 6, 8)),
    "activation checkpointing (non-reentrant)": (_Checkpointed, lambda: torch.randn(6, 4)),
    # g_i . gbar from the batch gradient autograd computes (LinearHandler.weight_grad_node): mm, in-place
    "Linears without bias, in-place ReLU": (
        lambda: nn.Sequential(nn.Linear(4, 5, bias=False), nn.ReLU(inplace=True), nn.Linear(5, 3, bias=False)),
        lambda: torch.randn(6, 4),
    ),
}
MORE_BATCH_AXIS = {name: 1 for name in MORE if "(T, B, d)" in name}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(MORE))
def test_more_handler_paths_match_the_loop(device, name, reduction):
    build, data = MORE[name]
    torch.manual_seed(0)
    model = build()
    x = data()
    axis = MORE_BATCH_AXIS.get(name, 0)
    classes = 7 if "tied embedding" in name else 2 if "BatchNorm" in name else 3
    y = torch.randint(0, classes, (x.shape[axis],))
    checked = assert_matches_loop(model, x, y, nn.CrossEntropyLoss(reduction=reduction), batch_axis=axis, device=device)
    looped = ["loop over the samples" in w for w in checked.warnings]
    # (on CUDA the replay runs PyTorch's fused GRU cell, cuDNN off, which vmap may batch: no loop then)
    gru_loops = "GRU" in name and torch.device(device).type == "cpu"
    assert looped in (([True],) if gru_loops else ([], [True]) if "GRU" in name else ([],)), checked.warnings


CHUNKED = ["Conv2d called twice", "strided, dilated convs", "wide convs (factors kept)", "grouped cnn"]


@pytest.mark.parametrize("name", [*CHUNKED, "wide Conv2d called twice (ghost)"])
def test_convolutions_reduced_in_chunks_of_examples_match_the_loop(device, name, monkeypatch):
    """A convolution whose per-sample gradients (or, on the ghost path, unfolded patches) exceed
    ``CONV_CHUNK_BYTES`` forms them a chunk of examples at a time for the squared norms and g_i . gbar
    (here the limit is 600 bytes: chunks of one to a few examples, the last one shorter): the same numbers
    as the float64 loop, projections (kept views) included."""
    from cockpit_lite.persample.layers import ConvHandler

    monkeypatch.setattr(views_mod, "CONV_CHUNK_BYTES", {"cpu": 600, "cuda": 600})
    calls: list = []
    for cls, method in ((views_mod.ConvView, "_chunk_stats"), (ConvHandler, "_ghost_rows")):
        original = getattr(cls, method)

        def spy(self, *args, _original=original, _method=method, **kwargs):
            calls.append((_method, kwargs["dot"] if _method == "_chunk_stats" else len(args[0][0])))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, spy)
    build, data = MORE[name] if name in MORE else MODELS[name]
    torch.manual_seed(0)
    model = build()
    x = data()
    x = x[0] if isinstance(x, tuple) else x
    y = torch.randint(0, 3, (x.shape[0],))
    checked = assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), device=device)
    assert not checked.warnings
    if "ghost" in name:  # chunks of fewer examples than the batch, the norms of each added up
        assert calls and all(m == "_ghost_rows" and rows < x.shape[0] for m, rows in calls)
    else:  # both statistics went through the chunks
        assert ("_chunk_stats", True) in calls and ("_chunk_stats", False) in calls


LOSSES = {
    "weighted cross-entropy, ignore_index": (
        lambda r: nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]), ignore_index=-100, reduction=r),
        lambda: torch.tensor([0, 1, 2, -100, 1, 0]),
    ),
    "cross-entropy, label smoothing": (
        lambda r: nn.CrossEntropyLoss(label_smoothing=0.1, reduction=r),
        lambda: _labels(6),
    ),
    "cross-entropy, probability targets": (
        lambda r: nn.CrossEntropyLoss(reduction=r),
        lambda: torch.softmax(torch.randn(6, 3), 1),
    ),
    "MSE": (lambda r: nn.MSELoss(reduction=r), lambda: torch.randn(6, 3)),
    "BCE with logits, pos_weight": (
        lambda r: nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 2.0, 3.0]), reduction=r),
        lambda: torch.rand(6, 3).round(),
    ),
    "Huber": (lambda r: nn.HuberLoss(reduction=r), lambda: 3 * torch.randn(6, 3)),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_split_matches_the_loop(device, name, reduction):
    """g_i = B x example i's share of p.grad for a mean: weighted means and ignored targets included."""
    make_loss, targets = LOSSES[name]
    torch.manual_seed(0)
    model = models.mlp()
    assert_matches_loop(model, torch.randn(6, 6), targets(), make_loss(reduction), device=device)


# --- the harness can fail ----------------------------------------------------------------------------
def _swap_rows(t: torch.Tensor, i: int = 0, j: int = 1) -> torch.Tensor:
    t = t.clone()
    t[[i, j]] = t[[j, i]]
    return t


def _layernorm_mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))


def _batch():
    torch.manual_seed(0)
    return _layernorm_mlp(), torch.randn(6, 4), _labels(6)


def test_a_wrong_split_that_adds_up_is_caught(device, monkeypatch):
    """Two samples' per-sample gradients of the LayerNorm swapped: the gradient-sum check cannot see
    it (the sum is unchanged), the harness names the parameters and quantities."""
    original = views_mod.MaterialisedView.__init__

    def swapped(self, grads):
        original(self, {n: _swap_rows(g) if n.startswith("1.") else g for n, g in grads.items()})

    model, x, y = _batch()
    monkeypatch.setattr(views_mod.MaterialisedView, "__init__", swapped)
    with pytest.raises(AssertionError) as err:
        assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), device=device)
    msg = str(err.value)
    assert "||g_i||^2 of 1.weight" in msg and "||g_i||^2 of 1.bias" in msg
    assert "g_i . v0/1.weight" in msg and "g_i . v0 (all parameters)" in msg
    assert "of 0.weight" not in msg and "of 3.weight" not in msg and "v0/0.weight" not in msg
    assert "reference" not in msg  # the loop itself still adds up to p.grad


def test_wrong_squared_norms_of_one_layer_are_caught(device, monkeypatch):
    original = views_mod.FactorView.sq_norms

    def swapped(self):
        return {n: _swap_rows(v, 2, 4) if n == "3.weight" else v for n, v in original(self).items()}

    model, x, y = _batch()
    monkeypatch.setattr(views_mod.FactorView, "sq_norms", swapped)
    with pytest.raises(AssertionError, match=r"\|\|g_i\|\|\^2 of 3\.weight: .* at sample (2|4)") as err:
        assert_matches_loop(model, x, y, nn.CrossEntropyLoss(reduction="sum"), device=device)
    assert "3.bias" not in str(err.value) and "g_i . gbar" not in str(err.value)


def test_wrong_dot_with_the_mean_is_caught_and_localised(device, monkeypatch):
    """The record holds g_i . gbar summed over parameters: the harness reruns per module to name it."""
    original = views_mod.FactorView.dot_mean

    def off(self):
        out = original(self)
        return out * 1.001 if self.w == "0.weight" else out

    model, x, y = _batch()
    monkeypatch.setattr(views_mod.FactorView, "dot_mean", off)
    with pytest.raises(AssertionError) as err:
        assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), device=device)
    msg = str(err.value)
    assert "g_i . gbar (all parameters)" in msg
    assert "per module: g_i . gbar of 0.weight+0.bias" in msg and "of 3.weight+3.bias" not in msg


def test_wrong_projection_of_one_parameter_is_caught(device, monkeypatch):
    original = views_mod.FactorView.project_many

    def swapped(self, directions):
        out = original(self, directions)
        return {k: _swap_rows(v) if k.endswith("/3.bias") else v for k, v in out.items()}

    model, x, y = _batch()
    monkeypatch.setattr(views_mod.FactorView, "project_many", swapped)
    with pytest.raises(AssertionError) as err:
        assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), device=device)
    failed = [line.split(":")[0].strip() for line in str(err.value).splitlines()[1:]]
    assert failed == ["g_i . v0/3.bias", "g_i . v1/3.bias", "g_i . v2/3.bias"]


class _Centred(nn.Module):
    """Subtracts the batch mean: its examples are coupled, so no per-sample split exists."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        return h - h.mean(0, keepdim=True)


def test_the_harness_refuses_a_model_that_couples_its_examples(device):
    torch.manual_seed(0)
    with pytest.raises(AssertionError, match="couples its examples in the forward"):
        assert_matches_loop(_Centred(), torch.randn(6, 4), _labels(6), nn.CrossEntropyLoss(), device=device)


def test_missing_numbers_are_a_failure(device, monkeypatch):
    """A step the engine refuses (a (T, B, d) activation with T == B that the shape probe does not
    resolve: here it is switched off) fails with the cockpit's note."""
    monkeypatch.setattr(PerSampleEngine, "resolve_axes", lambda self, *args: "switched off by the test")
    torch.manual_seed(0)
    model = models.TinyTransformer(batch_first=False)
    x, y = models.token_batch(b=6, t=6)
    with pytest.raises(AssertionError, match=r"(?s)gave no value.*ambiguous"):
        assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), device=device)


def test_embedding_bag_with_scale_grad_by_freq_is_refused(device):
    """torch's EmbeddingBag backward divides rows by counts that are not their batch counts: no numbers,
    a warning that says so, the rest of the step kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(10, 4, scale_grad_by_freq=True), nn.Linear(4, 3))
    x = torch.randint(0, 4, (6, 3))
    with pytest.raises(AssertionError, match=r"(?s)gave no value.*EmbeddingBag\(scale_grad_by_freq=True\)"):
        assert_matches_loop(model, x, _labels(6), nn.CrossEntropyLoss(), device=device)
    p = torch.zeros(10, 1, requires_grad=True)  # the torch behaviour the message states, as it stands
    out = nn.functional.embedding_bag(torch.tensor([[5, 4, 4, 7]]), p, scale_grad_by_freq=True, mode="sum")
    (g,) = torch.autograd.grad(out.sum(), p)
    assert g[[4, 5, 7], 0].tolist() == [1.0, 0.5, 1.0]


def test_only_the_parameters_the_optimizer_holds(device):
    """An optimizer for the head alone: the cockpit covers those parameters, and so does the harness."""
    torch.manual_seed(0)
    model = models.mlp()
    x, y = torch.randn(7, 6), _labels(7)
    checked = assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), params=model[4].parameters(), device=device)
    assert set(checked.reference) == set(checked.record.per_sample_sq_norms_by_param) == {"4.weight", "4.bias"}


def _backward_per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, D) float64 g_i by one ``backward()`` per example (reentrant checkpointing takes no ``autograd.grad``)."""
    grads = []
    for i in range(len(x)):
        model.zero_grad()
        xi = x[i : i + 1].detach().clone().requires_grad_(True)
        nn.functional.cross_entropy(model(xi), y[i : i + 1], reduction="sum").backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(grads)


def test_reentrant_activation_checkpointing_matches_a_loop_of_backward_calls():
    """``checkpoint(..., use_reentrant=True)`` (no ``autograd.grad`` through it, so not the harness):
    ||g_i||^2 and g_i . gbar against one ``backward()`` per example in float64."""
    import numpy as np

    from cockpit_lite import Cockpit
    from tests.reference import Probe

    torch.manual_seed(0)
    model = _Checkpointed(reentrant=True).double()
    x, y = torch.randn(5, 4, dtype=torch.float64, requires_grad=True), torch.randint(0, 3, (5,))
    loss_fn, opt = nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.0)
    probe = Probe(flags={"per_sample_sq_norms", "per_sample_dot_mean"})
    with Cockpit(model, opt, loss_fn, instruments=[probe], sinks=[]):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    g = _backward_per_example(model, x, y)
    rec = probe.records[0]
    np.testing.assert_allclose(rec.per_sample_sq_norms, (g**2).sum(1).numpy(), rtol=1e-10)
    np.testing.assert_allclose(rec.per_sample_dot_mean, (g @ g.mean(0)).numpy(), rtol=1e-10)


def test_reentrant_checkpointing_under_gradscaler_keeps_the_loss_scale():
    """Reentrant checkpointing calls backward on the recomputed block inside the loop's backward. That inner call
    is part of the loop's pass, not one of its own: before, it was taken for a new backward started from an
    unscaled root, so GradScaler's scale was lost for the rest of the pass (the gradient-sum check warned with a
    ratio of 1/scale^2, the norm after backward was scale times too large) and the loss provider took the
    loop's root for another network's. Per-sample norms against one backward per example in float64, the norm
    after backward against ||p.grad|| / scale, no warning."""
    import warnings

    import numpy as np
    from cockpit_lite.instruments import Clipping, Loss, PerSampleGradNorms

    from cockpit_lite import Cockpit

    torch.manual_seed(0)
    model = _Checkpointed(reentrant=True).double()
    x, y = torch.randn(5, 4, dtype=torch.float64, requires_grad=True), torch.randint(0, 3, (5,))
    g = _backward_per_example(model, x, y)
    loss_fn, opt = nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    instruments = [Loss(), PerSampleGradNorms(), Clipping(max_norm=1e6, kinds="global")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Cockpit(model, opt, loss_fn, instruments=instruments, sinks=[]) as cockpit:
            model.zero_grad()
            loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    h = cockpit.history
    np.testing.assert_allclose(h.last("persample/grad_norm"), g.norm(dim=1).numpy(), rtol=1e-10)
    assert h.last("clip/global/norm") == pytest.approx(float(g.mean(0).norm()), rel=1e-10)
    assert h.last("loss") == pytest.approx(float(loss), rel=1e-12)
    assert not [w for w in caught if "cockpit-lite" in str(w.message)]
