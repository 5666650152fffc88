"""Tensors broadcast over the batch (cockpit_lite/persample/broadcast.py): the split rule against
autograd per example, every consumer and layout op the engine follows through the exactness harness,
and a clear refusal (never a silently wrong number) where it cannot split."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from cockpit_lite import Cockpit, Need
from cockpit_lite.persample import layers
from cockpit_lite.persample.broadcast import per_example
from cockpit_lite.persample.engine import PerSampleEngine
from tests import models_lm as M
from tests.harness import assert_matches_loop
from tests.test_persample import Probe


# --- the split rule ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,y_shape,axis",
    [
        ((6, 4), (3, 6, 4), 0),  # wpe(arange(T)) + tokens
        ((1, 6, 4), (3, 6, 4), 0),  # (1, T) position ids
        ((4,), (3, 6, 4), 0),  # a bias
        ((6, 1, 4), (6, 3, 4), 1),  # (T, B, d) layout
        ((1, 1, 4), (3, 1, 4), 0),  # cls_token.expand(B, 1, d)
        ((5, 5), (5, 5, 5), 0),  # T == B: the axis where the tensor has size 1
    ],
)
def test_per_example_shares_match_autograd_per_example(shape, y_shape, axis):
    """Example i's share of dL/du for y = x + u (u broadcast) is d <G_i, y_i> / du by autograd."""
    torch.manual_seed(0)
    u = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x = torch.randn(y_shape, dtype=torch.float64)
    g = torch.randn(y_shape, dtype=torch.float64)
    y = x + u
    batch = y_shape[axis]
    rows = [(y.narrow(axis, i, 1) * g.narrow(axis, i, 1)).sum() for i in range(batch)]
    want = torch.stack([torch.autograd.grad(r, u, retain_graph=True)[0] for r in rows])
    got = per_example(g, shape, batch)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert torch.allclose(got.sum(0), torch.autograd.grad((y * g).sum(), u)[0])


def test_per_example_refuses_what_it_cannot_split():
    assert "along 2 axes of the batch size 4" in per_example(torch.ones(4, 4, 3), (3,), 4)
    assert "along no axis of the batch size 5" in per_example(torch.ones(4, 6, 3), (6, 3), 5)
    assert "does not broadcast" in per_example(torch.ones(4, 6, 3), (5, 3), 4)
    assert torch.equal(per_example(torch.full((1, 6, 3), 2.0), (6, 3), 1), torch.full((1, 6, 3), 2.0))


