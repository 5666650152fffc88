"""Layers found by a sweep of torch-native constructions (session 13): those whose per-sample numbers were
wrong are exact now (against the float64 loop), and those the engine cannot serve are left out with a
reason that names the construction, never a raw exception text nor a guess."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.harness import assert_matches_loop, watched_steps

B = 5


class OneCell(nn.Module):
    """An LSTMCell: h = o * tanh(c), so c is an output that h is computed from."""

    def __init__(self, use_c: bool):
        super().__init__()
        self.cell, self.head, self.use_c = nn.LSTMCell(4, 5), nn.Linear(5, 3), use_c

    def forward(self, x):
        h, c = self.cell(x)
        h, c = self.cell(x, (h, c))  # (a second call, from the first one's state)
        return self.head(h + c if self.use_c else h)


class TwoOutputs(nn.Module):
    """A module of the user's returning (h, tanh(h)): its second output is computed from its first."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 4) / 2)

    def forward(self, x):
        h = x @ self.weight.T
        return h, torch.tanh(h)


class UsesTwo(nn.Module):
    def __init__(self):
        super().__init__()
        self.two, self.head = TwoOutputs(), nn.Linear(5, 3)

    def forward(self, x):
        h, t = self.two(x)
        return self.head(h * 0.5 + t)


class ScaledEmbedding(nn.Embedding):
    """Gemma's: an nn.Embedding whose own forward multiplies the lookup by sqrt(d)."""

    def forward(self, ids):
        return super().forward(ids) * self.embedding_dim**0.5


class MaskPositions(nn.Embedding):
    """OPT's learned positions: the forward takes the attention mask and looks up positions from it."""

    def forward(self, mask):
        return super().forward(torch.cumsum(mask, 1) * mask - 1 + 2)


class SharedPositions(nn.Embedding):
    """BART's learned positions: the forward looks up arange(T) + 2, shared by every sequence."""

    def forward(self, ids):
        return super().forward(torch.arange(ids.shape[1], device=ids.device) + 2)


class Tokens(nn.Module):
    """Token and position embeddings of the three kinds above, the output layer tied to the tokens'."""

    def __init__(self):
        super().__init__()
        self.tokens, self.positions = ScaledEmbedding(11, 6, padding_idx=0), MaskPositions(12, 6)
        self.shared = SharedPositions(12, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.tokens.weight

    def forward(self, ids):
        mask = (ids != 0).long()
        return self.head(torch.tanh(self.tokens(ids) + self.positions(mask) + self.shared(ids)).mean(1))


class DropPath(nn.Module):
    """A layer of the user's with stochastic depth (replayed by torch.func): its forward draws a keep
    mask per example."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4) / 2)

    def forward(self, x):
        keep = (torch.rand(x.shape[0], 1) > 0.3).to(x.dtype) / 0.7 if self.training else 1.0
        return x + torch.tanh(x @ self.weight.T) * keep


class _Product(torch.autograd.Function):
    """x @ w.T with its own backward and no setup_context (torch.func refuses it)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.T

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.T @ x


class CustomFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.head = nn.Parameter(torch.randn(5, 4) / 2), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(_Product.apply(x, self.w)))


class Stochastic(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.head = DropPath(), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.block(x))


class ScaledLinear(nn.Linear):
    """An nn.Linear subclass with a forward of its own: served by torch.func, not the Linear factors."""

    def forward(self, x):
        return super().forward(x) * 3.0 + 1.0


class WithScaledLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.head = ScaledLinear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x)))


