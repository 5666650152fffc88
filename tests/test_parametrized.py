"""Layers whose weight is computed by torch.nn.utils.parametrize (weight_norm, orthogonal, spectral_norm): the
per-sample gradients of the parameters the optimizer trains (the originals), by the chain rule from the layer's
own per-sample gradients, against the float64 loop; training unchanged (spectral_norm's power iteration too)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from cockpit_lite.instruments import Distance, GradientTests, GradNorm, Loss, PerSampleGradNorms, UpdateSize
from torch import nn
from torch.nn.utils import parametrizations

from cockpit_lite import Cockpit, Need
from tests.harness import _run, assert_matches_loop, shares_loop, watched_steps

B = 5


class PositionalConv(nn.Module):
    """wav2vec2's positional convolution: a grouped, padded Conv1d with weight_norm over its kernel axis
    (dim=2), then a Linear head on the pooled features."""

    def __init__(self, frozen_gain: bool = False):
        super().__init__()
        self.conv = parametrizations.weight_norm(nn.Conv1d(4, 4, 3, padding=1, groups=2), name="weight", dim=2)
        if frozen_gain:
            self.conv.parametrizations.weight.original0.requires_grad_(False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).mean(2))


class Reparametrised(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.a, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        if kind == "weight_norm":
            parametrizations.weight_norm(self.a)
        elif kind == "orthogonal":
            parametrizations.orthogonal(self.a)
        elif kind == "spectral_norm":
            parametrizations.spectral_norm(self.a)
            parametrizations.spectral_norm(self.head)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x)))


MODELS = {
    "weight_norm": (lambda: Reparametrised("weight_norm"), (B, 4)),
    "orthogonal": (lambda: Reparametrised("orthogonal"), (B, 4)),
    "spectral_norm in train mode": (lambda: Reparametrised("spectral_norm"), (B, 4)),
    "spectral_norm in eval mode": (lambda: Reparametrised("spectral_norm").eval(), (B, 4)),
    "wav2vec2 positional conv": (PositionalConv, (B, 4, 7)),
    "weight_norm with a frozen gain": (lambda: PositionalConv(frozen_gain=True), (B, 4, 7)),
}


@pytest.mark.parametrize("case", [c for c in MODELS if c != "spectral_norm in train mode"])
def test_the_originals_of_a_parametrized_layer_are_exact(case, device):
    build, shape = MODELS[case]
    torch.manual_seed(0)
    model = build()
    checked = assert_matches_loop(
        model, torch.randn(*shape), torch.randint(0, 3, (B,)), nn.CrossEntropyLoss(), device=device
    )
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(checked.record.per_sample_sq_norms_by_param) == trained
    assert not checked.warnings, checked.warnings


def _train(model: nn.Module, batches, instruments) -> list:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    cockpit = Cockpit(model, opt, loss_fn, instruments=instruments, sinks=[]) if instruments is not None else None
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    if cockpit is not None:
        cockpit.close()
    return [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]


@pytest.mark.parametrize("case", ["spectral_norm in train mode", "wav2vec2 positional conv"])
def test_training_is_unchanged_and_nothing_is_left_out(case):
    """Parameters and buffers (spectral_norm's u and v, updated by each forward's power iteration)
    bit-identical to plain training; every statistic served, with no warning."""
    build, shape = MODELS[case]
    torch.manual_seed(1)
    batches = [(torch.randn(*shape), torch.randint(0, 3, (B,))) for _ in range(4)]
    torch.manual_seed(0)
    plain = _train(build(), batches, None)
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched = _train(
            build(), batches, [Loss(), GradNorm(), UpdateSize(), Distance(), GradientTests(), PerSampleGradNorms()]
        )
    assert all(torch.equal(a, b) for a, b in zip(plain, watched, strict=True))
    said = [str(w.message) for w in caught if "cockpit-lite" in str(w.message)]
    assert not said, said


class OwnLayer(nn.Module):
    """A layer of the user's (no layer rule: replayed by torch.func), its weight parametrized."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4) / 2)

    def forward(self, x):
        return torch.tanh(x @ self.weight.T)


def test_a_parametrized_layer_of_the_users_is_replayed_with_its_originals(device):
    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.weight_norm(OwnLayer()), nn.Linear(4, 3))
    checked = assert_matches_loop(
        model, torch.randn(B, 4), torch.randint(0, 3, (B,)), nn.CrossEntropyLoss(), device=device
    )
    assert set(checked.record.per_sample_sq_norms_by_param) == {n for n, _ in model.named_parameters()}
    assert not checked.warnings, checked.warnings


