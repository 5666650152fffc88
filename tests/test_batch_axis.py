"""The sample axis of an activation with several axes of the batch size (a (B, T, d) or (T, B, d)
activation with T == B): resolved exactly by one shape probe (the model run on B - 1 examples), never
guessed, and without any effect on training (parameters, buffers and the random stream bit-identical
to a run without the cockpit). Reference: the float64 loop over samples (tests/harness.py) and, for
train-mode BatchNorm, d l_i / d theta on the whole batch."""

from __future__ import annotations

import contextlib
import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cockpit_lite import Cockpit, Need
from cockpit_lite.persample.engine import PerSampleEngine
from tests import models
from tests import models_lm as M
from tests.harness import assert_matches_loop, is_random
from tests.reference import Probe

FLAGS = {Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_SQ_NORMS_BY_PARAM, Need.PER_SAMPLE_DOT_MEAN}


def test_sequence_first_transformer_with_as_many_positions_as_examples(device):
    """nn.TransformerEncoderLayer(batch_first=False) on (T, B, d) with T == B == 6: every parameter
    covered, equal to the float64 loop, no warning."""
    torch.manual_seed(0)
    model = models.TinyTransformer(batch_first=False)
    x, y = models.token_batch(b=6, t=6)
    checked = assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), device=device)
    assert set(checked.record.per_sample_sq_norms_by_param) == {n for n, _ in model.named_parameters()}
    assert not checked.record.per_sample_uncovered and not checked.warnings


@pytest.mark.parametrize("flash", [False, True])
def test_batch_first_gpt_with_block_equal_to_batch_and_dropout(flash):
    """nanoGPT (batch-first (B, T, d), positions looked up with arange(T)) with B == T == 8 and dropout
    0.2 in train mode: every parameter exact against the loop (the harness replays the masks)."""
    torch.manual_seed(0)
    model = M.LogitsForLoss(M.NanoGPT(dropout=0.2, block_size=8, flash=flash))
    x, y = M.token_batch(8, 8)
    assert is_random(model, x)
    # CPU only: the float64 loop must draw the float32 step's dropout masks, which CUDA kernels do not
    # promise across dtypes (tests/test_attention_dropout.py checks CUDA against same-device shares)
    checked = assert_matches_loop(model, x, y, nn.CrossEntropyLoss())
    assert set(checked.record.per_sample_sq_norms_by_param) == {n for n, _ in model.named_parameters()}
    assert not checked.warnings


def _train(model, batches, cockpit: bool, loss_fn=None, device="cpu"):
    """Train with Adam (its state follows every bit of the gradients); with the cockpit asking for
    per-sample statistics at every step. Returns the model's state, a torch.rand drawn after training,
    the probe's records and the number of forward calls of the model (probes included). On ``device``
    (model and batches moved there; the torch.rand is drawn on the CPU and on the device)."""
    model.to(device)
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    probe = Probe(flags=FLAGS)
    torch.manual_seed(1)
    ctx = Cockpit(model, opt, loss_fn, instruments=[probe]) if cockpit else None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no refusal, no note
        if ctx is not None:
            ctx.__enter__()
        try:
            for x, y in batches:
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
            engine = ctx.engine if ctx is not None else None
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
    handle.remove()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rand = torch.cat([torch.rand(4), torch.rand(4, device=device).cpu()])
    return state, rand, probe.records, calls, engine


def _assert_training_unchanged(build, batches, loss_fn=None, device="cpu"):
    """Returns the cockpit run's records, model calls and engine."""
    plain, plain_rand, _, plain_calls, _ = _train(build(), batches, cockpit=False, loss_fn=loss_fn, device=device)
    state, rand, records, calls, engine = _train(build(), batches, cockpit=True, loss_fn=loss_fn, device=device)
    assert plain.keys() == state.keys()
    for k in plain:
        assert torch.equal(plain[k], state[k]), k
    assert torch.equal(plain_rand, rand)  # the random stream is untouched
    assert len(plain_calls) == len(batches)
    return records, calls, engine


def test_training_is_bit_identical_and_the_probe_runs_once_per_run(device):
    """nanoGPT with dropout, B == T: parameters, Adam's state and the random stream bit-identical to a
    run without the cockpit; one probe forward (on B - 1 examples) over the run, not one per step."""
    batches = [M.token_batch(8, 8, seed=s) for s in range(3)]

    def build():
        torch.manual_seed(0)
        return M.LogitsForLoss(M.NanoGPT(dropout=0.2, block_size=8))

    records, calls, engine = _assert_training_unchanged(build, batches, device=device)
    assert calls == [8, 7, 8, 8]  # the first step's forward, the probe on 7 examples, then the steps
    assert engine.probe_runs == 1 and engine.probe_ms > 0
    names = {n for n, _ in build().named_parameters()}
    for rec in records:
        assert set(rec.per_sample_sq_norms_by_param) == names and not rec.per_sample_uncovered


