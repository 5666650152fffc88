"""nn.MultiheadAttention and the Transformer layers with their attention dropout in train mode: exact
per-sample gradients of every parameter (persample/layers.py, ``AttentionHandler``).

Reference: no loop over examples can redraw a fused kernel's dropout mask, so the float64 shares of
tests/harness.py are taken on a batch forward started from the same seed as the cockpit's step
(``rng_seed``): example i's share of p.grad is the backward of row i of the output gradient through the
graph of that forward, masks included. That the masks were the same is checked by the harness itself
(the shares must add up to the step's float32 p.grad: the gradient-sum check), and examples are
checked not to interact with the model in eval mode.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cockpit_lite import Cockpit, Need
from cockpit_lite.persample import FactorView, ViewGroup, layers
from cockpit_lite.persample.cross import ViewCollector, cross
from cockpit_lite.registry import preset
from tests.harness import assert_matches_loop, shares_loop
from tests.reference import Probe

SEED = 7  # the step's random stream (dropout masks)
B, T, S, D, H = 6, 5, 7, 8, 2


@pytest.fixture
def replay_only(monkeypatch):
    """Fail if an attention call falls back to torch.func (the replay must serve it)."""

    def fallback(self, *args, **kwargs):
        raise AssertionError(f"{type(self.module).__name__} fell back to torch.func")

    monkeypatch.setattr(layers.FuncHandler, "view", fallback)


def _causal(n: int) -> torch.Tensor:
    return torch.triu(torch.ones(n, n, dtype=torch.bool), 1)


class _Attend(nn.Module):
    """Attention over x (B, T, D) and a memory derived from it (S = T + 2 positions), pooled into 3
    logits; the attention weights, when returned, reach the loss too, and so does the memory."""

    def __init__(self, call, batch_first=True, dropout=0.3, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(D, H, dropout=dropout, batch_first=batch_first, **kw)
        self.mem = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)
        self.call, self.batch_first = call, batch_first

    def forward(self, x):
        mem = torch.tanh(self.mem(torch.cat([x, x[:, :2].flip(2)], 1)))  # (B, S, D)
        extra = 0.1 * mem.mean((1, 2))[:, None]  # the memory reaches the loss whether attended to or not
        if not self.batch_first:
            x, mem = x.transpose(0, 1), mem.transpose(0, 1)
        h, w = self.call(self.attn, x, mem)
        h = h.mean(1 if self.batch_first else 0)
        out = self.head(h) + extra
        if w is not None:
            out = out + w.flatten(1).sum(1, keepdim=True) * 0.1
        return out


def _padding(x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """A per-sample key_padding_mask (B, len) from the data, never masking position 0."""
    keys = x if batch_first else x.transpose(0, 1)
    mask = keys[..., 0] > 0.3
    mask[:, 0] = False
    return mask


def _float_mask(x: torch.Tensor) -> torch.Tensor:
    """A per-sample additive (B * H, T, T) attn_mask computed from the data."""
    s = x[..., :1]
    return (0.3 * s @ s.transpose(1, 2)).repeat_interleave(H, 0)


ATTENTION = {
    "self, need_weights (averaged weights in the loss)": (lambda a, x, m: a(x, x, x), {}),
    "self, per-head weights in the loss": (lambda a, x, m: a(x, x, x, average_attn_weights=False), {}),
    "self, need_weights=False, key_padding_mask": (
        lambda a, x, m: a(x, x, x, key_padding_mask=_padding(x, True), need_weights=False),
        {},
    ),
    "self (T, B, d), key_padding_mask and causal attn_mask, weights in the loss": (
        lambda a, x, m: a(x, x, x, key_padding_mask=_padding(x, False), attn_mask=_causal(x.shape[0])),
        {"batch_first": False},
    ),
    "self, is_causal": (
        lambda a, x, m: a(x, x, x, attn_mask=_causal(x.shape[1]), is_causal=True, need_weights=False),
        {},
    ),
    "self, per-sample float attn_mask (B * H, T, T)": (lambda a, x, m: a(x, x, x, attn_mask=_float_mask(x)), {}),
    "cross, key is value (split in-projection), S != T": (lambda a, x, m: a(x, m, m), {}),
    "cross (T, B, d), key is value, need_weights=False": (
        lambda a, x, m: a(x, m, m, need_weights=False),
        {"batch_first": False},
    ),
    "cross, query, key and value all different": (lambda a, x, m: a(x, m, m * 0.5, need_weights=False), {}),
    "kdim/vdim (separate projection weights), bias_kv, zero_attn": (
        lambda a, x, m: a(x, m[..., :4], m[..., 2:8], key_padding_mask=_padding(m, True)),
        {"kdim": 4, "vdim": 6, "add_bias_kv": True, "add_zero_attn": True},
    ),
    "no biases": (lambda a, x, m: a(x, m, m), {"bias": False}),
}


@pytest.mark.parametrize("name", list(ATTENTION))
def test_attention_with_dropout_matches_the_replayed_loop(name, replay_only):
    call, kw = ATTENTION[name]
    torch.manual_seed(0)
    model = _Attend(call, **kw)
    x, y = torch.randn(B, T, D), torch.randint(0, 3, (B,))
    checked = assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), rng_seed=SEED)
    assert not checked.warnings
    assert {n for n in checked.reference if n.startswith("attn.")} <= set(checked.record.per_sample_sq_norms_by_param)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_attention_dropout_in_the_loss_and_per_sample_differs_from_no_dropout(reduction, replay_only):
    """The masks matter: the same model without its dropout gives other per-sample norms."""
    call, kw = ATTENTION["cross, key is value (split in-projection), S != T"]
    torch.manual_seed(0)
    model = _Attend(call, dropout=0.5, **kw)
    x, y = torch.randn(B, T, D), torch.randint(0, 3, (B,))
    with_dropout = assert_matches_loop(model, x, y, nn.CrossEntropyLoss(reduction=reduction), rng_seed=SEED)
    model.attn.dropout = 0.0
    without = assert_matches_loop(model, x, y, nn.CrossEntropyLoss(reduction=reduction))
    a = with_dropout.record.per_sample_sq_norms_by_param["attn.in_proj_weight"]
    b = without.record.per_sample_sq_norms_by_param["attn.in_proj_weight"]
    assert not np.allclose(a, b, rtol=1e-2)


def _twice(a, x, m):
    """One module called twice per step: self-attention (one packed projection), then cross-attention
    (split projection); the per-sample gradients add up over the calls."""
    h, _ = a(x, x, x, need_weights=False)
    return a(h, m, m)


def test_attention_called_twice_per_step(replay_only):
    torch.manual_seed(0)
    model = _Attend(_twice)
    x, y = torch.randn(B, T, D), torch.randint(0, 3, (B,))
    assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), rng_seed=SEED)


@pytest.mark.parametrize(
    "frozen",
    [
        ("attn.in_proj_weight", "attn.in_proj_bias"),
        ("attn.out_proj.weight",),
        ("attn.in_proj_weight",),  # the bias alone of a projection
        ("attn.q_proj_weight", "attn.bias_k"),
    ],
)
def test_frozen_or_unheld_attention_parameters(frozen, replay_only):
    call, kw = ATTENTION["kdim/vdim (separate projection weights), bias_kv, zero_attn"]
    if "attn.q_proj_weight" not in frozen:
        call, kw = ATTENTION["cross, key is value (split in-projection), S != T"]
    torch.manual_seed(0)
    model = _Attend(call, **kw)
    x, y = torch.randn(B, T, D), torch.randint(0, 3, (B,))
    held = [p for n, p in model.named_parameters() if n not in frozen]
    checked = assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), params=held, rng_seed=SEED)
    assert not set(frozen) & set(checked.record.per_sample_sq_norms_by_param)


def test_the_projections_are_factor_pairs(replay_only):
    """No B x D tensor for the projections: the in-projection is one FactorView whose groups are the
    q, k and v rows when they see different inputs; bias_k/bias_v are materialised (tiny)."""
    views = {}
    original = layers.AttentionHandler._assemble

    def keep(self, parts, extra, batch):
        views["v"] = original(self, parts, extra, batch)
        return views["v"]

    call, kw = ATTENTION["cross, key is value (split in-projection), S != T"]
    torch.manual_seed(0)
    model = _Attend(call, add_bias_kv=True, **kw)
    x, y = torch.randn(B, T, D), torch.randint(0, 3, (B,))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layers.AttentionHandler, "_assemble", keep)
        assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), rng_seed=SEED)
    view = views["v"]
    assert isinstance(view, ViewGroup)
    factors = {v.names: v for v in view.views if isinstance(v, FactorView)}
    inp = factors[("attn.in_proj_weight", "attn.in_proj_bias")]
    assert inp.a.shape == (B, 3, S, D) and inp.e.shape == (B, 3, S, D)  # q (T rows, padded), k, v (S rows)
    assert factors[("attn.out_proj.weight", "attn.out_proj.bias")].a.shape == (B, 1, T, D)
    rest = [v for v in view.views if not isinstance(v, FactorView)]
    assert [set(v.names) for v in rest] == [{"attn.bias_k", "attn.bias_v"}]


# --- Transformer models with their default dropout (0.1 everywhere) -------------------------------------
class LM(nn.Module):
    """Embedding, a 2-layer TransformerEncoder (default dropout 0.1, causal), an LM head over positions:
    logits (B, V, T) for a CrossEntropyLoss with a mean over tokens (per-sample = per sequence)."""

    def __init__(self, vocab=13, d=16, heads=2, layers=2, batch_first=True, dropout=0.1, norm_first=False):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(
            d, heads, dim_feedforward=32, dropout=dropout, batch_first=batch_first, norm_first=norm_first
        )
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        h = self.emb(tokens)
        t = tokens.shape[1]
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.enc(h, mask=nn.Transformer.generate_square_subsequent_mask(t), is_causal=True)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h).transpose(1, 2)


def _tokens(b=B, t=T, vocab=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, vocab, (b, t), generator=g)


@pytest.mark.parametrize(
    "config",
    [{}, {"batch_first": False}, {"norm_first": True}],
    ids=["batch_first", "(T, B, d)", "norm_first"],
)
def test_transformer_encoder_lm_with_default_dropout(config, replay_only):
    torch.manual_seed(0)
    model = LM(**config)
    x, y = _tokens()
    checked = assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), rng_seed=SEED)
    assert not checked.warnings
    assert len(checked.record.per_sample_sq_norms_by_param) == len(list(model.parameters()))


def test_linear_layers_around_the_encoder_layers_dropout_modules(replay_only):
    """dropout, dropout1, dropout2 of nn.TransformerEncoderLayer are modules outside the attention: their
    masks are in the output gradients the Linear hooks capture. Attention dropout off, theirs at 0.5."""
    torch.manual_seed(0)
    model = LM(dropout=0.5)
    for layer in model.enc.layers:
        layer.self_attn.dropout = 0.0
    x, y = _tokens()
    assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), rng_seed=SEED)


class Seq2Seq(nn.Module):
    """A TransformerDecoderLayer (default dropout) over target tokens, attending to a memory made from
    source features: causal self-attention, then cross-attention (key is value) with padding."""

    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.emb, self.src = nn.Embedding(vocab, d), nn.Linear(4, d)
        self.dec = nn.TransformerDecoderLayer(d, 2, 16, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens, src):
        mem = torch.tanh(self.src(src))
        pad = src[..., 0] > 0.5
        pad[:, 0] = False
        t = tokens.shape[1]
        h = self.dec(self.emb(tokens), mem, tgt_mask=_causal(t), memory_key_padding_mask=pad)
        return self.head(h).transpose(1, 2)


def test_transformer_decoder_layer_with_default_dropout(replay_only):
    torch.manual_seed(0)
    model = Seq2Seq()
    tokens, y = _tokens(vocab=11)
    src = torch.randn(B, S, 4)
    checked = assert_matches_loop(model, (tokens, src), y, nn.CrossEntropyLoss(), rng_seed=SEED)
    assert not checked.warnings


def test_the_trajectory_is_bit_identical_with_and_without_the_cockpit():
    """The replay runs inside fork_rng: the user's stream, and so every later mask, is untouched."""
    runs, sq = [], []
    for attach in (False, True):
        torch.manual_seed(0)
        model = LM()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        loss_fn = nn.CrossEntropyLoss()
        probe = Probe(flags={Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_SQ_NORMS_BY_PARAM, Need.PER_SAMPLE_DOT_MEAN})
        cockpit = Cockpit(model, opt, loss_fn, instruments=[*preset("economy"), probe]) if attach else None
        torch.manual_seed(3)
        for k in range(3):
            x, y = _tokens(seed=10 + k)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        if cockpit is not None:
            cockpit.close()
            assert len(cockpit.history["tests/norm"]) == 3
            sq = [r.per_sample_sq_norms for r in probe.records]
        runs.append([p.detach().clone() for p in model.parameters()] + [torch.rand(3)])
    assert len(sq) == 3 and all(s is not None for s in sq)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_an_sdpa_backend_chosen_around_the_forward_only_is_the_replays_too(replay_only):
    """``sdpa_kernel`` around the forward, not the backward: the replay runs under the backends of the
    call (on CPU the math kernel and the flash kernel differ in the last bits, on CUDA in the random
    numbers they draw), else it could not reproduce the call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    call, kw = ATTENTION["cross (T, B, d), key is value, need_weights=False"]
    torch.manual_seed(0)
    model = _Attend(call, dropout=0.0, **kw)
    x, y = torch.randn(B, T, D), torch.randint(0, 3, (B,))
    loss_fn = nn.CrossEntropyLoss()
    names = [n for n, _ in model.named_parameters()]
    with sdpa_kernel(SDPBackend.MATH):
        ref = shares_loop(model, x, y, loss_fn, names)
    probe = Probe(flags={Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_SQ_NORMS_BY_PARAM})
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with Cockpit(model, opt, loss_fn, instruments=[probe]):
        with sdpa_kernel(SDPBackend.MATH):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    got = probe.records[0].per_sample_sq_norms_by_param
    for n in names:
        want = (ref[n].reshape(B, -1) ** 2).sum(1)
        np.testing.assert_allclose(got[n], want, rtol=1e-5, atol=1e-6 * want.max(), err_msg=n)


# --- when the mask cannot be redrawn, no numbers rather than wrong ones ----------------------------------
def test_a_random_draw_between_the_hooks_and_the_dropout_is_refused():
    """A forward pre-hook registered after the cockpit draws random numbers: the replay, started from
    the state saved before that hook, draws another mask. The replay's output is compared with the
    call's on the host, with the step's other values (no wait for the device in backward): the step gets
    a note and no per-sample numbers; from the next step on that attention is left out (its mask cannot
    be redrawn) and the other layers are computed. Never another mask's numbers."""
    torch.manual_seed(0)
    model = LM()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss_fn = nn.CrossEntropyLoss()
    probe = Probe(flags={Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_SQ_NORMS_BY_PARAM})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Cockpit(model, opt, loss_fn, instruments=[probe]):
            handle = model.enc.layers[0].self_attn.register_forward_pre_hook(lambda m, a: torch.rand(1) and None)
            for _ in range(2):
                x, y = _tokens()
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
            handle.remove()
    first, second = probe.records
    assert first.per_sample_sq_norms is None and first.per_sample_sq_norms_by_param is None
    assert any("another output" in n and "dropout mask cannot be redrawn" in n for n in first.notes)
    assert {"enc.layers.0.self_attn.in_proj_weight", "enc.layers.0.self_attn.out_proj.weight"} <= set(
        second.per_sample_uncovered
    )
    assert not set(second.per_sample_uncovered) & set(second.per_sample_sq_norms_by_param)
    text = " ".join(second.notes) + " ".join(str(w.message) for w in caught)
    assert "another output" in text and "dropout mask" in text and "cannot be redrawn" in text