def test_spectral_norm_in_train_mode_against_the_loop_at_the_iterates_its_forward_used():
    """In train mode each forward runs a power iteration on spectral_norm's u and v, then uses them: the
    float64 loop runs on the model as the step left it, in eval mode (the same u and v, no iteration)."""
    torch.manual_seed(0)
    model = Reparametrised("spectral_norm")
    x, y = torch.randn(B, 4), torch.randint(0, 3, (B,))
    before = [b.clone() for b in model.buffers()]
    used = {}  # the iterates the forward used: the buffers as its power iterations left them
    model.register_forward_hook(lambda m, a, out: used.update({n: b.clone() for n, b in m.named_buffers()}))
    recorder, said = _run(model, (x,), y, nn.CrossEntropyLoss(), list(model.parameters()), {})
    assert not any(torch.equal(a, b) for a, b in zip(before, model.buffers(), strict=True))  # (it iterated)
    assert all(torch.equal(used[n], b) for n, b in model.named_buffers())  # (and nothing else did)
    names = [n for n, _ in model.named_parameters()]
    reference = copy.deepcopy(model).eval()
    reference.load_state_dict({**reference.state_dict(), **used})
    want = shares_loop(reference, x, y, nn.CrossEntropyLoss(), names)
    got = recorder.record.per_sample_sq_norms_by_param
    for n in names:
        ref = (want[n].reshape(B, -1) ** 2).sum(1)
        assert np.allclose(got[n], ref, rtol=1e-5, atol=1e-7 * ref.max()), (n, got[n], ref)
    assert not [m for m in said if "cockpit-lite" in m], said


class Wav2Vec2Logits(nn.Module):
    """A tiny random-weight wav2vec2 classifier (transformers): its positional convolution is weight-normed
    (``parametrizations.weight_norm``, dim=2, grouped), its feature encoder GroupNorm-ed convolutions."""

    def __init__(self):
        super().__init__()
        from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

        config = Wav2Vec2Config(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
            conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
            mask_time_prob=0.0, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
            feat_proj_dropout=0.0, layerdrop=0.0, final_dropout=0.0, num_labels=3, classifier_proj_size=8,
        )  # fmt: skip
        self.model = Wav2Vec2ForSequenceClassification(config)

    def forward(self, audio):
        return self.model(audio).logits


def test_wav2vec2_is_served_whole():
    torch.manual_seed(0)
    model = Wav2Vec2Logits()
    checked = assert_matches_loop(model, torch.randn(4, 400), torch.randint(0, 3, (4,)), nn.CrossEntropyLoss())
    assert any("parametrizations" in n for n in checked.record.per_sample_sq_norms_by_param)
    assert set(checked.record.per_sample_sq_norms_by_param) == {n for n, _ in model.named_parameters()}
    assert not checked.warnings, checked.warnings


def test_a_parametrized_layer_over_the_formed_bytes_is_left_out_with_its_reason(monkeypatch):
    from cockpit_lite.persample import parametrized

    monkeypatch.setattr(parametrized, "FORMED_BYTES", 16)
    torch.manual_seed(0)
    said, records = watched_steps(Reparametrised("weight_norm"), [((torch.randn(B, 4),), torch.randint(0, 3, (B,)))])
    said = [m for m in said if "leave out" in m]
    assert said and all("a parametrized Linear's weight are formed" in m and "Error" not in m for m in said), said
    assert records[0].per_sample_uncovered and "head.weight" not in records[0].per_sample_uncovered


def test_an_accumulated_step_joins_the_originals_of_every_micro_batch():
    """Two micro-batches of 2 and 5 examples: the step's joined views hold every example's gradient of the
    originals (their Gram and squared norms against the float64 loop over the 7)."""
    from tests.reference import assert_accumulated_views_match_loop

    torch.manual_seed(0)
    assert_accumulated_views_match_loop(PositionalConv(), torch.randn(7, 4, 7), torch.randint(0, 3, (7,)), [2, 5])


class TwiceNormed(nn.Module):
    """A spectral-normed layer called twice in one forward in train mode: each call's W has its own u, v."""

    def __init__(self):
        super().__init__()
        self.a, self.head = parametrizations.spectral_norm(nn.Linear(4, 4)), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.a(torch.tanh(self.a(x)))))


def test_a_w_that_cannot_be_recomputed_is_left_out_with_its_reason():
    torch.manual_seed(0)
    said, records = watched_steps(TwiceNormed(), [((torch.randn(B, 4),), torch.randint(0, 3, (B,)))])
    said = [m for m in said if "leave out" in m]
    assert said and all("power iteration" in m for m in said), said
    assert records[0].per_sample_uncovered and "head.weight" not in records[0].per_sample_uncovered
    assert records[0].per_sample_sq_norms is not None