class Rescaled(nn.Module):
    """A forward hook of the user's replaces a layer's output (registered before the cockpit attaches)."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.a.register_forward_hook(lambda module, args, out: out * 2)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x)))


def _sequence(x: torch.Tensor, scaled: bool = False) -> torch.Tensor:
    """(B, d) examples as (B, 3, d) sequences of 3 positions (each position scaled by 1, 2, 3 with ``scaled``)."""
    seq = x[:, None].expand(-1, 3, -1)
    return seq * torch.arange(1.0, 4.0)[:, None] if scaled else seq


class RescaledReplay(nn.Module):
    """A forward hook of the user's replaces the output of a layer the engine replays by torch.func (GRU), or
    a pre-hook its input: the replay is the layer's bare forward, as the engine pairs its own output with its
    output gradient and the inputs its forward received (before session 18 either was applied twice)."""

    def __init__(self, pre: bool = False):
        super().__init__()
        self.rnn, self.head = nn.GRU(4, 5, batch_first=True), nn.Linear(5, 3)
        if pre:
            self.rnn.register_forward_pre_hook(lambda module, args: (args[0] * 3,))
        else:
            self.rnn.register_forward_hook(lambda module, args, out: (out[0] * 2, out[1]))

    def forward(self, x):
        return self.head(self.rnn(_sequence(x))[0][:, -1])


class InPlaceAfterReplay(nn.Module):
    """An in-place op downstream of a replayed layer with several outputs (GRU, then ReLU(inplace=True) and a
    scaling in place): the engine hands the outputs on as copies; on views of them (before session 18) the
    in-place ops rebased the views past the engine's hook, and the GRU was left out as unseen."""

    def __init__(self):
        super().__init__()
        self.rnn, self.act, self.head = nn.GRU(4, 5, batch_first=True), nn.ReLU(inplace=True), nn.Linear(5, 3)

    def forward(self, x):
        out = self.rnn(_sequence(x))[0]
        out.mul_(3.0)
        return self.head(self.act(out)[:, -1])


class InPlaceAfterTokenLinear(nn.Module):
    """A feed-forward block on (B, T, d) tokens with nn.ReLU(inplace=True) and a residual added in place to a
    Linear's output: F.linear returns a view of its product there, which an in-place op rebases past the
    view's own node (before session 18 both Linear layers were left out as unseen)."""

    def __init__(self):
        super().__init__()
        self.up, self.act, self.down, self.head = (
            nn.Linear(4, 8),
            nn.ReLU(inplace=True),
            nn.Linear(8, 4),
            nn.Linear(4, 3),
        )

    def forward(self, x):
        tokens = _sequence(x, scaled=True)
        h = self.down(self.act(self.up(tokens)))
        h += tokens
        return self.head(h.mean(1))