def test_the_harness_catches_a_replay_with_another_mask(monkeypatch):
    """Were the output check absent, a replay from another random state would give wrong numbers, and
    the reference says so (the test above is then what keeps them out)."""
    real = layers._snapshot

    def elsewhere(x, random):
        snap = real(x, random)
        if snap.cpu_rng is not None:
            snap.cpu_rng = torch.Generator().manual_seed(12345).get_state()
        return snap

    monkeypatch.setattr(layers, "_snapshot", elsewhere)
    monkeypatch.setattr(layers.AttentionHandler, "_same_output", staticmethod(lambda r, o: True))
    call, kw = ATTENTION["self, need_weights=False, key_padding_mask"]
    torch.manual_seed(0)
    model = _Attend(call, dropout=0.5, **kw)
    x, y = torch.randn(B, T, D), torch.randint(0, 3, (B,))
    with pytest.raises(AssertionError, match=r"attn\.in_proj_weight"):
        assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), rng_seed=SEED)


class _OwnAttention(nn.MultiheadAttention):
    """A subclass computing one head by hand: no F.multi_head_attention_forward to replay."""

    def forward(self, query, key, value, **kwargs):
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        att = torch.softmax(F.linear(query, wq, bq) @ F.linear(key, wk, bk).transpose(1, 2) / D**0.5, -1)
        att = F.dropout(att, self.dropout, self.training)
        return self.out_proj(att @ F.linear(value, wv, bv)), None