class _Counter(nn.Module):
    """Counts the examples it has seen in a buffer (a forward that writes a buffer in place)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.seen += x.shape[0]
        return x


class _BufferedSeqModel(nn.Module):
    """(B, T, d) activations and a (B, T) -> (B, d) pooling, with a buffer written at every forward."""

    def __init__(self, norm: str = "layer"):
        super().__init__()
        self.emb, self.lin, self.head = nn.Embedding(11, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.count = _Counter()
        self.norm = nn.BatchNorm1d(8) if norm == "batch" else nn.LayerNorm(8)
        self.is_batch = norm == "batch"

    def forward(self, tokens):
        h = torch.tanh(self.lin(self.count(self.emb(tokens))))
        h = self.norm(h.transpose(1, 2)).transpose(1, 2) if self.is_batch else self.norm(h)
        return self.head(h.mean(1))


def test_buffers_written_in_forward_are_untouched_by_the_probe(device):
    torch.manual_seed(0)
    batches = [models.token_batch(b=6, t=6) for _ in range(2)]

    def build():
        torch.manual_seed(0)
        return _BufferedSeqModel()

    records, calls, engine = _assert_training_unchanged(build, batches, device=device)
    assert calls == [6, 5, 6] and engine.probe_runs == 1
    assert all(not rec.per_sample_uncovered for rec in records)
    torch.manual_seed(0)
    x, y = models.token_batch(b=6, t=6)
    assert_matches_loop(build(), x, y, nn.CrossEntropyLoss(), device=device)


def test_train_mode_batchnorm_with_as_many_positions_as_examples(device):
    """Train-mode BatchNorm goes through the coupled path (no per-layer axis, no probe): per-sample
    g_i . gbar equal to d l_i / d theta on the whole batch, and running statistics, parameters and the
    random stream bit-identical to a plain run."""
    batches = [models.token_batch(b=6, t=6) for _ in range(2)]

    def build():
        torch.manual_seed(0)
        return _BufferedSeqModel(norm="batch")

    probe_model = build().to(device)
    records, _, engine = _assert_training_unchanged(build, batches, device=device)
    assert engine.probe_runs == 0
    x, y = (t.to(device) for t in batches[0])
    m = copy.deepcopy(probe_model).double().train()
    params = [p for p in m.parameters() if p.requires_grad]
    losses = F.cross_entropy(m(x).double(), y, reduction="none")
    rows = [torch.autograd.grad(losses[i], params, retain_graph=True) for i in range(6)]
    G = torch.stack([torch.cat([g.reshape(-1) for g in gs]) for gs in rows]).cpu().numpy()
    np.testing.assert_allclose(records[0].per_sample_dot_mean, G @ G.mean(0), rtol=1e-4, atol=1e-8)


def test_the_probe_leaves_modes_and_batchnorm_statistics_alone(device):
    """Called directly: train-mode BatchNorm runs the probe in eval mode (the same shapes) and is back
    in train mode after, its running statistics untouched; the buffer the forward writes is a copy's."""
    torch.manual_seed(0)
    model = _BufferedSeqModel(norm="batch").to(device)
    x = models.token_batch(b=6, t=6)[0].to(device)
    output = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    versions = {k: v._version for k, v in model.state_dict().items()}
    engine = PerSampleEngine(model, attach=False)
    seen = engine.resolve_axes((x,), {}, 6, output)
    assert model.norm.training and model.training
    for k, v in model.state_dict().items():  # values and version counters (autograd checks them)
        assert torch.equal(v, before[k]) and v._version == versions[k], k
    assert seen[(model.lin, 0)] == (((5, 6, 8),), ((5, 6, 8),))
    assert seen[(model.emb, 0)] == (((5, 6),), ((5, 6, 8),))


class _SharedFeatures(nn.Module):
    """Position features (T, 4) shared by the batch, projected by a Linear and added to every example:
    with T == B the Linear's input has one axis of size B, which is not the batch."""

    def __init__(self):
        super().__init__()
        self.emb, self.pos, self.head = nn.Embedding(11, 8), nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, tokens):
        w = self.pos.weight
        t = torch.arange(tokens.shape[1], dtype=w.dtype, device=w.device)
        feats = torch.sin(t[:, None] * torch.arange(1, 5, dtype=w.dtype, device=w.device))
        return self.head(torch.tanh(self.emb(tokens) + self.pos(feats)).mean(1))