# --- consumers and layout ops, through the harness ----------------------------------------------------
class _Tokens(nn.Module):
    """Token embeddings (B, T, d) with a positional term, pooled into class logits. ``how`` says how the
    position term reaches the batch: a bare parameter or an Embedding looked up with shared positions,
    through an op with or without layout ops in between."""

    def __init__(self, how: str, t: int = 6, d: int = 4, vocab: int = 9, classes: int = 3):
        super().__init__()
        self.how = how
        self.tok = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(t, d)
        self.pos = nn.Parameter(torch.randn(t, d))
        self.pos_dt = nn.Parameter(torch.randn(d, t))  # stored transposed
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.table = nn.Parameter(torch.randn(1, t + 2, d))
        self.head = nn.Linear(d, classes)

    def forward(self, idx):
        b, t = idx.shape
        h = self.tok(idx)
        positions = torch.arange(t, device=idx.device)
        if self.how == "add alpha":
            h = torch.add(h, self.wpe(positions), alpha=0.5)
        elif self.how == "sub":
            h = h - self.pos
        elif self.how == "sub alpha":
            h = torch.sub(h, self.pos, alpha=2.0)
        elif self.how == "mul":
            h = h * self.scale
        elif self.how == "unsqueeze":
            h = h + self.wpe(positions).unsqueeze(0)
        elif self.how == "view then add":
            h = self.wpe(positions[None]).view(1, t, -1) + h
        elif self.how == "transpose":
            h = h + self.pos_dt.t()
        elif self.how == "permute":
            h = h + self.pos_dt.permute(1, 0)
        elif self.how == "cast":
            h = h + self.pos.double().to(h.dtype)
        elif self.how == "clone":
            h = h + self.pos.clone()
        elif self.how == "slice":  # minGPT's pos_emb[:, :t, :]
            h = h + self.table[:, :t, :]
        elif self.how == "slice from the end":
            h = h + self.table[:, -t:]
        elif self.how == "select":
            h = h + self.table[0, 1 : t + 1]
        elif self.how == "twice":
            p = self.wpe(positions)
            h = h + p
            h = torch.tanh(h) * p
        elif self.how == "cls":
            h = torch.cat([self.cls.expand(b, -1, -1), h], 1) * self.scale
        elif self.how == "seq first":  # (T, B, d) activations
            h = h.transpose(0, 1) + self.wpe(positions[:, None])
            h = h.transpose(0, 1)
        elif self.how.startswith("where"):  # a condition selects the term or a constant (T5's causal bias, sdpa)
            even = (positions % 2 == 0)[:, None]  # (T, 1): shared by the batch
            rows = (idx > 3)[..., None]  # (B, T, 1): the batch's own (a padding mask)
            if self.how == "where":
                h = h + torch.where(even, self.wpe(positions), -1.0)
            elif self.how == "where, constant first":
                h = h + torch.where(even, -1.0, self.wpe(positions))
            elif self.how == "where after a layout op":
                h = h + torch.where(even, self.pos_dt.t(), 0.5)
            elif self.how == "where broadcasting":  # (d,) selected into (T, d)
                h = h + torch.where(even & (torch.arange(h.shape[-1], device=idx.device) > 0), self.scale, 0.0)
            elif self.how == "where with the batch's condition":  # the batch met at the selection itself
                h = h * torch.where(rows, self.wpe(positions), 0.5)
            elif self.how == "where with the batch's condition after a layout op":
                h = h * torch.where(rows, self.pos_dt.t(), 0.5)
        elif self.how.startswith("repeat"):  # tiled over the batch beside example-major rows (DeBERTa's positions)
            u = self.pos if self.how == "repeat" else self.pos_dt.t()
            h = (h.reshape(b * t, -1) * u.repeat(b, 1)).reshape(b, t, -1)
        return self.head(torch.tanh(h).mean(1))


CONSUMERS = [
    "add alpha", "sub", "sub alpha", "mul", "unsqueeze", "view then add", "transpose", "permute", "cast",
    "clone", "slice", "slice from the end", "select", "twice", "cls", "seq first", "where", "where, constant first",
    "where after a layout op", "where broadcasting", "where with the batch's condition",
    "where with the batch's condition after a layout op", "repeat", "repeat after a layout op",
]  # fmt: skip


def _used(model: nn.Module, x) -> list[nn.Parameter]:
    """The parameters this forward uses (the others get no gradient and are not covered)."""
    model.zero_grad()
    model(x).sum().backward()
    used = [p for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return used


@pytest.mark.parametrize("how", CONSUMERS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_consumers_and_layout_ops(device, how, reduction):
    torch.manual_seed(0)
    model = _Tokens(how)
    x, y = torch.randint(0, 9, (5, 6)), torch.randint(0, 3, (5,))
    checked = assert_matches_loop(
        model, x, y, nn.CrossEntropyLoss(reduction=reduction), params=_used(model, x), device=device
    )
    assert not checked.warnings


class _FeatureGain(nn.Module):
    """A gain per feature looked up from an Embedding with arange(d): shared by the batch, of shape
    (d, 1), which has an axis of the batch size when d == B."""

    def __init__(self, d: int):
        super().__init__()
        self.lin, self.gain, self.head = nn.Linear(3, d), nn.Embedding(d, 1), nn.Linear(d, 3)

    def forward(self, x):
        g = self.gain(torch.arange(self.gain.num_embeddings, device=x.device)).squeeze(-1)
        return self.head(torch.tanh(self.lin(x)) * g)


@pytest.mark.parametrize("d", [4, 6])
def test_a_lookup_with_an_axis_of_the_batch_size_is_never_taken_for_the_batch(device, d):
    """The lookup's consumer broadcasts it along the batch axis, which decides: split exactly, also
    with d == B, where the lookup expanded over the batch has two axes of size B and its sample axis is
    the one the expansion added (before, its rows were taken for the samples: silently wrong)."""
    torch.manual_seed(0)
    model = _FeatureGain(d)
    x, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), device=device)