def _own_attention_model():
    torch.manual_seed(0)
    model = _Attend(lambda a, x, m: a(x, m, m))
    model.attn = _OwnAttention(D, H, dropout=0.3, batch_first=True)
    return model


def test_an_attention_without_a_replay_falls_back_to_torch_func_when_nothing_is_random():
    model = _own_attention_model().eval()
    x, y = torch.randn(B, T, D), torch.randint(0, 3, (B,))
    assert isinstance(model.attn, nn.MultiheadAttention)
    checked = assert_matches_loop(model, x, y, nn.CrossEntropyLoss())
    assert "attn.in_proj_weight" in checked.record.per_sample_sq_norms_by_param


def test_an_attention_without_a_replay_is_refused_when_random():
    model = _own_attention_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss_fn = nn.CrossEntropyLoss()
    probe = Probe(flags={Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_SQ_NORMS_BY_PARAM})
    with pytest.warns(RuntimeWarning, match="cannot be redrawn"), Cockpit(model, opt, loss_fn, instruments=[probe]):
        loss_fn(model(torch.randn(B, T, D)), torch.randint(0, 3, (B,))).backward()
        opt.step()
    rec = probe.records[0]
    assert (
        "attn.in_proj_weight" in rec.per_sample_uncovered
        and "attn.in_proj_weight" not in rec.per_sample_sq_norms_by_param
    )