@pytest.mark.parametrize("t", [5, 6])
def test_a_layer_on_position_features_shared_by_the_batch(device, t):
    """The shared call is split where its output meets the batch, also with T == B (before: its T rows
    were taken for the B samples, silently wrong): the probe says its input has no sample axis."""
    torch.manual_seed(0)
    x, y = models.token_batch(b=6, t=t)
    checked = assert_matches_loop(_SharedFeatures(), x, y, nn.CrossEntropyLoss(), device=device)
    assert not checked.record.per_sample_uncovered and not checked.warnings


class _FixedBatch(models.TinyTransformer):
    """A sequence-first transformer whose forward fails on any batch but 1 and 6: the probe cannot run."""

    def forward(self, tokens):
        if tokens.shape[0] not in (1, 6):
            raise RuntimeError("this model takes batches of 6")
        return super().forward(tokens)


def test_a_probe_that_fails_keeps_the_refusal_with_its_reason(device):
    torch.manual_seed(0)
    model = _FixedBatch(batch_first=False)
    x, y = models.token_batch(b=6, t=6)
    with pytest.raises(AssertionError, match=r"(?s)gave no value.*ambiguous.*this model takes batches of 6"):
        assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), device=device)


def test_one_example_needs_no_probe(device):
    """B == 1: any axis of size 1 is the sample axis (moving it does not reorder the data)."""
    torch.manual_seed(0)
    model = models.TinyTransformer(batch_first=False)
    x, y = torch.tensor([[3]]), torch.tensor([1])
    checked = assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), device=device)
    assert not checked.record.per_sample_uncovered


@pytest.mark.parametrize("batch_first", [True, False], ids=["(B, T, d)", "(T, B, d)"])
def test_transformer_encoder_lm_with_default_dropout_and_as_many_positions_as_examples(batch_first):
    """nn.TransformerEncoder with its default dropout 0.1 (attention dropout replayed), a causal mask
    of shape (T, T) and B == T: exact against the shares of the same-seed forward (test_attention_dropout)."""
    from tests.test_attention_dropout import LM, SEED, _tokens

    torch.manual_seed(0)
    model = LM(batch_first=batch_first)
    x, y = _tokens(b=6, t=6)
    checked = assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), rng_seed=SEED)  # CPU only, as above
    assert not checked.warnings and not checked.record.per_sample_uncovered


def test_gradient_accumulation_with_micro_batches_as_long_as_the_sequence(device):
    """Micro-batches of 6, 6 and 3 sequences of 6 tokens through a (T, B, d) transformer: each micro-batch
    of 6 is resolved (one probe, cached), the one of 3 too (its (6, 3, d) activations could hold the 3
    examples flattened with 2 positions each along the first axis: a second probe, cached), and the step's
    statistics over its 15 examples equal the float64 loop on the concatenated batch; training as without
    the cockpit."""
    from tests.reference import flat, per_sample_grads_loop
    from tests.test_accumulation_join import _accumulate, _assert_same_training

    sizes = [6, 6, 3]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(1, 11, (15, 6), generator=g), torch.randint(0, 3, (15,), generator=g)) for _ in range(2)]
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    torch.manual_seed(0)
    model = models.TinyTransformer(batch_first=False).to(device)
    plain = copy.deepcopy(model)
    loss_fn = nn.CrossEntropyLoss()
    probe = Probe(flags=FLAGS)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Cockpit(model, opt, loss_fn, instruments=[probe]) as ck:
            steps = _accumulate(model, opt, None, batches, sizes, loss_fn)
            assert ck.engine.probe_runs == 2
    _accumulate(plain, torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9), None, batches, sizes, loss_fn)
    _assert_same_training(model, plain)
    for rec, (theta, x, y) in zip(probe.records, steps, strict=True):
        assert rec.micro_batches == sizes and not rec.per_sample_uncovered
        G = flat(per_sample_grads_loop(theta, nn.CrossEntropyLoss(), x, y))
        np.testing.assert_allclose(rec.per_sample_sq_norms, (G**2).sum(1), rtol=1e-5)
        dot = G @ G.mean(0)
        np.testing.assert_allclose(rec.per_sample_dot_mean, dot, rtol=1e-5, atol=1e-5 * np.abs(dot).max())


