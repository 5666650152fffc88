"""A layer whose parameters the model's forward also uses outside the layer's calls is left out, on every step,
with the reason; the other layers stay exact (float64 loop). Uses inside the calls of the layers that serve a
parameter (a layer called twice, tied weights), and a penalty added in the training loop, leave nothing out.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cockpit_lite import Cockpit, Need
from tests.reference import Probe, flat, per_sample_grads_loop

D, B, T, V = 6, 5, 4, 9
REASON = "used by the model's forward outside this layer's calls"


class FunctionalReuse(nn.Module):
    """``lin.weight`` a second time, by ``F.linear``."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return self.head(h + F.linear(h, self.lin.weight))


class Positions(nn.Embedding):
    """ProphetNet's position embedding: ``_forward`` looks up through nn.Embedding.forward, past the hooks."""

    def _forward(self, ids):
        return super().forward(ids)


class SkipsHooks(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.pos, self.head = nn.Embedding(V, D), Positions(T + 1, D), nn.Linear(D, 3)

    def forward(self, ids):
        at = torch.arange(ids.shape[1], device=ids.device)
        h = self.embed(ids) + self.pos(at) + self.pos._forward(at + 1)
        return self.head(torch.tanh(h).mean(1))


class LogitsByTheTable(nn.Module):
    """Logits by the embedding's weight in the model's forward (an output layer with no module)."""

    def __init__(self):
        super().__init__()
        self.embed, self.lin = nn.Embedding(V, D), nn.Linear(D, D)

    def forward(self, ids):
        return torch.tanh(self.lin(self.embed(ids).mean(1))) @ self.embed.weight.T


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, x):
        return self.head(self.lin(torch.tanh(self.lin(x))))


class Tied(nn.Module):
    """An output layer tied to the embedding, both called."""

    def __init__(self):
        super().__init__()
        self.embed, self.lin, self.out = nn.Embedding(V, D), nn.Linear(D, D), nn.Linear(D, V, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.lin(self.embed(ids).mean(1))))


def _tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, 3, (B,), generator=g)


def _features():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, D, generator=g), torch.randint(0, 3, (B,), generator=g)


def _steps(model, x, y, steps=3, penalty=None, device="cpu"):
    """``steps`` steps at lr 0 (the same parameters each step) with per-sample norms by parameter and g_i . gbar,
    on ``device`` (the model moved there, ``x`` and ``y`` read there): the cockpit's warnings and the step records."""
    model.to(device)
    x, y = x.to(device), y.to(device)
    probe = Probe(flags={Need.PER_SAMPLE_SQ_NORMS_BY_PARAM, Need.PER_SAMPLE_DOT_MEAN})
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss_fn = nn.CrossEntropyLoss()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Cockpit(model, opt, loss_fn, instruments=[probe], sinks=[]):
            for _ in range(steps):
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                (loss + penalty(model) if penalty is not None else loss).backward()
                opt.step()
    return [str(w.message) for w in caught if "cockpit-lite" in str(w.message)], probe.records


def _assert_exact(model, x, y, record, names):
    """The record's squared norms of ``names`` and g_i . gbar over them against the float64 loop."""
    device = next(model.parameters()).device
    loop = per_sample_grads_loop(model, nn.CrossEntropyLoss(), x.to(device), y.to(device), names=set(names))
    sq = record.per_sample_sq_norms_by_param
    assert set(sq) == set(names), sorted(sq)
    for n in names:
        want = (loop[n].reshape(len(y), -1) ** 2).sum(1)
        np.testing.assert_allclose(np.asarray(sq[n], dtype=np.float64), want, rtol=1e-5, atol=1e-9, err_msg=n)
    g = flat(loop)
    want = g @ g.mean(0)
    np.testing.assert_allclose(np.asarray(record.per_sample_dot_mean, dtype=np.float64), want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    "build,batch,out",
    [
        (FunctionalReuse, _features, {"lin.weight", "lin.bias"}),
        (SkipsHooks, _tokens, {"pos.weight"}),
        (LogitsByTheTable, _tokens, {"embed.weight"}),
    ],
    ids=["F.linear", "a method past the hooks", "logits by the table"],
)
def test_a_layer_used_outside_its_calls_is_left_out_and_the_rest_is_exact(build, batch, out, device):
    torch.manual_seed(0)
    model = build()
    x, y = batch()
    said, records = _steps(model, x, y, device=device)
    assert len(records) == 3
    named = [w for w in said if REASON in w]
    assert len(named) == 1 and all(n in named[0] for n in out), said  # said once, naming the parameters
    assert not any("do not add up" in w for w in said), said  # (nothing partial left for the check to find)
    others = [n for n, _ in model.named_parameters() if n not in out]
    for record in records:  # left out on every step, with the reason in the record's notes
        assert set(record.per_sample_uncovered) == out, record.per_sample_uncovered
        assert any(REASON in note for note in record.notes), record.notes
        _assert_exact(model, x, y, record, others)


