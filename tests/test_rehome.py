"""Parameters of a child layer that the parent's forward uses functionally, the child never called
(transformers' Mamba mixer reads ``self.conv1d.weight`` and ``self.dt_proj.weight`` in its own forward):
served as bare parameters of the parent (``PerSampleEngine.rehome``), from the first step where the first
forward's graph shows them and the parent's call was captured, else from the second; checked against the
float64 loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.harness import assert_matches_loop, watched_steps

B, T, D, R = 4, 6, 5, 2


class Mixer(nn.Module):
    """A Mamba-like mixer: a depthwise causal convolution and a time-step projection used through their
    weights, beside layers it calls and a parameter of its own (``A``)."""

    def __init__(self):
        super().__init__()
        self.in_proj = nn.Linear(D, 2 * D)
        self.conv1d = nn.Conv1d(D, D, kernel_size=3, groups=D, padding=2)
        self.x_proj = nn.Linear(D, R)
        self.dt_proj = nn.Linear(R, D)
        self.A = nn.Parameter(torch.randn(D) / 2)

    def forward(self, x):
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.conv1d(u.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, padding=2, groups=D)[..., :T]
        u = F.silu(u).transpose(1, 2)
        dt = (self.dt_proj.weight @ self.x_proj(u).transpose(1, 2)).transpose(1, 2) + self.dt_proj.bias
        return u * torch.sigmoid(dt) * self.A.exp() + z


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer = Mixer()
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        return self.head(self.mixer(x).mean(1))


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g), torch.randint(0, 3, (B,), generator=g)


def test_served_from_the_first_step_with_the_reason_said() -> None:
    """The mixer holds bare parameters of its own, so its call of the first forward was captured: the
    layers it uses without calling them are found in that forward's graph and served at once."""
    torch.manual_seed(0)
    model = Net()
    x, y = _batch()
    said, records = watched_steps(model, [((x,), y), ((x,), y)])
    moved = [w for w in said if "never called" in w]
    assert moved and "Conv1d" in moved[0] and "Mixer (mixer)" in moved[0], said
    assert all(r.per_sample_uncovered == {} for r in records), [r.per_sample_uncovered for r in records]
    assert not [w for w in said if "do not add up" in w], said


def test_served_parameters_match_the_loop(device) -> None:
    torch.manual_seed(1)
    model = Net()
    x, y = _batch(1)
    assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), device=device)


def test_without_the_graph_they_are_served_from_the_second_step(monkeypatch) -> None:
    """Where the first forward's graph was not looked through, the end of backward finds them: left out of
    that step with the reason, served from the next. The harness sees the first step's gap."""
    from cockpit_lite.persample.engine import PerSampleEngine

    monkeypatch.setattr(PerSampleEngine, "_rehome_from_graph", lambda self, output: None)
    torch.manual_seed(1)
    x, y = _batch(1)
    said, (first, second) = watched_steps(Net(), [((x,), y), ((x,), y)])
    left = {"mixer.conv1d.weight", "mixer.conv1d.bias", "mixer.dt_proj.weight", "mixer.dt_proj.bias"}
    assert left <= set(first.per_sample_uncovered) and second.per_sample_uncovered == {}
    assert any("from the next step" in w for w in said), said
    torch.manual_seed(1)
    with pytest.raises(AssertionError):
        assert_matches_loop(Net(), x, y, nn.CrossEntropyLoss())
    torch.manual_seed(1)
    assert_matches_loop(Net(), x, y, nn.CrossEntropyLoss(), warmup=1)


def test_hf_mamba_served(device) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MambaConfig(
        vocab_size=32, hidden_size=8, state_size=4, num_hidden_layers=1, expand=2, conv_kernel=3, use_cache=False
    )
    lm = transformers.MambaForCausalLM(config)  # (train mode: no dropout in Mamba; the slow path on the CPU)

    class Last(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            return self.lm(input_ids=ids).logits[:, -1]

    model = Last()
    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 32, (3, 5), generator=g), torch.randint(0, 32, (3,), generator=g)
    assert_matches_loop(model, ids, y, nn.CrossEntropyLoss(), device=device)


class Outside(Net):
    """The time-step projection's weight used by the model, outside the mixer's forward: the mixer's replay
    cannot see it. Once its parameters move to the mixer, the forward's graph shows that use (outside every call
    of the mixer): the mixer is left out with that reason; without that look, the re-armed gradient-sum check
    says it."""

    def forward(self, x):
        h = self.mixer(x).mean(1)
        return self.head(h + F.linear(h[:, :R], self.mixer.dt_proj.weight))


def test_a_use_outside_the_ancestor_is_said_not_hidden() -> None:
    torch.manual_seed(2)
    model = Outside()
    x, y = _batch(2)
    said, records = watched_steps(model, [((x,), y)] * 3)
    assert any("never called" in w for w in said), said
    assert any("outside this layer's calls" in w and "mixer.dt_proj.weight" in w for w in said), said
    assert all("mixer.dt_proj.weight" in r.per_sample_uncovered for r in records)  # (no partial numbers)
    assert not [w for w in said if "do not add up" in w], said