class InPlaceAfterAttention(nn.Module):
    """MultiheadAttention's output (a view: transposed, or reshaped from its product) changed in place, a
    residual added and a ReLU: the engine hands the view on as a copy (before session 18 the attention's
    parameters were left out as unseen)."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.attn, self.head = nn.MultiheadAttention(4, 2, batch_first=batch_first), nn.Linear(4, 3)

    def forward(self, x):
        tokens = _sequence(x, scaled=True)
        seq = tokens if self.batch_first else tokens.transpose(0, 1)
        out = self.attn(seq, seq, seq)[0]
        out += seq
        out.relu_()
        return self.head((out if self.batch_first else out.transpose(0, 1)).mean(1))


@pytest.mark.parametrize(
    "build",
    [
        lambda: InPlaceAfterAttention(True),
        lambda: InPlaceAfterAttention(False),
        InPlaceAfterTokenLinear,
        InPlaceAfterReplay,
        lambda: OneCell(False),
        lambda: OneCell(True),
        UsesTwo,
        Rescaled,
        RescaledReplay,
        lambda: RescaledReplay(pre=True),
        WithScaledLinear,
    ],
    ids=[
        "in-place-after-attention-batch-first",
        "in-place-after-attention-sequence-first",
        "in-place-after-a-linear-on-tokens",
        "in-place-after-a-replayed-layer",
        "lstmcell-h",
        "lstmcell-h-and-c",
        "dependent-outputs",
        "user-hook-replaces-output",
        "user-hook-replaces-a-replayed-output",
        "user-pre-hook-scales-a-replayed-input",
        "linear-subclass",
    ],
)
def test_outputs_computed_from_one_another_and_replaced_outputs_are_exact(build, device):
    """LSTMCell and a module of the user's return one output computed from another; a forward hook of the
    user's replaces a layer's output (one with a layer rule, one replayed by torch.func); an nn.Linear
    subclass has a forward of its own."""
    torch.manual_seed(0)
    x, y = torch.randn(B, 4), torch.randint(0, 3, (B,))
    checked = assert_matches_loop(build(), x, y, nn.CrossEntropyLoss(), device=device)
    assert not [w for w in checked.warnings if "do not add up" in w]


class Reversed(nn.Module):
    """A backward pre-hook of the user's rescales a layer's output gradient (gradient reversal, as in domain
    adaptation): the weight's gradient uses the rescaled one, and so do its per-sample gradients."""

    def __init__(self, replayed: bool):
        super().__init__()
        self.replayed = replayed
        self.a = nn.GRU(4, 6, batch_first=True) if replayed else nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)
        self.a.register_full_backward_pre_hook(lambda module, grad_out: (-2.0 * grad_out[0], *grad_out[1:]))

    def forward(self, x):
        h = self.a(_sequence(x))[0][:, -1] if self.replayed else self.a(x)
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("replayed", [False, True], ids=["Linear", "GRU"])
def test_a_backward_pre_hook_rescaling_the_output_gradient_is_exact(replayed):
    torch.manual_seed(0)
    x, y = torch.randn(B, 4, requires_grad=True), torch.randint(0, 3, (B,))
    checked = assert_matches_loop(Reversed(replayed), x, y, nn.CrossEntropyLoss())
    assert not [w for w in checked.warnings if "do not add up" in w]