class OldWeightNorm(nn.Module):
    """The older torch.nn.utils.weight_norm (a forward pre-hook, still in many vocoders): a Linear and a Conv1d
    normed over its kernel axis (their layer rules and the chain rule) and a ConvTranspose1d (no layer rule:
    its torch.func replay runs the pre-hook on the replayed weight_g and weight_v)."""

    def __init__(self):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.a = nn.utils.weight_norm(nn.Linear(4, 6))
            self.c = nn.utils.weight_norm(nn.Conv1d(6, 6, 3, padding=1), dim=2)
            self.t = nn.utils.weight_norm(nn.ConvTranspose1d(6, 6, 3))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x)).transpose(1, 2)
        return self.head(torch.tanh(self.t(torch.tanh(self.c(h)))).mean(2))


def _probed_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, flags: set) -> tuple:
    """One step at lr 0 with a probe asking ``flags``: (its step record, the warnings said)."""
    from tests.reference import Probe

    probe = Probe(flags=flags)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cockpit = Cockpit(model, opt, nn.CrossEntropyLoss(), instruments=[probe], sinks=[])
        opt.zero_grad()
        nn.CrossEntropyLoss()(model(x), y).backward()
        opt.step()
        cockpit.close()
    return probe.records[0], caught


def test_the_older_weight_norm_is_exact_where_its_layer_has_a_rule():
    """Against a float64 loop over the examples of a twin built from the same seed (the harness deep-copies
    the model, which the older weight_norm does not allow)."""
    torch.manual_seed(0)
    model = OldWeightNorm()
    torch.manual_seed(0)
    twin = OldWeightNorm().double()
    x, y = torch.randn(B, 7, 4), torch.randint(0, 3, (B,))
    record, caught = _probed_step(model, x, y, {Need.PER_SAMPLE_SQ_NORMS_BY_PARAM})
    got = record.per_sample_sq_norms_by_param
    params = dict(twin.named_parameters())
    for i in range(B):
        loss = nn.CrossEntropyLoss()(twin(x[i : i + 1].double()), y[i : i + 1])
        for name, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
            want = float(g.square().sum())
            assert abs(got[name][i] - want) <= 1e-4 * want + 1e-10, (name, i, got[name][i], want)
    assert set(got) == set(params)
    assert not [str(w.message) for w in caught if "cockpit-lite" in str(w.message)]
    # the replayed ConvTranspose1d's weight is the one its pre-hook set in the user's forward, not the replay's
    assert not torch._C._functorch.is_functorch_wrapped_tensor(model.t.weight)


class Upsampler(nn.Module):
    """HiFi-GAN's upsampler as transformers' SpeechT5HifiGan builds it: ConvTranspose1d (no layer rule:
    replayed by torch.func) with parametrizations.weight_norm, and one with spectral_norm."""

    def __init__(self, spectral: bool = False):
        super().__init__()
        self.inp = nn.Conv1d(4, 6, 3, padding=1)
        norm = parametrizations.spectral_norm if spectral else parametrizations.weight_norm
        self.up = norm(nn.ConvTranspose1d(6, 6, 4, stride=2))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.up(torch.tanh(self.inp(x)))).mean(2))


@pytest.mark.parametrize("spectral", [False, True], ids=["weight_norm", "spectral_norm-eval"])
def test_a_parametrized_layer_without_a_layer_rule_is_replayed_with_its_originals(spectral, device):
    torch.manual_seed(0)
    model = Upsampler(spectral)
    if spectral:
        model.eval()  # (the float64 loop runs the forward again: train mode would iterate u and v there)
    checked = assert_matches_loop(
        model, torch.randn(B, 4, 5), torch.randint(0, 3, (B,)), nn.CrossEntropyLoss(), device=device
    )
    assert set(checked.record.per_sample_sq_norms_by_param) == {n for n, _ in model.named_parameters()}
    assert not checked.warnings, checked.warnings


def test_a_spectral_normed_layer_without_a_layer_rule_leaves_training_unchanged():
    torch.manual_seed(1)
    batches = [(torch.randn(B, 4, 5), torch.randint(0, 3, (B,))) for _ in range(3)]
    torch.manual_seed(0)
    plain = _train(Upsampler(spectral=True), batches, None)
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched = _train(Upsampler(spectral=True), batches, [GradientTests(), PerSampleGradNorms()])
    assert all(torch.equal(a, b) for a, b in zip(plain, watched, strict=True))
    assert not [str(w.message) for w in caught if "cockpit-lite" in str(w.message)]


def _old_spectral(layer: nn.Module, **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return nn.utils.spectral_norm(layer, **kw)


class OldSpectral(nn.Module):
    """A GAN discriminator's layers under the older torch.nn.utils.spectral_norm (a forward pre-hook that
    iterates u and v in train mode): a Conv2d normed over its input channels (dim=1: the weight's matrix
    permuted) and a Linear (their layer rules and the chain rule), and with ``no_rule`` a ConvTranspose1d
    (no layer rule: its torch.func replay runs the pre-hook, without the power iteration)."""

    def __init__(self, no_rule: bool = False):
        super().__init__()
        self.c = _old_spectral(nn.Conv2d(3, 4, 3, padding=1), dim=1)
        self.a = _old_spectral(nn.Linear(4, 6))
        self.t = _old_spectral(nn.ConvTranspose1d(6, 6, 3)) if no_rule else None
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(torch.tanh(self.c(x)).mean((2, 3))))
        if self.t is not None:
            h = torch.tanh(self.t(h[:, :, None])).mean(2)
        return self.head(h)