class _LossInside(nn.Module):
    """nanoGPT called as ``model(idx, targets)`` returning the loss alone (no output to check)."""

    def __init__(self):
        super().__init__()
        self.net = M.NanoGPT(dropout=0.1, block_size=8)

    def forward(self, idx, targets):
        return self.net(idx, targets)[1]


def test_a_model_that_returns_only_its_loss(device):
    """The loss computed inside the model (mean over the batch's tokens), B == T: the probe cuts the
    targets too; every parameter covered, training unchanged."""
    batches = [tuple(t.to(device) for t in M.token_batch(8, 8, seed=s)) for s in range(2)]

    def build():
        torch.manual_seed(0)
        return _LossInside().to(device)

    def train(model, cockpit):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        probe = Probe(flags=FLAGS)
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ctx = Cockpit(model, opt, instruments=[probe]) if cockpit else contextlib.nullcontext()
            with ctx as ck:
                for x, y in batches:
                    opt.zero_grad()
                    model(x, y).backward()
                    opt.step()
        return probe.records, ck

    plain, model = build(), build()
    train(plain, False)
    records, ck = train(model, True)
    for a, b in zip(plain.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert ck.engine.probe_runs == 1
    names = {n for n, _ in model.named_parameters()}
    assert all(set(rec.per_sample_sq_norms_by_param) == names and not rec.per_sample_uncovered for rec in records)
    # the first step against the float64 loop (dropout off: the loop cannot redraw the masks)
    ref = build().double().eval()
    x, y = batches[0]
    sq = []
    for i in range(len(x)):
        grads = torch.autograd.grad(ref(x[i : i + 1], y[i : i + 1]), list(ref.parameters()))
        sq.append(sum(float(g.square().sum()) for g in grads))
    model = build()
    model.net.apply(lambda m: setattr(m, "p", 0.0) if isinstance(m, nn.Dropout) else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    probe = Probe(flags=FLAGS)
    with Cockpit(model, opt, instruments=[probe]):
        model(x, y).backward()
        opt.step()
    np.testing.assert_allclose(probe.records[0].per_sample_sq_norms, sq, rtol=1e-4)


def test_tracin_probe_views_with_as_many_positions_as_examples(device):
    """The engine's probe session (TracIn's other batch) with B == T through a (T, B, d) transformer:
    every layer's view, its squared norms equal to the float64 loop; the sample axes are resolved once
    and shared with the training steps' cache."""
    from tests.reference import per_sample_grads_loop

    torch.manual_seed(0)
    model = models.TinyTransformer(batch_first=False).to(device)
    x, y = (t.to(device) for t in models.token_batch(b=6, t=6))
    engine = PerSampleEngine(model)
    loss_fn = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        views, losses = engine.probe(x, y, loss_fn)
        engine.probe(x, y, loss_fn)
    engine.close()
    assert len(engine._axes) > 0
    ref = per_sample_grads_loop(model, loss_fn, x, y)
    got = {n: v for view in views.values() for n, v in view.sq_norms().items()}
    assert set(got) == set(ref)
    for n, g in ref.items():
        np.testing.assert_allclose(got[n].double().cpu().numpy(), (g.reshape(6, -1) ** 2).sum(1), rtol=1e-4, err_msg=n)


class _WritesItsWeight(_SharedFeatures):
    """A forward that writes one of its parameters in place (a clamp of the head's weight)."""

    def forward(self, tokens):
        with torch.no_grad():
            self.head.weight.clamp_(-0.3, 0.3)
        return super().forward(tokens)


def test_a_forward_that_writes_its_parameters_stops_the_probe_before_the_write(device):
    """The probe stops before the in-place write (training bit-identical to a plain run, backward
    intact); the layers it would have resolved are left out with the reason, not guessed."""

    def run(cockpit):
        torch.manual_seed(0)
        model = _WritesItsWeight().to(device)
        x, y = (t.to(device) for t in models.token_batch(b=6, t=6))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss_fn = nn.CrossEntropyLoss()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            probe = Probe(flags=FLAGS)
            with Cockpit(model, opt, loss_fn, instruments=[probe]) if cockpit else contextlib.nullcontext():
                for _ in range(2):
                    opt.zero_grad()
                    loss_fn(model(x), y).backward()
                    opt.step()
        return model.state_dict(), " ".join(str(w.message) for w in caught)

    plain, _ = run(False)
    state, messages = run(True)
    for k in plain:
        assert torch.equal(plain[k], state[k]), k
    assert "ambiguous" in messages and "clamp_ on head.weight" in messages