# --- TracIn's probe pass: cross products of a training batch and probes, masks of each pass ----------------
def test_tracin_cross_products_with_attention_dropout(replay_only):
    """The probe session replays its own masks (drawn in its own forward, inside its forked stream):
    g_i . h_k for every parameter against float64 shares of forwards started from the same seeds."""
    torch.manual_seed(0)
    model = LM(layers=1)
    loss_fn = nn.CrossEntropyLoss()
    (xb, yb), (xp, yp) = _tokens(seed=2), _tokens(b=3, seed=4)
    names = [n for n, _ in model.named_parameters()]
    collect = ViewCollector(model)
    torch.manual_seed(SEED)
    left, _ = collect(xb, yb, loss_fn)
    torch.manual_seed(SEED + 1)
    right, _ = collect(xp, yp, loss_fn)
    gb = shares_loop(model, xb, yb, loss_fn, names, rng_seed=SEED)
    gp = shares_loop(model, xp, yp, loss_fn, names, rng_seed=SEED + 1)
    seen = set()
    for key, view in left.items():
        for n, c in cross(view, right[key]).items():
            want = gb[n].reshape(B, -1) @ gp[n].reshape(3, -1).T
            np.testing.assert_allclose(c.double().numpy(), want, rtol=1e-5, atol=1e-6 * np.abs(want).max(), err_msg=n)
            seen.add(n)
    assert seen == set(names)