def test_a_use_outside_the_ancestor_is_said_by_the_check_where_the_graph_is_not_looked_through(monkeypatch) -> None:
    from cockpit_lite.persample.engine import PerSampleEngine

    monkeypatch.setattr(PerSampleEngine, "_leave_out_outside_uses", lambda self, output: None)
    torch.manual_seed(2)
    model = Outside()
    x, y = _batch(2)
    said, _ = watched_steps(model, [((x,), y)] * 3)
    assert any("do not add up" in w and "dt_proj" in w for w in said), said


class Branch(nn.Module):
    """A layer called on some steps only, with p.grad zeroed (not set to None) between steps."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)
        self.A = nn.Parameter(torch.zeros(D))  # (bare parameters of its own, as the mixer's)
        self.use_b = True

    def forward(self, x):
        h = self.a(x) + self.A
        return self.b(h) if self.use_b else h


def test_a_layer_not_called_with_zeroed_gradients_stays_its_own() -> None:
    from cockpit_lite.instruments import PerSampleGradNorms

    from cockpit_lite import Cockpit

    torch.manual_seed(3)
    model = nn.Sequential(Branch(), nn.Flatten(), nn.Linear(T * D, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    x, y = _batch(3)
    with Cockpit(model, opt, loss_fn, instruments=[PerSampleGradNorms()], sinks=[]) as cockpit:
        for use_b in (True, False, True):
            model[0].use_b = use_b
            opt.zero_grad(set_to_none=False)
            loss_fn(model(x), y).backward()
            opt.step()
        assert model[0].b in cockpit.engine.handlers, "moved to its parent though it was only not called"


class Plain(nn.Module):
    """A module with no parameters of its own that uses its child's weight itself (SigLIP2's embeddings
    resize their position table's weight): it gets a handler, and hooks, from the second step."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(D, D)
        self.table = nn.Embedding(T, D)

    def forward(self, x):
        return self.inner(x) + F.interpolate(self.table.weight.T[None], size=T, mode="linear")[0].T


def test_a_parent_without_parameters_of_its_own_is_hooked_and_serves_them() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(Plain(), nn.Flatten(), nn.Linear(T * D, 3))
    x, y = _batch(4)
    said, records = watched_steps(model, [((x,), y)] * 2)
    assert any("never called" in w and "Plain (0)" in w for w in said), said
    assert "0.table.weight" in records[0].per_sample_uncovered and records[1].per_sample_uncovered == {}
    assert not [w for w in said if "do not add up" in w], said
    torch.manual_seed(4)
    assert_matches_loop(
        nn.Sequential(Plain(), nn.Flatten(), nn.Linear(T * D, 3)), x, y, nn.CrossEntropyLoss(), warmup=1
    )


class Partial(nn.Module):
    """Bare ``c`` split where it meets the batch; the never-called ``lin`` used through its weight in a forward
    that also returns rows no replay can split (three of the batch's tokens): ``lin`` is left out with that
    reason, ``c`` stays served (WavLM's attention, which returns its position bias over batch and heads)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.c = nn.Parameter(torch.randn(D) / 2)

    def forward(self, x):
        y = F.linear(x + self.c, self.lin.weight, self.lin.bias)
        return y, y.reshape(-1, D)[:3]


class PartialNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix, self.head = Partial(), nn.Linear(D, 3)

    def forward(self, x):
        y, rows = self.mix(x)
        return self.head(y.mean(1)) + rows.sum() * 0.0


def test_a_replay_that_fails_leaves_the_others_of_the_ancestor_served() -> None:
    torch.manual_seed(5)
    x, y = _batch(5)
    said, records = watched_steps(PartialNet(), [((x,), y)] * 2)
    for r in records:
        assert set(r.per_sample_uncovered) == {"mix.lin.weight", "mix.lin.bias"}, r.per_sample_uncovered
    assert any("its other parameters are served" in w and "mix.lin.weight" in w for w in said), said


class TiedUnused(nn.Module):
    """An output layer tied to the embedding and never called (the logits by the embedding's weight, in the
    forward): its weight is in the graph through the embedding's call, which serves it; nothing moves."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, D)
        self.out = nn.Linear(D, 11, bias=False)
        self.out.weight = self.embed.weight
        self.c = nn.Parameter(torch.zeros(D))  # (bare parameters of its own: an owner there would be)

    def forward(self, ids):
        return (self.embed(ids) + self.c).mean(1) @ self.embed.weight.T


def test_a_tied_layer_never_called_is_not_moved() -> None:
    torch.manual_seed(6)
    model = TiedUnused()
    ids, y = torch.randint(0, 11, (B, T)), torch.randint(0, 11, (B,))
    said, _ = watched_steps(model, [((ids,), y)] * 2)
    assert not [w for w in said if "never called" in w], said