@pytest.mark.parametrize("no_rule", [False, True], ids=["layer rules", "with a replayed layer"])
@pytest.mark.parametrize("train", [True, False], ids=["train mode", "eval mode"])
def test_the_older_spectral_norm_is_exact(train, no_rule):
    """Against a float64 loop over the examples, one autograd call each, of a twin built from the same seed
    holding the u and v the step's forward used (after its power iteration in train mode), in eval mode:
    W = W_orig / (u^T W_orig v) with those u and v."""
    torch.manual_seed(0)
    model = OldSpectral(no_rule).train(train)
    torch.manual_seed(0)
    twin = OldSpectral(no_rule).double()
    x, y = torch.randn(B, 3, 5, 5), torch.randint(0, 3, (B,))
    before = [b.clone() for b in model.buffers()]
    record, caught = _probed_step(model, x, y, {Need.PER_SAMPLE_SQ_NORMS_BY_PARAM, Need.PER_SAMPLE_DOT_MEAN})
    assert any(not torch.equal(a, b) for a, b in zip(before, model.buffers(), strict=True)) == train
    twin.load_state_dict({n: t.double() for n, t in model.state_dict().items()})  # (the iterates used)
    twin.eval()
    params = dict(twin.named_parameters())
    rows = []
    for i in range(B):
        loss = nn.CrossEntropyLoss()(twin(x[i : i + 1].double()), y[i : i + 1])
        rows.append(torch.autograd.grad(loss, list(params.values())))
    got = record.per_sample_sq_norms_by_param
    assert set(got) == set(params) and {"c.weight_orig", "a.weight_orig"} <= set(got)
    for k, name in enumerate(params):
        want = np.array([float(r[k].square().sum()) for r in rows])
        assert np.allclose(got[name], want, rtol=1e-4, atol=1e-9 * want.max()), (name, got[name], want)
    flat = torch.stack([torch.cat([g.flatten() for g in r]) for r in rows])
    want = (flat @ flat.mean(0)).numpy()
    assert np.allclose(record.per_sample_dot_mean, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert not [str(w.message) for w in caught if "cockpit-lite" in str(w.message)]


def test_the_older_spectral_norm_leaves_training_unchanged():
    """Bit-identical parameters and buffers (u and v iterated by the user's forwards alone, also around the
    replayed ConvTranspose1d), every statistic served, no warning."""
    torch.manual_seed(1)
    batches = [(torch.randn(B, 3, 5, 5), torch.randint(0, 3, (B,))) for _ in range(3)]
    torch.manual_seed(0)
    plain = _train(OldSpectral(no_rule=True), batches, None)
    torch.manual_seed(0)
    model = OldSpectral(no_rule=True)
    instruments = [Loss(), GradNorm(), UpdateSize(), Distance(), GradientTests(), PerSampleGradNorms()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched = _train(model, batches, instruments)
    assert all(torch.equal(a, b) for a, b in zip(plain, watched, strict=True))
    assert not [str(w.message) for w in caught if "cockpit-lite" in str(w.message)]
    # the tensor the hook set in the user's forward is put back after a replay (not one of torch.func's)
    assert not torch._C._functorch.is_functorch_wrapped_tensor(model.t.weight)


class TwoForwards(nn.Module):
    """D(real) and D(fake) before one backward, as a GAN's discriminator step: the older spectral_norm
    iterates u and v at each call, so the first call's W cannot be recomputed at its backward."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.d = nn.Sequential(_old_spectral(layer), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))

    def forward(self, x):
        return self.d(x) + self.d(x.flip(0))


@pytest.mark.parametrize("layer", ["Linear", "ConvTranspose1d"])
def test_the_older_spectral_norm_called_twice_is_left_out_with_its_reason(layer):
    torch.manual_seed(0)
    model, x = (
        (TwoForwards(nn.Linear(4, 4)), torch.randn(B, 4))
        if layer == "Linear"
        else (TwoForwards(nn.ConvTranspose1d(2, 2, 3)), torch.randn(B, 2, 3))
    )
    model(x)  # (the lazy head's shape)
    said, records = watched_steps(model, [((x,), torch.randint(0, 3, (B,)))])
    said = [m for m in said if "leave out" in m]
    assert said and all("power iteration" in m and layer in m for m in said), said
    assert set(records[0].per_sample_uncovered) == {"d.0.weight_orig", "d.0.bias"}