def test_the_users_hooks_on_a_replayed_layer_run_in_the_users_steps_alone():
    """A forward pre-hook, a forward hook and a full backward hook of the user's on an LSTM (replayed per
    sample by torch.func) run once per training step, as without the cockpit, never on torch.func's tensors."""
    from cockpit_lite.instruments import GradientTests, PerSampleGradNorms

    from cockpit_lite import Cockpit

    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(4, 5, batch_first=True), Last(), nn.Linear(5, 3))
    seen = {"pre": [], "forward": [], "backward": []}
    lstm = model[0]
    lstm.register_forward_pre_hook(lambda m, args: seen["pre"].append(args[0]))
    lstm.register_forward_hook(lambda m, args, out: seen["forward"].append(out[0]))
    lstm.register_full_backward_hook(lambda m, gin, gout: seen["backward"].append(gout[0]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cockpit = Cockpit(model, opt, nn.CrossEntropyLoss(), instruments=[PerSampleGradNorms(), GradientTests()], sinks=[])
    for _ in range(3):
        opt.zero_grad()
        nn.CrossEntropyLoss()(model(torch.randn(B, 6, 4)), torch.randint(0, 3, (B,))).backward()
        opt.step()
    cockpit.close()
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    assert not any(wrapped(t) for ts in seen.values() for t in ts)
    # once per step on the batch (the engine's shape probe, a forward of the model on fewer examples on the
    # first step, runs the model's hooks too: it is a forward of the model)
    assert {k: sum(t.shape[0] == B for t in v) for k, v in seen.items()} == {"pre": 3, "forward": 3, "backward": 3}
    assert len(seen["backward"]) == 3 and len(seen["pre"]) <= 4


class Last(nn.Module):
    def forward(self, out):
        return out[0][:, -1]


class PackedRNN(nn.Module):
    """An RNN over a PackedSequence of sequences of several lengths (enforce_sorted=False): its padded
    output and its last state both feed the head, from a given initial state or none."""

    def __init__(self, cls, batch_first: bool, bidirectional: bool, layers: int, with_h0: bool):
        super().__init__()
        self.rnn = cls(4, 5, num_layers=layers, batch_first=batch_first, bidirectional=bidirectional)
        self.lstm, self.with_h0 = cls is nn.LSTM, with_h0
        d = 2 if bidirectional else 1
        self.h0 = nn.Parameter(torch.randn(layers * d, 1, 5) / 3) if with_h0 else None
        self.head = nn.Linear(5 * d + 5, 3)

    def forward(self, x, lengths):
        seqs = x if self.rnn.batch_first else x.transpose(0, 1)
        first = self.rnn.batch_first
        packed = nn.utils.rnn.pack_padded_sequence(seqs, lengths, batch_first=first, enforce_sorted=False)
        hx = None
        if self.with_h0:
            h0 = self.h0.expand(-1, x.shape[0], -1).contiguous()
            hx = (h0, torch.zeros_like(h0)) if self.lstm else h0
        out, state = self.rnn(packed, hx)
        padded, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        h = state[0] if self.lstm else state
        return self.head(torch.cat([padded.sum(1), h[-1]], 1))


@pytest.mark.parametrize(
    "cls, batch_first, bidirectional, layers, with_h0",
    [(nn.LSTM, True, True, 2, False), (nn.GRU, False, False, 1, True), (nn.LSTM, False, False, 1, True)],
    ids=["lstm-bidirectional-2-layers", "gru-time-major-h0", "lstm-time-major-h0"],
)
def test_rnns_over_packed_sequences_are_exact(cls, batch_first, bidirectional, layers, with_h0):
    """Each sequence unpacked to its own length and replayed alone (packing means no step sees padding)."""
    torch.manual_seed(0)
    model = PackedRNN(cls, batch_first, bidirectional, layers, with_h0)
    x, lengths = torch.randn(B, 6, 4), torch.tensor([6, 3, 2, 6, 1])
    checked = assert_matches_loop(model, (x, lengths), torch.randint(0, 3, (B,)), nn.CrossEntropyLoss())
    assert {n for n, _ in model.named_parameters()} == set(checked.record.per_sample_sq_norms_by_param)


class PreHooked(nn.Module):
    """A Linear whose weight a forward pre-hook of the user's computes from another parameter before each call
    (as the older spectral_norm did before the engine knew it): a parameter its layer rule does not serve."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 3)
        raw = self.a.weight.detach().clone()
        del self.a.weight
        self.a.weight_raw = nn.Parameter(raw)
        self.a.register_forward_pre_hook(lambda m, args: setattr(m, "weight", 2 * m.weight_raw))

    def forward(self, x):
        return self.head(torch.tanh(self.a(x)))


class ScaledBag(nn.EmbeddingBag):
    """An EmbeddingBag with a forward of its own: replayed by torch.func, which takes (B, n) bags only."""

    def forward(self, input, offsets=None):
        return 2.0 * super().forward(input, offsets)


class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        # (nn.EmbeddingBag itself, every mode, with offsets too: test_embedding_bag)
        self.bag, self.head = ScaledBag(10, 4, mode="max"), nn.Linear(4, 3)

    def forward(self, flat, offsets):
        return self.head(self.bag(flat, offsets))


class StackedRNN(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.rnn, self.head = cls(4, 5, num_layers=2, dropout=0.3, batch_first=True), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


CASES = {
    "a weight set by a pre-hook": (PreHooked, lambda: (torch.randn(B, 4),), "a.weight_raw besides"),
    "an EmbeddingBag subclass with offsets": (
        Bag,
        lambda: (torch.randint(0, 10, (12,)), torch.tensor([0, 2, 5, 6, 10])),
        "ScaledBag (an EmbeddingBag with a forward of its own, replayed by torch.func) on a flat input with offsets",
    ),
    "LSTM with dropout between layers": (lambda: StackedRNN(nn.LSTM), lambda: (torch.randn(B, 6, 4),), "dropout=0.3"),
    "GRU with dropout between layers": (lambda: StackedRNN(nn.GRU), lambda: (torch.randn(B, 6, 4),), "dropout=0.3"),
    "stochastic depth": (Stochastic, lambda: (torch.randn(B, 4),), "draws random numbers in its forward"),
    "custom autograd.Function": (CustomFunction, lambda: (torch.randn(B, 4),), "without a setup_context"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_what_cannot_be_served_is_left_out_with_its_reason(case):
    build, inputs, reason = CASES[case]
    torch.manual_seed(0)
    model = build()
    plain = [p.detach().clone() for p in model.parameters()]
    said, records = watched_steps(model, [(inputs(), torch.randint(0, 3, (B,)))])
    left_out = [m for m in said if "leave out" in m]
    assert left_out and all(reason in m for m in left_out), said
    assert not [m for m in said if "used outside their module's forward" in m or "Error:" in m], said
    record = records[0]
    assert record.per_sample_uncovered and "head.weight" not in record.per_sample_uncovered
    assert record.per_sample_sq_norms is not None  # (the rest is still computed)
    assert any("cover all parameters but" in n for n in record.notes)
    assert not any(torch.equal(a, b) for a, b in zip(plain, model.parameters(), strict=True))  # (it trained)


def test_embeddings_with_a_forward_of_their_own_are_read_at_their_lookup(device):
    """Gemma's scaled token embedding (tied to the output layer), OPT's positions from the attention mask
    and BART's positions shared by the batch: nn.Embedding subclasses whose forward changes what the
    lookup returns (1/d of ||g_i||^2 before) or takes other arguments than the indices."""
    torch.manual_seed(0)
    ids = torch.randint(1, 11, (B, 7))
    ids[1, 5:] = 0  # (padding: position ids from the mask, padding_idx rows)
    checked = assert_matches_loop(Tokens(), ids, torch.randint(0, 11, (B,)), nn.CrossEntropyLoss(), device=device)
    assert set(checked.record.per_sample_sq_norms_by_param) == {"tokens.weight", "positions.weight", "shared.weight"}
    assert not checked.warnings


def test_a_failed_gradient_sum_check_is_said_on_every_later_step():
    """The check runs once; the layers it found are named in the notes of every later step (a helper's
    sweep found wrong numbers on steps 1 and 2 with no note), here for a penalty outside the loss module."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    batches = [((torch.randn(B, 4),), torch.randint(0, 3, (B,))) for _ in range(3)]
    _, records = watched_steps(model, batches, penalty=lambda m: 0.1 * m[0].weight.square().sum())
    notes = [list(r.notes) for r in records]
    assert any("do not add up" in n for n in notes[0])
    for later in notes[1:]:
        assert any("0.weight" in n and "when checked at step 0" in n for n in later), later


class Flattened(nn.Module):
    """OPT's feed-forward block: (B, T, d) activations flattened to (B T, d) rows for a LayerNorm and two
    Linear layers; ``time_major``: flattened positions first ((T, B) order), which cannot be split by
    example without knowing the order."""

    def __init__(self, time_major: bool = False, dropout: float = 0.0):
        super().__init__()
        self.time_major = time_major
        self.embed = nn.Embedding(11, 6)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(6), nn.Linear(6, 8), nn.Linear(8, 6)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        x = self.embed(ids)  # (B, T, d)
        b, t, d = x.shape
        rows = x.transpose(0, 1).reshape(-1, d) if self.time_major else x.reshape(-1, d)
        h = self.fc2(self.drop(torch.relu(self.fc1(self.norm(self.drop(rows))))))
        h = h.reshape(t, b, d).transpose(0, 1) if self.time_major else h.reshape(b, t, d)
        return self.head((x + h).mean(1))


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["deterministic", "dropout"])
def test_examples_flattened_with_their_positions_are_split_example_by_example(dropout):
    """(B T, d) rows: the shape probe finds the axis ((B - 1) T rows on B - 1 examples) and checks that the
    rows go example by example (two runs in eval mode on B and B - 1 examples: also where dropout draws
    other masks in every run, as in OPT's default config): exact against the loop (which replays the
    step's masks)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (B, 7))
    model = Flattened(dropout=dropout)
    checked = assert_matches_loop(model, ids, torch.randint(0, 3, (B,)), nn.CrossEntropyLoss())
    assert {"fc1.weight", "fc2.weight", "norm.weight"} <= set(checked.record.per_sample_sq_norms_by_param)
    assert not checked.warnings


class Unfolded(nn.Module):
    """MobileViT's unfolded patches (and PatchTST's channels): a conv map (B, C, H, W) unfolded to
    (B P^2, N, C) rows, P^2 pixels of each of N patches, through a Linear and a LayerNorm, folded back. With
    N == B the rows' first axis is a multiple of B and their second has the batch size: taken for the sample
    axis by its size alone, every number was wrong and nothing said so (session 14's sweep)."""

    def __init__(self, patch: int = 2):
        super().__init__()
        self.conv, self.lin, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 8), nn.LayerNorm(8)
        self.head, self.patch = nn.Linear(8, 3), patch

    def forward(self, x):
        f, p = self.conv(x), self.patch
        b, c, h, w = f.shape
        nh, nw = h // p, w // p
        rows = f.reshape(b * c * nh, p, nw, p).transpose(1, 2).reshape(b, c, nh * nw, p * p).transpose(1, 3)
        rows = self.norm(self.lin(rows.reshape(b * p * p, nh * nw, c)))  # (B P^2, N, C)
        return self.head(rows.reshape(b, p * p, nh * nw, c).mean((1, 2)))