class _Net(nn.Module):
    """A module with children holding a bare parameter ``w`` used by ``use``."""

    def __init__(self, use: str, dropout: float = 0.0):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(4, 4) / 2 if use == "matmul" else torch.randn(4))
        self.drop = nn.Dropout(dropout)
        self.use = use

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        if self.use == "matmul":
            h = h @ self.w
        else:
            h = h + self.w
        return self.drop(h)[:, :3]


def _warns(model, x, y, loss_fn=None, device="cpu") -> list[str]:
    """One step on ``device`` (model and data moved there): the record and the warnings."""
    model.to(device)
    x, y = x.to(device), y.to(device)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    probe = Probe(flags={Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_SQ_NORMS_BY_PARAM})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Cockpit(model, opt, loss_fn, instruments=[probe]):
            loss_fn(model(x), y).backward()
            opt.step()
    return probe.records[0], [str(w.message) for w in caught]


def test_a_bare_parameter_in_an_unknown_op_falls_back_to_torch_func_with_a_warning(device):
    torch.manual_seed(0)
    model = _Net("matmul")
    assert isinstance(layers.build_handlers(model)[model], layers.BareParamsHandler)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    checked = assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), device=device)
    fallback = [w for w in checked.warnings if "torch.func over the forward of _Net" in w]
    assert len(fallback) == 1 and "parameter w is used by Mm" in fallback[0]


def test_the_fallback_is_refused_while_dropout_is_active():
    torch.manual_seed(0)
    rec, seen = _warns(_Net("matmul", dropout=0.3), torch.randn(6, 4), torch.randint(0, 3, (6,)))
    assert "w" in rec.per_sample_uncovered and "w" not in rec.per_sample_sq_norms_by_param  # left out, said
    assert any("would draw other dropout masks" in w for w in seen)
    # a bare parameter that meets the batch in an add needs no recomputation: dropout is fine there
    torch.manual_seed(0)
    model = _Net("add", dropout=0.3)
    assert_matches_loop(model, torch.randn(6, 4), torch.randint(0, 3, (6,)), nn.CrossEntropyLoss())


class _PlainAndBroadcast(nn.Module):
    """A position lookup both broadcast over the batch and pooled on its own (an unbatched use)."""

    def __init__(self):
        super().__init__()
        self.tok, self.wpe, self.head = nn.Embedding(9, 4), nn.Embedding(6, 4), nn.Linear(4, 3)

    def forward(self, idx):
        p = self.wpe(torch.arange(idx.shape[1], device=idx.device))
        return self.head(torch.tanh(self.tok(idx) + p).mean(1) + torch.tanh(p).mean(0))


def test_a_tensor_used_both_broadcast_and_not_is_refused_with_a_note(device):
    torch.manual_seed(0)
    rec, seen = _warns(_PlainAndBroadcast(), torch.randint(0, 9, (5, 6)), torch.randint(0, 3, (5,)), device=device)
    assert rec.per_sample_sq_norms is None
    assert any("is broadcast over the batch but also used by Tanh" in w and "wpe.weight" in w for w in seen)


class _Leaky(nn.Module):
    """Keeps its position lookup for a term the loop adds outside the model (and the loss module)."""

    def __init__(self):
        super().__init__()
        self.tok, self.wpe, self.head = nn.Embedding(9, 4), nn.Embedding(6, 4), nn.Linear(4, 3)

    def forward(self, idx):
        self.p = self.wpe(torch.arange(idx.shape[1], device=idx.device))
        return self.head(torch.tanh(self.tok(idx) + self.p).mean(1))


def test_shares_that_do_not_add_up_are_refused_with_a_note(device):
    torch.manual_seed(0)
    model, loss_fn = _Leaky().to(device), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    probe = Probe(flags={Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_SQ_NORMS_BY_PARAM})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Cockpit(model, opt, loss_fn, instruments=[probe]):
            x, y = torch.randint(0, 9, (5, 6)).to(device), torch.randint(0, 3, (5,)).to(device)
            (loss_fn(model(x), y) + model.p.square().sum()).backward()
            opt.step()
    assert probe.records[0].per_sample_sq_norms is None
    assert any("do not add up to the gradient autograd summed" in str(w.message) for w in caught)


