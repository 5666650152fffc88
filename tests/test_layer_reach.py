"""Layers found by a sweep of torch-native constructions (session 13): those whose per-sample numbers were
wrong are exact now (against the float64 loop), and those the engine cannot serve are left out with a
reason that names the construction, never a raw exception text nor a guess."""

from __future__ import annotations

import warnings

import pytest
import torch
from cockpit_lite.instruments import PerSampleGradNorms
from torch import nn

from cockpit_lite import Cockpit
from tests.harness import assert_matches_loop

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


class Rescaled(nn.Module):
    """A forward hook of the user's replaces a layer's output (registered before the cockpit attaches)."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.a.register_forward_hook(lambda module, args, out: out * 2)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x)))


@pytest.mark.parametrize(
    "build",
    [lambda: OneCell(False), lambda: OneCell(True), UsesTwo, Rescaled],
    ids=["lstmcell-h", "lstmcell-h-and-c", "module-with-dependent-outputs", "user-hook-replaces-output"],
)
def test_outputs_computed_from_one_another_and_replaced_outputs_are_exact(build, device):
    torch.manual_seed(0)
    x, y = torch.randn(B, 4), torch.randint(0, 3, (B,))
    checked = assert_matches_loop(build(), x, y, nn.CrossEntropyLoss(), device=device)
    assert not [w for w in checked.warnings if "do not add up" in w]


class Packed(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.LSTM(4, 5, batch_first=True), nn.Linear(5, 3)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.rnn(packed)
        return self.head(h[-1])


class Reparametrised(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # (the old weight_norm is deprecated)
            {
                "weight_norm": nn.utils.parametrizations.weight_norm,
                "orthogonal": nn.utils.parametrizations.orthogonal,
                "old weight_norm": nn.utils.weight_norm,
            }[kind](self.a)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x)))


class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag, self.head = nn.EmbeddingBag(10, 4, mode="mean"), nn.Linear(4, 3)

    def forward(self, flat, offsets):
        return self.head(self.bag(flat, offsets))


class StackedRNN(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.rnn, self.head = cls(4, 5, num_layers=2, dropout=0.3, batch_first=True), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


CASES = {
    "packed sequence": (Packed, lambda: (torch.randn(B, 5, 4), torch.tensor([5, 3, 2, 5, 1])), "PackedSequence"),
    "parametrizations.weight_norm": (lambda: Reparametrised("weight_norm"), lambda: (torch.randn(B, 4),), "parametri"),
    "parametrizations.orthogonal": (lambda: Reparametrised("orthogonal"), lambda: (torch.randn(B, 4),), "parametri"),
    "old weight_norm": (lambda: Reparametrised("old weight_norm"), lambda: (torch.randn(B, 4),), "a.weight_v besides"),
    "EmbeddingBag with offsets": (
        Bag,
        lambda: (torch.randint(0, 10, (12,)), torch.tensor([0, 2, 5, 6, 10])),
        "EmbeddingBag on a flat input with offsets",
    ),
    "LSTM with dropout between layers": (lambda: StackedRNN(nn.LSTM), lambda: (torch.randn(B, 6, 4),), "dropout=0.3"),
    "GRU with dropout between layers": (lambda: StackedRNN(nn.GRU), lambda: (torch.randn(B, 6, 4),), "dropout=0.3"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_what_cannot_be_served_is_left_out_with_its_reason(case):
    build, inputs, reason = CASES[case]
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    plain = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cockpit = Cockpit(model, opt, loss_fn, instruments=[PerSampleGradNorms()], sinks=[])
        probe = []
        cockpit.instruments[0].compute = lambda record, keep=probe: keep.append(record) or {}
        opt.zero_grad()
        loss_fn(model(*inputs()), torch.randint(0, 3, (B,))).backward()
        opt.step()
        cockpit.close()
    said = [str(w.message) for w in caught if "cockpit-lite" in str(w.message)]
    left_out = [m for m in said if "leave out" in m]
    assert left_out and all(reason in m for m in left_out), said
    assert not [m for m in said if "used outside their module's forward" in m or "Error:" in m], said
    record = probe[0]
    assert record.per_sample_uncovered and "head.weight" not in record.per_sample_uncovered
    assert record.per_sample_sq_norms is not None  # (the rest is still computed)
    assert any("cover all parameters but" in n for n in record.notes)
    assert not any(torch.equal(a, b) for a, b in zip(plain, model.parameters(), strict=True))  # (it trained)