@pytest.mark.parametrize("build,batch", [(CalledTwice, _features), (Tied, _tokens)], ids=["called twice", "tied"])
def test_uses_inside_the_serving_layers_calls_leave_nothing_out(build, batch, device):
    torch.manual_seed(0)
    model = build()
    x, y = batch()
    said, records = _steps(model, x, y, steps=2, device=device)
    assert not said, said
    names = [n for n, _ in model.named_parameters()]
    for record in records:
        assert not record.per_sample_uncovered
        _assert_exact(model, x, y, record, names)


def test_a_penalty_added_in_the_loop_is_no_use_by_the_forward(device):
    """A regulariser outside the model: the layer stays (its numbers are the loss module's term, exactly), and
    the gradient-sum check says what p.grad holds besides."""
    torch.manual_seed(0)
    model = CalledTwice()
    x, y = _features()
    said, records = _steps(model, x, y, steps=2, penalty=lambda m: 0.1 * m.lin.weight.square().sum(), device=device)
    assert not any(REASON in w for w in said), said
    assert any("do not add up" in w and "lin.weight" in w for w in said), said
    for record in records:
        assert not record.per_sample_uncovered
        _assert_exact(model, x, y, record, [n for n, _ in model.named_parameters()])


def test_transformers_prophetnet_decoder_positions_are_left_out_and_the_rest_is_exact(device):
    """ProphetNet's decoder looks its predicting streams' positions up through ``position_embeddings._forward``
    (past the layer's hooks): that table is left out on every step, every other parameter is exact. Before,
    the table's per-sample gradients held 2e-5 of its gradient (the gradient-sum check's warning)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ProphetNetConfig(
        vocab_size=32, hidden_size=16, encoder_ffn_dim=32, decoder_ffn_dim=32, num_encoder_layers=1,
        num_decoder_layers=1, num_encoder_attention_heads=2, num_decoder_attention_heads=2, ngram=2, num_buckets=8,
        relative_max_distance=16, max_position_embeddings=32, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)

    class LastLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = transformers.ProphetNetForConditionalGeneration(config)
            self.register_buffer("dec", torch.tensor([[2, 7, 11]]))

        def forward(self, ids):
            return self.m(input_ids=ids, decoder_input_ids=self.dec.expand(ids.shape[0], -1)).logits[:, -1]

    model = LastLogits()
    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(3, 32, (B, 6), generator=g), torch.randint(0, 32, (B,), generator=g)
    said, records = _steps(model, ids, y, steps=3, device=device)
    table, ngrams = "m.prophetnet.decoder.position_embeddings.weight", "m.prophetnet.decoder.ngram_embeddings.weight"
    assert any(REASON in w and table in w for w in said), said
    assert not any("do not add up" in w for w in said), said
    for k, record in enumerate(records):  # (the n-gram table, read by the decoder itself: served from step 2)
        assert set(record.per_sample_uncovered) == ({table, ngrams} if k == 0 else {table}), record.per_sample_uncovered
        covered = [n for n, p in model.named_parameters() if p.requires_grad and n not in record.per_sample_uncovered]
        assert len(covered) > 40
        _assert_exact(model, ids, y, record, covered)


def test_a_call_whose_nodes_cannot_be_read_ends_the_look_and_drops_nothing(monkeypatch):
    """Reading a call's nodes fails: no layer is left out for it (the look ends for the run), the gradient-sum
    check says what it sees, and the numbers stay the loss module's term."""
    import cockpit_lite.persample.engine as engine_mod

    def broken(*args):
        raise RuntimeError("no nodes")

    monkeypatch.setattr(engine_mod, "call_nodes", broken)
    torch.manual_seed(0)
    model = FunctionalReuse()
    x, y = _features()
    said, records = _steps(model, x, y, steps=2)
    assert not any(REASON in w for w in said), said
    assert any("do not add up" in w and "lin.weight" in w for w in said), said
    assert all(not r.per_sample_uncovered for r in records)