# --- the same code on every device this machine has (CUDA: the CUDA generator's state is saved) ---------
def test_on_device_against_same_device_shares(device, replay_only):  # device: tests/conftest.py
    """Per-sample squared norms on ``device`` against shares of the same forward on the same device
    (float32 there: masks depend on the device's generator), and the gradient-sum check."""
    torch.manual_seed(0)
    model = LM().to(device)
    loss_fn = nn.CrossEntropyLoss()
    x, y = (t.to(device) for t in _tokens())
    params = dict(model.named_parameters())
    with torch.random.fork_rng(devices=[0] if device == "cuda" else []):
        torch.manual_seed(SEED)
        if device == "cuda":
            torch.cuda.manual_seed(SEED)
        out = model(x)
        (d_out,) = torch.autograd.grad(loss_fn(out, y), out, retain_graph=True)
        want = {n: [] for n in params}
        for i in range(B):
            mask = torch.zeros_like(d_out)
            mask[i] = d_out[i]
            gs = torch.autograd.grad(out, list(params.values()), mask, retain_graph=True)
            for n, g in zip(params, gs, strict=True):
                want[n].append(float((B * g.double()).square().sum()))
    probe = Probe(flags={Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_SQ_NORMS_BY_PARAM})
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Cockpit(model, opt, loss_fn, instruments=[probe]):
            torch.manual_seed(SEED)
            if device == "cuda":
                torch.cuda.manual_seed(SEED)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    got = probe.records[0].per_sample_sq_norms_by_param
    for n in params:
        np.testing.assert_allclose(np.asarray(got[n]), want[n], rtol=2e-4, atol=1e-7 * max(want[n]), err_msg=n)