@pytest.mark.parametrize("side", [4, 6], ids=["patches-as-many-as-examples", "other-patch-count"])
def test_rows_of_several_examples_are_split_when_another_axis_has_the_batch_size(side):
    """(B k, N, d) rows with N == B (4 patches of a 4 x 4 map, B = 4) go to the shape probe like (B k, d)
    rows: exact, as with 9 patches."""
    torch.manual_seed(0)
    model = Unfolded()
    x = torch.randn(4, 3, side, side)
    checked = assert_matches_loop(model, x, torch.randint(0, 3, (4,)), nn.CrossEntropyLoss())
    assert {"lin.weight", "norm.weight"} <= set(checked.record.per_sample_sq_norms_by_param)
    assert not checked.warnings


class Latents(nn.Module):
    """Perceiver's latents and trainable position encodings: a module whose forward takes the batch size (an
    int) and returns its parameter expanded over the batch. Its torch.func replay gets no per-example input
    and returns all B rows: each g_i was the sum over the B rows' shares, B times too large (session 14)."""

    def __init__(self):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(3, 8))

    def forward(self, batch_size):
        return self.latents.expand(batch_size, -1, -1)


class WithLatents(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lin, self.head = Latents(), nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x.shape[0]) + self.lin(x)[:, None]).mean(1))