def test_scale_grad_by_freq_with_shared_positions_is_refused(device):
    torch.manual_seed(0)
    model = _Tokens("unsqueeze")
    model.wpe.scale_grad_by_freq = True
    rec, seen = _warns(model, torch.randint(0, 9, (5, 6)), torch.randint(0, 3, (5,)), device=device)
    assert rec.per_sample_sq_norms is None and any("scale_grad_by_freq" in w for w in seen)


def test_bert_mlm_bias_is_the_decoders_not_a_bare_parameter():
    """BERT ties cls.predictions.bias to decoder.bias: one parameter, served once, by the decoder."""
    model = M.hf_bert()
    handlers = layers.build_handlers(model)
    head = model.cls.predictions
    assert head not in handlers and handlers[head.decoder].names["bias"] == "cls.predictions.bias"


def test_tracin_probe_of_a_model_with_shared_positions(device):
    """engine.probe (TracIn's probe batch) splits the position embedding too: its per-example
    gradients against autograd per example (losses as batches of one)."""
    torch.manual_seed(0)
    model = M.LogitsForLoss(M.NanoGPT()).to(device)
    loss_fn = nn.CrossEntropyLoss()
    x, y = (t.to(device) for t in M.token_batch(3, 8))
    engine = PerSampleEngine(model, attach=False)
    views, losses = engine.probe(x, y, loss_fn)
    got = views[("net.transformer.wpe.weight",)].grads()["net.transformer.wpe.weight"]
    for k in range(3):
        want = torch.autograd.grad(loss_fn(model(x[k : k + 1]), y[k : k + 1]), model.net.transformer.wpe.weight)[0]
        assert torch.allclose(got[k], want, rtol=1e-4, atol=1e-6)
    engine.close()


def test_models_without_candidates_walk_nothing(monkeypatch):
    """An MLP has no embedding and no output without the batch axis: the graph is not walked."""
    from cockpit_lite.persample import broadcast

    walked = []
    monkeypatch.setattr(broadcast.BroadcastTracker, "walk", lambda self, out: walked.append(1))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    rec, _ = _warns(model, torch.randn(6, 4), torch.randint(0, 3, (6,)))
    assert rec.per_sample_sq_norms is not None and not walked


def test_a_failure_inside_a_backward_hook_never_breaks_the_backward(device, monkeypatch):
    from cockpit_lite.persample import broadcast

    def boom(t, shape, batch):
        raise RuntimeError("boom")

    monkeypatch.setattr(broadcast, "per_example", boom)
    torch.manual_seed(0)
    model = _Tokens("sub")
    rec, seen = _warns(model, torch.randint(0, 9, (5, 6)), torch.randint(0, 3, (5,)), device=device)
    assert rec.per_sample_sq_norms is None and rec.loss is not None
    assert any("broadcast over the batch: boom" in w for w in seen)
    assert all(p.grad is not None for p in (model.pos, model.tok.weight, model.head.weight))


class _T5LastLogits(nn.Module):
    """transformers' T5 (random weights, tiny) under SDPA: the logits of the last of three decoder positions."""

    def __init__(self):
        super().__init__()
        from transformers import T5Config, T5ForConditionalGeneration

        cfg = T5Config(
            vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=2, num_heads=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
            pad_token_id=1, eos_token_id=2, decoder_start_token_id=1, attn_implementation="sdpa",
        )  # fmt: skip
        self.m = T5ForConditionalGeneration(cfg)
        self.register_buffer("dec", torch.tensor([[1, 7, 12]]))

    def forward(self, x):
        return self.m(input_ids=x, decoder_input_ids=self.dec.expand(x.shape[0], -1)).logits[:, -1]