@pytest.mark.parametrize("backward_inside", [False, True])
def test_bfloat16_autocast(backward_inside, replay_only):
    """The replay runs under the autocast setting of the call (saved by the pre-hook), so it reproduces
    the bfloat16 output bit for bit; numbers match the float64 shares to bfloat16 precision."""
    torch.manual_seed(0)
    model = LM()
    loss_fn = nn.CrossEntropyLoss()
    x, y = _tokens()
    names = [n for n, _ in model.named_parameters()]
    ref = shares_loop(model, x, y, loss_fn, names, rng_seed=SEED)
    g = np.concatenate([ref[n].reshape(B, -1) for n in names], 1)
    opt, probe = torch.optim.SGD(model.parameters(), lr=0.0), Probe()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Cockpit(model, opt, loss_fn, instruments=[probe]) as ck:
            opt.zero_grad()
            torch.manual_seed(SEED)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(model(x), y)
                if backward_inside:
                    loss.backward()
            if not backward_inside:
                loss.backward()
            opt.step()
    rec = probe.records[0]
    assert ck.engine.checks_left == 0
    sq, dots = (g**2).sum(1), g @ g.mean(0)
    np.testing.assert_allclose(rec.per_sample_sq_norms, sq, atol=3e-2 * sq.max())
    np.testing.assert_allclose(rec.per_sample_dot_mean, dots, atol=3e-2 * np.abs(dots).max())
    for n in ("enc.layers.0.self_attn.in_proj_weight", "enc.layers.1.self_attn.out_proj.weight"):
        want = (ref[n].reshape(B, -1) ** 2).sum(1)
        np.testing.assert_allclose(rec.per_sample_sq_norms_by_param[n], want, atol=3e-2 * want.max(), err_msg=n)


def test_an_overflowing_step_replays_as_itself_and_keeps_the_replay():
    """An example whose activations are NaN (an overflowing step): the replay gives NaN where the call
    did, which is the same output; the replay route stays (a NaN step must not send every later step
    to the slower route, or leave a dropout layer out for good), and the next step is computed."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, dropout=0.2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss_fn = nn.CrossEntropyLoss()
    probe = Probe(flags={Need.PER_SAMPLE_SQ_NORMS})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the NaN step's own notes)
        with Cockpit(model, opt, loss_fn, instruments=[probe]) as cockpit:
            for step in range(2):
                x, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
                if step == 0:
                    x[1, 2] = float("nan")
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                if step == 0:  # (as GradScaler skips an overflowing step: the parameters stay finite)
                    opt.zero_grad()
                opt.step()
            handler = cockpit.engine.handlers[model.attn]
    assert handler.no_replay is None
    first, second = probe.records
    assert not any("another output" in n for n in first.notes)
    assert second.per_sample_sq_norms is not None and np.isfinite(second.per_sample_sq_norms).all()