def test_a_parameter_a_module_expands_over_the_batch_itself_is_exact(device):
    torch.manual_seed(0)
    checked = assert_matches_loop(
        WithLatents(), torch.randn(B, 5), torch.randint(0, 3, (B,)), nn.CrossEntropyLoss(), device=device
    )
    assert "emb.latents" in checked.record.per_sample_sq_norms_by_param
    assert not checked.warnings


class Relative(nn.Module):
    """Funnel's relative attention in small: a bare parameter used by a matrix product (served by torch.func
    over this module) and a mask shared by the batch, (T, T), passed in."""

    def __init__(self):
        super().__init__()
        self.q, self.r = nn.Linear(4, 4), nn.Parameter(torch.randn(4, 4) / 2)

    def forward(self, x, mask):
        return mask @ torch.tanh(self.q(x) @ self.r)  # (T, T) @ (B, T, 4)


class WithRelative(nn.Module):
    def __init__(self):
        super().__init__()
        self.rel, self.head = Relative(), nn.Linear(4, 3)

    def forward(self, x):
        t = x.shape[1]
        mask = torch.tril(x.new_ones(t, t)) / torch.arange(1, t + 1, dtype=x.dtype, device=x.device)[:, None]
        return self.head(self.rel(x, mask).mean(1))