def test_t5_relative_bias_under_sdpa_with_a_causal_mask_is_split(device):
    """T5's decoder puts its relative position bias under the causal mask by ``torch.where`` (transformers'
    SDPA path) before it meets the batch inside attention: followed through the selection, the decoder's
    table is served, exact against the float64 loop (it was left out)."""
    torch.manual_seed(0)
    model = _T5LastLogits()
    assert model.m.config._attn_implementation == "sdpa"
    x, y = torch.randint(3, 32, (4, 8)), torch.randint(0, 32, (4,))
    checked = assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), device=device)
    assert "m.decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in (
        checked.record.per_sample_sq_norms_by_param
    )
    assert not checked.warnings, checked.warnings


def _deberta_v2() -> nn.Module:
    """transformers' DeBERTa-v2 (random weights, tiny: two layers, relative attention both ways), its logits."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    cfg = DebertaV2Config(
        vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=8,
        position_buckets=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
        type_vocab_size=0, share_att_key=False,
    )  # fmt: skip
    return M.LogitsForLoss(DebertaV2ForSequenceClassification(cfg))


def test_deberta_v2_relative_position_projections_are_split(device):
    """DeBERTa-v2 (and v3, the same code) tiles its relative position projections over the batch by
    ``repeat`` beside its (B h, T, d) queries: split there, pos_query_proj and pos_key_proj are served, exact
    against the float64 loop (they were left out). The relative embedding table itself is left to its own
    test (it is used by the encoder's forward directly)."""
    torch.manual_seed(0)
    model = _deberta_v2()
    params = [p for n, p in model.named_parameters() if "rel_embeddings" not in n]
    x, y = torch.randint(3, 32, (4, 6)), torch.randint(0, 3, (4,))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not hold them")
        checked = assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), params=params, device=device)
    served = checked.record.per_sample_sq_norms_by_param
    assert {"net.deberta.encoder.layer.1.attention.self.pos_key_proj.weight"} <= set(served)
    assert "net.deberta.encoder.layer.0.attention.self.pos_query_proj.bias" in served


def test_deberta_v2_whole_after_a_step_its_encoder_outputs_copied(device):
    """Every parameter of DeBERTa-v2 after one step: its relative embedding table, which the encoder's
    forward uses itself, is served from the second step by torch.func over the encoder. The encoder returns
    every layer's hidden states in a ModelOutput, each computed from the one before: its outputs are handed
    downstream as copies, so that each one's gradient is only what reaches it from outside the encoder (it was
    counted again through the layers after it: the sum of the per-sample gradients 2.8 times too large, said
    by the gradient-sum check). Exact against the float64 loop."""
    torch.manual_seed(0)
    model = _deberta_v2()
    x, y = torch.randint(3, 32, (4, 6)), torch.randint(0, 3, (4,))
    checked = assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), warmup=1, device=device)
    assert "net.deberta.encoder.rel_embeddings.weight" in checked.record.per_sample_sq_norms_by_param


class _PositionsScaledInPlace(nn.Module):
    """DeBERTa-v1's position-to-content path: a projection of a position table shared by the batch, viewed as
    heads and divided in place (``pos /= sqrt(d)``: a CopySlices node and an as_strided view after it), then met
    by the batch's keys in a broadcasting matmul. ``part``: only some positions scaled in place (a CopySlices
    over part of the tensor)."""

    def __init__(self, part: bool = False):
        super().__init__()
        self.part = part
        self.table = nn.Embedding(6, 8)
        self.pos, self.key, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(5 * 6 * 2, 3)

    def forward(self, x):  # x (B, 5, 8)
        pq = self.pos(self.table.weight.unsqueeze(0)).view(1, 6, 2, 4).permute(0, 2, 1, 3)  # (1, h, P, d)
        if self.part:
            pq[:, :, 1:4] *= 3.0
        else:
            pq /= torch.sqrt(torch.tensor(4.0))
        k = self.key(x).view(x.shape[0], 5, 2, 4).permute(0, 2, 1, 3)  # (B, h, T, d)
        return self.head(torch.matmul(k, pq.transpose(-1, -2)).reshape(x.shape[0], -1))


def test_a_shared_projection_scaled_in_place_on_a_view_is_split(device):
    """The layer's output is handed downstream as a copy (the in-place op would rebase the node the broadcast
    walk starts from), and the CopySlices and as_strided nodes the op leaves are followed, each example's share
    through the node itself: the projection is served, exact against the float64 loop (it was left out: its
    output not split where it met the batch)."""
    torch.manual_seed(0)
    model = _PositionsScaledInPlace()
    x, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
    checked = assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), warmup=1, device=device)
    assert {"pos.weight", "pos.bias", "table.weight"} <= set(checked.record.per_sample_sq_norms_by_param)


def test_part_of_a_shared_projection_scaled_in_place_is_left_out_with_the_reason(device):
    """An in-place op on part of the tensor leaves a CopySlices node with a second input (the region's own
    history): not followed. The projection is left out with the reason, every other parameter exact."""
    from tests.test_outside_uses import _assert_exact, _steps

    torch.manual_seed(0)
    model = _PositionsScaledInPlace(part=True)
    x, y = torch.randn(5, 5, 8), torch.randint(0, 3, (5,))
    said, records = _steps(model, x, y, steps=2, device=device)
    reason = "not split where it meets the batch"
    assert any("leave out Linear (pos.bias, pos.weight)" in w and reason in w for w in said), said
    for record in records[1:]:  # (the table, read by the model itself, is served from the second step)
        assert set(record.per_sample_uncovered) == {"pos.weight", "pos.bias"}, record.per_sample_uncovered
        _assert_exact(model, x, y, record, ["table.weight", "key.weight", "key.bias", "head.weight", "head.bias"])


def test_deberta_v1_position_query_projection_is_split(device):
    """transformers' DeBERTa (v1): ``pos_q_proj``'s heads are divided in place before the batch meets them; served
    (with every other parameter: its relative embedding table from the second step), exact against the loop."""
    from transformers import DebertaConfig, DebertaForSequenceClassification

    cfg = DebertaConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=8,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3, type_vocab_size=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = M.LogitsForLoss(DebertaForSequenceClassification(cfg))
    x, y = torch.randint(3, 32, (4, 6)), torch.randint(0, 3, (4,))
    checked = assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), warmup=1, device=device)
    served = checked.record.per_sample_sq_norms_by_param
    assert "net.deberta.encoder.layer.0.attention.self.pos_q_proj.weight" in served
    assert "net.deberta.encoder.rel_embeddings.weight" in served


def test_only_views_the_batch_shares_are_copied(monkeypatch, device):
    """The copy is for a product's view the batch shares (a table with a leading axis of 1); a (B k, N, C) call,
    the batch's own rows (Swin's windows), is not copied every step. Both stay exact."""
    import cockpit_lite.persample.engine as engine_mod

    copied = []
    keep = engine_mod._outside_copy
    monkeypatch.setattr(engine_mod, "_outside_copy", lambda t: copied.append(tuple(t.shape)) or keep(t))

    class Windows(nn.Module):  # (B, 3 k, 8) -> (B k, 3, 8): each example's windows (no axis of size B), a Linear
        def __init__(self):
            super().__init__()
            self.proj, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            w = self.proj(x.reshape(-1, 3, 8))
            return self.head(w.reshape(x.shape[0], -1, 8).mean(1))

    torch.manual_seed(0)
    x, y = torch.randn(4, 6, 8), torch.randint(0, 3, (4,))
    assert_matches_loop(Windows(), x, y, nn.CrossEntropyLoss(), device=device)
    assert copied == []
    x = torch.randn(4, 5, 8)
    assert_matches_loop(_PositionsScaledInPlace(), x, y, nn.CrossEntropyLoss(), warmup=1, device=device)
    assert copied and set(copied) == {(1, 6, 8)}