def test_a_bare_parameters_replay_takes_the_axes_the_shape_probe_found(device):
    """With as many positions as examples (Funnel after its first pooling, B = T = 4), the (T, T) mask has
    two axes of the batch size: the shape probe finds it shared, and the torch.func replay of the module that
    serves the bare parameter now takes that, where it split the mask by rows (session 14's sweep)."""
    torch.manual_seed(0)
    x = torch.randn(B, B, 4)
    checked = assert_matches_loop(WithRelative(), x, torch.randint(0, 3, (B,)), nn.CrossEntropyLoss(), device=device)
    assert "rel.r" in checked.record.per_sample_sq_norms_by_param


class ChannelsAsRows(nn.Module):
    """PatchTST's and LeViT's eval-mode BatchNorm1d on (B k, C) rows: every channel (or position) of every
    example a row of its own."""

    def __init__(self):
        super().__init__()
        self.lin, self.norm, self.head = nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)
        self.norm.running_mean.uniform_(-0.5, 0.5)
        self.norm.running_var.uniform_(0.5, 2.0)
        self.norm.eval()

    def forward(self, x):  # (B, k, 3)
        rows = self.norm(self.lin(x.reshape(-1, 3)))  # (B k, 6)
        return self.head(torch.tanh(rows).reshape(x.shape[0], -1, 6).mean(1))


def test_an_eval_mode_batch_norm_on_rows_of_several_examples_is_exact(device):
    torch.manual_seed(0)
    checked = assert_matches_loop(
        ChannelsAsRows(), torch.randn(B, 4, 3), torch.randint(0, 3, (B,)), nn.CrossEntropyLoss(), device=device
    )
    assert {"norm.weight", "norm.bias", "lin.weight"} <= set(checked.record.per_sample_sq_norms_by_param)
    assert not checked.warnings


def test_positions_flattened_first_are_left_out_not_guessed():
    torch.manual_seed(0)
    said, records = watched_steps(
        Flattened(time_major=True), [((torch.randint(0, 11, (B, 7)),), torch.randint(0, 3, (B,)))]
    )
    assert "another order than example by example" in " ".join(said)
    assert {"fc1.weight", "fc2.weight", "norm.weight"} <= set(records[0].per_sample_uncovered)


def test_tracin_probes_read_embeddings_with_a_forward_of_their_own_at_their_lookup(device):
    """TracIn's probe pass (engine.probe, its own forward and autograd.grad) reads Gemma's scaled token
    embedding and OPT's mask positions at their lookups too: per-example gradients against autograd per
    example (losses as batches of one)."""
    from cockpit_lite.persample.engine import PerSampleEngine

    class Probed(nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens, self.positions = ScaledEmbedding(11, 6, padding_idx=0), MaskPositions(12, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, ids):
            return self.head(torch.tanh(self.tokens(ids) + self.positions((ids != 0).long())).mean(1))

    torch.manual_seed(0)
    model, loss_fn = Probed().to(device), nn.CrossEntropyLoss()
    x, y = torch.randint(1, 11, (3, 5), device=device), torch.randint(0, 3, (3,), device=device)
    x[1, 3:] = 0
    engine = PerSampleEngine(model, attach=False)
    views, _ = engine.probe(x, y, loss_fn)
    for name, param in (("tokens.weight", model.tokens.weight), ("positions.weight", model.positions.weight)):
        got = views[(name,)].grads()[name]
        for k in range(3):
            want = torch.autograd.grad(loss_fn(model(x[k : k + 1]), y[k : k + 1]), param)[0]
            assert torch.allclose(got[k], want, rtol=1e-4, atol=1e-6), (name, k)
    engine.close()