def test_through_node_batches_each_examples_share_and_falls_back_to_a_loop(monkeypatch, device):
    """``through_node``: each example's share through a CopySlices and an as_strided node equals the node called
    on that share alone, and their sum the node called on the summed gradient (a backward is linear in it); the
    same where vmap fails (the loop)."""
    from cockpit_lite.persample import broadcast

    lin = nn.Linear(8, 8).to(device)
    out = lin(torch.randn(1, 6, 8, device=device)).clone()
    view = out.view(1, 6, 2, 4).permute(0, 2, 1, 3)
    view /= 2.0
    strided = view.grad_fn
    copies = strided.next_functions[0][0]
    assert (strided.name(), copies.name()) == ("AsStridedBackward0", "torch::autograd::CopySlices")
    shares = torch.randn(5, 1, 2, 6, 4, device=device)
    want = torch.stack([copies(strided(s))[0] for s in shares])
    calls = []
    vmap = torch.vmap
    monkeypatch.setattr(torch, "vmap", lambda fn: calls.append(fn) or vmap(fn))
    got = broadcast.through_node(copies, broadcast.through_node(strided, shares))
    assert len(calls) == 2 and torch.equal(got, want)
    torch.testing.assert_close(got.sum(0), copies(strided(shares.sum(0)))[0])
    monkeypatch.setattr(torch, "vmap", lambda fn: (_ for _ in ()).throw(RuntimeError("no batching rule")))
    assert torch.equal(broadcast.through_node(copies, broadcast.through_node(strided, shares)), want)


class _NormedTable(nn.Module):
    """SEW-D's relative positions: a table normalised by a LayerNorm (shared by the batch), then projected by two
    Linear layers whose outputs are tiled over the batch by ``repeat`` beside the (B h, T, d) keys: a chain of
    layers on a shared input. ``c`` adds a bare parameter read by the model itself on the table's path."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(6, 8)
        self.norm, self.pos_q, self.pos_k = nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.key, self.head = nn.Linear(8, 8), nn.Linear(5 * 6 * 2 * 2, 3)

    def forward(self, x):  # x (B, 5, 8)
        b = x.shape[0]
        rel = self.norm(self.table.weight)[:6].unsqueeze(0)  # (1, P, d)
        k = self.key(x).view(b, 5, 2, 4).transpose(1, 2).reshape(b * 2, 5, 4)  # (B h, T, d)
        pq = self.pos_q(rel).view(1, 6, 2, 4).transpose(1, 2).reshape(2, 6, 4).repeat(b, 1, 1)
        pk = self.pos_k(rel).view(1, 6, 2, 4).transpose(1, 2).reshape(2, 6, 4).repeat(b, 1, 1)
        att = torch.cat([torch.bmm(k, pq.transpose(1, 2)), torch.bmm(k, pk.transpose(1, 2))], -1)
        return self.head(att.reshape(b, -1))


def test_a_chain_of_layers_on_a_shared_input_is_split(device):
    """The LayerNorm's output is shared by the batch and meets it only through the two projections: each example's
    share of it comes back from theirs through their products (and the table's, from the second step, through the
    LayerNorm's node). Every parameter served, exact against the float64 loop (the LayerNorm and the table were
    left out: not split where they meet the batch)."""
    torch.manual_seed(0)
    checked = assert_matches_loop(_NormedTable(), torch.randn(4, 5, 8), torch.randint(0, 3, (4,)),
                                  nn.CrossEntropyLoss(), warmup=1, device=device)  # fmt: skip
    assert {"norm.weight", "norm.bias", "table.weight"} <= set(checked.record.per_sample_sq_norms_by_param)


def test_sew_d_relative_table_and_its_layer_norm_are_split(device):
    """transformers' SEW-D (its attention's key projection shared with the positions, relative attention both
    ways): every parameter after one step, its relative table and the LayerNorm on it included, exact."""
    from transformers import SEWDConfig, SEWDForSequenceClassification

    cfg = SEWDConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
        num_labels=3, squeeze_factor=2, position_buckets=8, max_relative_positions=16, share_att_key=True,
        relative_attention=True, pos_att_type=("p2c", "c2p"), hidden_dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = M.LogitsForLoss(SEWDForSequenceClassification(cfg))
    checked = assert_matches_loop(model, torch.randn(4, 400), torch.randint(0, 3, (4,)), nn.CrossEntropyLoss(),
                                  warmup=1, device=device)  # fmt: skip
    served = checked.record.per_sample_sq_norms_by_param
    encoder = "net.sew_d.encoder.encoder"
    assert {f"{encoder}.LayerNorm.weight", f"{encoder}.rel_embeddings.weight"} <= set(served)
