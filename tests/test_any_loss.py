"""Any loss (a functional loss in the loop, a loss inside the model, a Hugging-Face-style output, a
per-sample callable, a declared sum) and gradient accumulation: per-sample statistics against the
float64 loop over examples, with one definition of a sample (an example along the model input's
batch axis; g_i = N x its share of p.grad)."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cockpit_lite.instruments import Clipping, GradientTests, Loss
from torch import nn

from cockpit_lite import Cockpit, CockpitWarning, Need
from tests import models
from tests.reference import Probe

RTOL = 1e-5


def _loop(model, x, y, fn):
    """{name: (B, *shape)} float64 gradients of l_i = fn(model(x_i), y_i), one autograd call each."""
    m = copy.deepcopy(model).double()
    params = {n: p for n, p in m.named_parameters() if p.requires_grad}
    out = {n: [] for n in params}
    losses = []
    for i in range(len(x)):
        xi = x[i : i + 1].double() if torch.is_floating_point(x) else x[i : i + 1]
        li = fn(m(xi), y[i : i + 1])
        losses.append(float(li.detach()))
        for n, g, p in zip(
            params, torch.autograd.grad(li, list(params.values()), allow_unused=True), params.values(), strict=True
        ):
            out[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(v).cpu().numpy() for n, v in out.items()}, np.array(losses)


def _flat(grads):
    return np.concatenate([g.reshape(g.shape[0], -1) for g in grads.values()], axis=1)


def _check(rec, grads, losses=None, update=None):
    G = _flat(grads)
    np.testing.assert_allclose(rec.per_sample_sq_norms, (G**2).sum(1), rtol=RTOL, atol=1e-9)
    np.testing.assert_allclose(rec.per_sample_dot_mean, G @ G.mean(0), rtol=RTOL, atol=1e-9)
    if losses is not None:
        np.testing.assert_allclose(rec.per_sample_loss, losses, rtol=RTOL)
        np.testing.assert_allclose(rec.loss, losses.mean(), rtol=RTOL)
    if update is not None:
        d = np.concatenate([update[n].reshape(-1) for n in grads])
        np.testing.assert_allclose(rec.projections["update"], G @ d, rtol=1e-4, atol=1e-9)


FLAGS = {Need.LOSS, Need.PER_SAMPLE_LOSS, Need.UPDATE, Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_DOT_MEAN}


def _probe():
    return Probe(flags=set(FLAGS), directions={"update": lambda rec: rec.update})


def _data(b=7, device="cpu"):
    return torch.randn(b, 6).to(device), torch.randint(0, 3, (b,)).to(device)


# --- a functional loss in the loop, no loss_fn ---------------------------------------------------------
def test_functional_loss_without_loss_fn(device):
    torch.manual_seed(0)
    model, (x, y) = models.mlp().to(device), _data(device=device)
    grads, losses = _loop(model, x, y, F.cross_entropy)
    before = copy.deepcopy(model)
    probe = _probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Cockpit(model, opt, instruments=[probe, Loss()]) as ck:
        F.cross_entropy(model(x), y).backward()
        opt.step()
    rec = probe.records[0]
    update = {
        n: (p - q).detach().cpu().numpy()
        for (n, p), q in zip(model.named_parameters(), before.parameters(), strict=True)
    }
    _check(rec, grads, update=update)
    np.testing.assert_allclose(rec.loss, losses.mean(), rtol=RTOL)  # the root backward started from
    # F.cross_entropy in the loop: per-example losses from the saved inputs of its backward node
    np.testing.assert_allclose(rec.per_sample_loss, losses, rtol=RTOL)
    assert "note/loss" not in ck.history
    assert ck.history.last("loss") == pytest.approx(losses.mean(), rel=RTOL)


def test_declared_sum_reduction(device):
    torch.manual_seed(0)
    model, (x, y) = models.mlp().to(device), _data(device=device)
    grads, _ = _loop(model, x, y, F.cross_entropy)
    probe = _probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Cockpit(model, opt, instruments=[probe], reduction="sum"):
        F.cross_entropy(model(x), y, reduction="sum").backward()
        opt.step()
    G = _flat(grads)
    np.testing.assert_allclose(probe.records[0].per_sample_sq_norms, (G**2).sum(1), rtol=RTOL)  # g_i, not B g_i


# --- a loss inside the model ---------------------------------------------------------------------------
class LossInside(nn.Module):
    """nanoGPT's shape: forward(x, targets) returns (logits, loss)."""

    def __init__(self):
        super().__init__()
        self.net = models.mlp()

    def forward(self, x, targets=None):
        logits = self.net(x)
        return logits, (None if targets is None else F.cross_entropy(logits, targets))


class Output(OrderedDict):
    """A Hugging-Face-like ModelOutput: attribute and key access."""

    def __getattr__(self, name):
        return self.get(name)


class HFLike(nn.Module):
    """A sequence model with a causal-LM head: labels shifted inside, as Hugging Face heads do."""

    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, labels=None):
        logits = self.head(torch.tanh(self.mix(self.emb(input_ids))))
        out = Output(logits=logits)
        if labels is not None:
            out["loss"] = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return out


def test_loss_inside_forward_tuple(device):
    torch.manual_seed(0)
    model, (x, y) = LossInside().to(device), _data(device=device)
    grads, losses = _loop(model.net, x, y, F.cross_entropy)
    grads = {f"net.{n}": g for n, g in grads.items()}
    probe = _probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Cockpit(model, opt, instruments=[probe]):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
    _check(probe.records[0], grads, losses)  # per-sample losses derived from (logits, targets), exact


def test_hugging_face_style_output_with_labels(device):
    torch.manual_seed(0)
    model = HFLike().to(device)
    ids = torch.randint(0, 11, (5, 6)).to(device)
    labels = ids.clone()
    labels[0, 4:] = -100  # padding of the first sequence

    def seq_loss(m, i):
        logits = m(ids[i : i + 1]).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[i : i + 1, 1:].reshape(-1), reduction="sum")

    # reference: l_i = B x (sequence i's token losses) / (tokens counted in the batch)
    m64 = copy.deepcopy(model).double()
    n_tokens = int((labels[:, 1:] != -100).sum())
    params = dict(m64.named_parameters())
    rows, losses = [], []
    for i in range(5):
        li = seq_loss(m64, i) * 5 / n_tokens
        losses.append(float(li.detach()))
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(li, list(params.values()))]))
    G = torch.stack(rows).cpu().numpy()
    probe = _probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Cockpit(model, opt, instruments=[probe]):
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        opt.step()
    rec = probe.records[0]
    np.testing.assert_allclose(rec.per_sample_sq_norms, (G**2).sum(1), rtol=RTOL)
    np.testing.assert_allclose(rec.per_sample_dot_mean, G @ G.mean(0), rtol=RTOL, atol=1e-9)
    np.testing.assert_allclose(rec.per_sample_loss, losses, rtol=RTOL)
    assert len(rec.per_sample_loss) == 5  # sequences, never tokens


def test_a_per_sample_loss_callable(device):
    torch.manual_seed(0)
    model, (x, y) = models.mlp().to(device), _data(device=device)
    _, losses = _loop(model, x, y, F.cross_entropy)
    probe = _probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    per_sample = lambda out, inp: F.cross_entropy(out, y, reduction="none")  # noqa: E731
    with Cockpit(model, opt, loss_fn=per_sample, instruments=[probe]):
        F.cross_entropy(model(x), y).backward()
        opt.step()
    np.testing.assert_allclose(probe.records[0].per_sample_loss, losses, rtol=RTOL)


# --- gradient accumulation --------------------------------------------------------------------------------
@pytest.mark.parametrize("with_loss_fn", [True, False])
def test_accumulation_equals_the_loop_on_the_concatenated_batch(device, with_loss_fn):
    """4 micro-batches of 4 per step, (loss / 4).backward(), a scheduler and clip_grad_norm_: the step's
    statistics are those of its 16 examples; loss is the accumulated mean; clipping sees the
    accumulated gradient."""
    torch.manual_seed(0)
    model = models.mlp().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    loss_fn = nn.CrossEntropyLoss()
    probe = _probe()
    clip = Clipping(max_norm=0.05)
    steps = [_data(16, device) for _ in range(3)]
    records = []
    with Cockpit(model, opt, loss_fn if with_loss_fn else None, instruments=[probe, clip, GradientTests()]) as ck:
        for x, y in steps:
            theta = copy.deepcopy(model)
            opt.zero_grad()
            for k in range(4):
                xb, yb = x[4 * k : 4 * k + 4], y[4 * k : 4 * k + 4]
                out = model(xb)
                loss = loss_fn(out, yb) if with_loss_fn else F.cross_entropy(out, yb)
                (loss / 4).backward()
            accumulated = math.sqrt(sum(float((p.grad**2).sum()) for p in model.parameters()))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()
            sched.step()
            records.append((theta, x, y, accumulated))
    for step, (theta, x, y, accumulated) in enumerate(records):
        grads, losses = _loop(theta, x, y, F.cross_entropy)
        rec = probe.records[step]
        assert rec.batch_size == 16 and rec.micro_batches == [4, 4, 4, 4]
        G = _flat(grads)
        np.testing.assert_allclose(rec.per_sample_sq_norms, (G**2).sum(1), rtol=RTOL)
        np.testing.assert_allclose(rec.loss, losses.mean(), rtol=RTOL)
        if with_loss_fn:
            np.testing.assert_allclose(rec.per_sample_loss, losses, rtol=RTOL)
        np.testing.assert_allclose(ck.history["clip/global/norm"][step][1], accumulated, rtol=RTOL)
        # the probe asks for a projection, so every micro-batch's factors are kept from the start; a dot
        # product carries float32 round-off of its largest terms' size (a near-zero one on CUDA, too)
        dots = G @ G.mean(0)
        np.testing.assert_allclose(rec.per_sample_dot_mean, dots, rtol=RTOL, atol=RTOL * np.abs(dots).max())
        gbar = G.mean(0)
        norm_test = math.sqrt(((G - gbar) ** 2).sum() / (16 * 15 * (gbar @ gbar)))
        np.testing.assert_allclose(dict(ck.history["tests/norm"])[step], norm_test, rtol=1e-4)


def test_the_first_accumulated_step_says_what_it_leaves_out(device):
    """With nothing asking for projections and the first micro-batch's factors over the budget kept on
    trial (here 0 bytes), they are not kept before the cockpit knows the loop accumulates: that step's
    g_i . gbar is left out (a note naming the fix), later ones are exact."""
    torch.manual_seed(0)
    model = models.mlp().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Cockpit(model, opt, instruments=[GradientTests()]) as ck:
        ck.engine.trial_bytes = 0
        thetas, batches = [], []
        for _ in range(2):
            x, y = _data(8, device)
            thetas.append(copy.deepcopy(model))
            batches.append((x, y))
            opt.zero_grad()
            for k in range(2):
                (F.cross_entropy(model(x[4 * k : 4 * k + 4]), y[4 * k : 4 * k + 4]) / 2).backward()
            opt.step()
    notes = dict(ck.history["note/gradient_tests"])
    assert "first step with gradient accumulation" in notes[0] and 1 not in notes
    assert "over the 0 MiB" in notes[0] and "expect_accumulation()" in notes[0]
    grads, _ = _loop(thetas[1], *batches[1], F.cross_entropy)
    G = _flat(grads)
    gbar = G.mean(0)
    expected = math.sqrt(((G - gbar) ** 2).sum() / (8 * 7 * (gbar @ gbar)))
    np.testing.assert_allclose(dict(ck.history["tests/norm"])[1], expected, rtol=1e-4)


def test_grad_scaler_with_a_functional_loss(device):
    torch.manual_seed(0)
    model, (x, y) = models.mlp().to(device), _data(device=device)
    grads, losses = _loop(model, x, y, F.cross_entropy)
    probe = _probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(torch.device(device).type, init_scale=2.0**12)
    with Cockpit(model, opt, instruments=[probe]):
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
    rec = probe.records[0]
    assert rec.backward_scale == 2.0**12
    G = _flat(grads)
    np.testing.assert_allclose(rec.per_sample_sq_norms, (G**2).sum(1), rtol=RTOL)
    np.testing.assert_allclose(rec.loss, losses.mean(), rtol=RTOL)


def test_a_model_input_without_batch_axis_is_said_once(device):
    model = nn.Linear(3, 2).to(device)

    class NoBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = model

        def forward(self):
            return self.lin(torch.ones(4, 3, device=device)).sum()

    net = NoBatch()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.warns(CockpitWarning, match="no model input with a batch axis"):
        with Cockpit(net, opt, instruments=[GradientTests(), Loss()]) as ck:
            for _ in range(3):
                opt.zero_grad()
                net().backward()
                opt.step()
    assert len(ck.history["loss"]) == 3


def test_coverage_is_recorded_and_the_gradient_tests_say_what_they_cover(device):
    class Odd(nn.Module):
        """A layer whose forward the torch.func fallback cannot replay (an in-place buffer update)."""

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(5))
            self.register_buffer("count", torch.zeros(()))

        def forward(self, x):
            self.count.add_(1)
            return x * self.w

    from cockpit_lite.instruments import PerSampleGradNorms

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), Odd(), nn.Linear(5, 3)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data(8, device)
    with pytest.warns(CockpitWarning, match="leave out Odd"):
        with Cockpit(model, opt, instruments=[PerSampleGradNorms(), GradientTests()]) as ck:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            sq = {n: float((p.grad**2).sum()) for n, p in model.named_parameters()}
            opt.step()
    expected = 1.0 - sq["1.w"] / sum(sq.values())
    assert ck.history.last("persample/coverage") == pytest.approx(expected, rel=1e-6)
    assert "parameters left out" in ck.history.last("note/gradient_tests")
    assert math.isfinite(ck.history.last("tests/norm"))


def test_tracin_follows_a_loader_batch_split_into_micro_batches(device):
    """TracIn self-influence with a tracked loader whose batches the loop splits into two micro-batches
    equals that of the same run without splitting (the step's objective is the same mean)."""
    from cockpit_lite.instruments import TracIn
    from torch.utils.data import DataLoader, TensorDataset

    def run(split):
        torch.manual_seed(0)
        model = models.mlp().to(device)
        data = TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,)))
        loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        tracin = TracIn()
        with Cockpit(model, opt, nn.CrossEntropyLoss(), instruments=[tracin]) as ck:
            for x, y in ck.track(loader):
                x, y = x.to(device), y.to(device)
                opt.zero_grad()
                parts = [(x[:4], y[:4]), (x[4:], y[4:])] if split else [(x, y)]
                for xb, yb in parts:
                    (nn.functional.cross_entropy(model(xb), yb) / len(parts)).backward()
                opt.step()
        return tracin.self_influence()

    np.testing.assert_allclose(run(split=True), run(split=False), rtol=1e-5)


def test_an_iteration_abandoned_after_a_non_finite_loss_is_no_part_of_the_next_step(device):
    """The loop skips backward and step after a NaN loss; the next iteration's step is tracked as if the
    abandoned forward had not happened (batch size, loss, per-sample statistics)."""
    torch.manual_seed(0)
    model = models.mlp().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = _probe()
    x_bad, y_bad = _data(5, device)
    x, y = _data(7, device)
    grads, losses = _loop(model, x, y, F.cross_entropy)
    loss_fn = nn.CrossEntropyLoss()
    with Cockpit(model, opt, loss_fn, instruments=[probe, GradientTests()]) as ck:
        loss = loss_fn(model(x_bad), y_bad) * float("nan")
        if torch.isfinite(loss):  # the usual guard: skipped
            loss.backward()
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    rec = probe.records[0]
    assert rec.batch_size == 7 and rec.micro_batches == [7]
    G = _flat(grads)
    np.testing.assert_allclose(rec.per_sample_sq_norms, (G**2).sum(1), rtol=RTOL)
    np.testing.assert_allclose(rec.per_sample_loss, losses, rtol=RTOL)
    assert math.isfinite(ck.history.last("tests/norm"))


def test_a_loss_without_a_known_form_says_so(device):
    torch.manual_seed(0)
    model, (x, y) = models.mlp().to(device), _data(device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Cockpit(model, opt, instruments=[Loss()]) as ck:
        (model(x) - F.one_hot(y, 3)).pow(4).mean().backward()  # no module, no cross-entropy
        opt.step()
    assert "no per-sample losses" in ck.history.last("note/loss") and math.isfinite(ck.history.last("loss"))


# --- a model's own loss: candidates chosen on the host ---------------------------------------------------
def _hand_ce(logits, targets, ignore, shift, items=None):
    """A token cross-entropy written out (its backward root is no NLL node): mean over the counted
    targets, or their sum / ``items``."""
    lg, tg = (logits[:, :-1], targets[:, 1:]) if shift else (logits, targets)
    keep = tg != ignore
    logp = torch.log_softmax(lg.float(), -1).gather(-1, tg.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    total = -(logp * keep).sum()
    return total / (keep.sum() if items is None else items)


@pytest.mark.parametrize(
    "shift,ignore,items", [(0, -100, None), (1, -100, None), (1, -1, None), (1, -100, 13.0), (0, -1, 9.0)]
)
def test_derived_losses_pick_the_convention_that_reproduces_the_loss(device, shift, ignore, items):
    """Each convention (shift by one or not, -100 or -1 ignored, counted targets or num_items_in_batch):
    the chosen row is B x (sequence i's token losses) / normaliser, in float64 from a loop; the
    candidates are computed without reading any value on the host (the choice is made there)."""
    from cockpit_lite.losses import derived_losses

    torch.manual_seed(0)
    b, t, v = 4, 6, 7
    logits = torch.randn(b, t, v, device=device)
    targets = torch.randint(0, v, (b, t), device=device)
    targets[0, 3:] = ignore
    loss = _hand_ce(logits, targets, ignore, shift, items)
    kwargs = {"labels": targets} | ({"num_items_in_batch": items} if items is not None else {})
    derived = derived_losses({"logits": logits, "loss": loss}, (), kwargs, b)
    key, row = derived.choose(derived.rows.cpu().numpy(), derived.ok.cpu().numpy())
    assert key[:2] == (shift, ignore) and key[2] == ("items" if items is not None else "count")
    lg, tg = (logits[:, :-1], targets[:, 1:]) if shift else (logits, targets)
    n = items if items is not None else float((tg != ignore).sum())
    want = [
        b * float(F.cross_entropy(lg[i].double(), tg[i], ignore_index=ignore, reduction="sum")) / n for i in range(b)
    ]
    np.testing.assert_allclose(row, want, rtol=1e-5)
    # the convention alone, as the provider asks once it has matched: the same row
    alone = derived_losses({"logits": logits, "loss": loss}, (), kwargs, b, conventions=(key,))
    assert alone.keys == (key,)
    np.testing.assert_allclose(alone.rows[0].cpu().numpy(), row, rtol=1e-6)


def test_derived_losses_other_negative_targets_never_match(device):
    """Targets holding -1 and -100 both: no convention ignores both, none is chosen, and nothing raises
    (cross-entropy is never given an out-of-range target: on CUDA that is a device-side assert)."""
    from cockpit_lite.losses import derived_losses

    logits = torch.randn(2, 5, 4, device=device)
    targets = torch.randint(0, 4, (2, 5), device=device)
    targets[0, 0], targets[1, 1] = -1, -100
    loss = torch.tensor(1.0, device=device)
    derived = derived_losses((logits, loss), (None, targets), {}, 2)
    assert derived.choose(derived.rows.cpu().numpy(), derived.ok.cpu().numpy()) is None


class OwnLoss(nn.Module):
    """A causal LM returning (logits, loss) with its cross-entropy written out (no NLL node to read),
    normalised by ``num_items_in_batch`` where the loop gives it (Hugging Face's convention)."""

    def __init__(self, vocab=9, d=8):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab)

    def forward(self, ids, targets, num_items_in_batch=None):
        logits = self.head(torch.tanh(self.emb(ids)))
        return logits, _hand_ce(logits, targets, -100, 1, num_items_in_batch)


def test_a_models_own_loss_keeps_its_convention_and_says_when_it_changes(device):
    torch.manual_seed(0)
    model = OwnLoss().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    expected = []
    with Cockpit(model, opt, instruments=[Loss()], sinks=[]) as ck:
        for step in range(4):
            items = 50.0 if step >= 2 else None  # the loop starts passing num_items_in_batch at step 2
            ids = torch.randint(0, 9, (3, 5), generator=g).to(device)
            logits, loss = model(ids, ids, num_items_in_batch=items)
            n = items or float(ids[:, 1:].numel())
            lg = logits.detach().double()
            expected.append([3 * float(F.cross_entropy(lg[i, :-1], ids[i, 1:], reduction="sum")) / n for i in range(3)])
            loss.backward()
            opt.step()
            opt.zero_grad()
        provider = next(p for p in ck.providers if type(p).__name__ == "LossProvider")
        assert provider.convention == ((1, -100, "items"),)
    per_sample = dict(ck.history["loss/per_sample"])
    assert sorted(per_sample) == [0, 1, 3]  # step 2: the convention found before no longer matched
    for step in (0, 1, 3):
        np.testing.assert_allclose(per_sample[step], expected[step], rtol=1e-5)
    assert "no longer matches the definition" in dict(ck.history["note/loss"])[2]


def test_kl_div_batchmean_is_the_mean_over_examples_of_their_sums(device):
    """``KLDivLoss(reduction="batchmean")``: L = sum(u) / B, the mean over examples of each example's
    summed element losses (torch's recommended KL reduction). Per-sample gradients against the float64
    loop; per-sample losses against each example's own divergence, the batch loss their mean."""
    from tests.harness import assert_matches_loop

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(-1))
    x, target = torch.randn(5, 4), torch.softmax(torch.randn(5, 3), -1)
    loss_fn = nn.KLDivLoss(reduction="batchmean")
    checked = assert_matches_loop(model, x, target, loss_fn, device=device)
    assert not checked.warnings
    model, x, target = model.to(device), x.to(device), target.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    probe = Probe(flags={Need.LOSS, Need.PER_SAMPLE_LOSS})
    with Cockpit(model, opt, loss_fn, instruments=[probe], sinks=[]):
        loss = loss_fn(model(x), target)
        loss.backward()
        opt.step()
    rec = probe.records[0]
    with torch.no_grad():
        want = np.array([float(F.kl_div(model(x[i : i + 1]), target[i : i + 1], reduction="sum")) for i in range(5)])
    np.testing.assert_allclose(rec.per_sample_loss, want, rtol=1e-5)
    assert rec.loss == pytest.approx(float(loss), rel=1e-6) == pytest.approx(want.mean(), rel=1e-5)


# --- a loss module over a large prediction: per-row losses from the log-probabilities autograd saved ----------
@pytest.mark.parametrize(
    "kind", ["tokens mean", "tokens sum", "class weights", "ignore_index", "nll", "label smoothing", "small"]
)
def test_loss_module_losses_from_its_saved_log_probabilities(device, kind, monkeypatch):
    """A CrossEntropyLoss / NLLLoss module over a (B, C, T) prediction: the per-sample losses are read from its
    backward node (no second log-softmax) where it is large, and equal each example's float64 loss as a batch
    of one, scaled as the batch's mean normalises it; label smoothing (another loss) and small predictions
    compute them again, with the same numbers."""
    from cockpit_lite import losses as L

    taken = []
    original = L.nll_losses

    def spy(*args, **kwargs):
        taken.append(True)
        return original(*args, **kwargs)

    monkeypatch.setattr(L, "nll_losses", spy)
    if kind != "small":
        monkeypatch.setattr(L, "SAVED_NLL_ELEMENTS", 64)
    torch.manual_seed(0)
    b, c, t = 5, 7, 6
    model = nn.Sequential(nn.Conv1d(3, c, 1))  # (B, 3, T) -> (B, C, T): logits per position
    x, y = torch.randn(b, 3, t, device=device), torch.randint(0, c, (b, t), device=device)
    if kind == "ignore_index":
        y[1, :4] = -100
    kw = {"reduction": "sum" if kind == "tokens sum" else "mean"}
    if kind == "class weights":
        kw["weight"] = torch.rand(c, device=device) + 0.5
    if kind == "label smoothing":
        kw["label_smoothing"] = 0.1
    loss_fn = nn.NLLLoss(**kw) if kind == "nll" else nn.CrossEntropyLoss(**kw)
    head = (lambda z: F.log_softmax(z, 1)) if kind == "nll" else (lambda z: z)
    probe = _probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with Cockpit(model, opt, loss_fn, instruments=[probe]):
        loss_fn(head(model(x)), y).backward()
        opt.step()
    assert taken == ([True] if kind not in ("label smoothing", "small") else [])
    # float64: the loss's element sums per example, normalised by the batch's (mean: B / its counted weight)
    m, lf = copy.deepcopy(model).double(), copy.deepcopy(loss_fn).double()
    lf.reduction = "none"
    u = lf(head(m(x.double())), y).reshape(b, -1)
    per = u.sum(1)
    if kw["reduction"] == "mean":
        w = (y != -100).double() * (kw["weight"].double()[y.clamp(min=0)] if "weight" in kw else 1.0)
        per = per * b / w.sum()
    np.testing.assert_allclose(probe.records[0].per_sample_loss, per.detach().cpu().numpy(), rtol=RTOL)


def test_loss_module_losses_of_a_large_prediction_without_a_graph():
    """Under no_grad (an evaluation) or on detached logits the loss has no backward node to read: the per-sample
    losses are computed again, the same numbers."""
    from cockpit_lite.losses import per_sample_losses

    torch.manual_seed(0)
    x, y = torch.randn(4, 512, 64), torch.randint(0, 512, (4, 64))
    lf = nn.CrossEntropyLoss()
    want = F.cross_entropy(x.double(), y, reduction="none").sum(1) * 4 / y.numel()
    with torch.no_grad():
        out = lf(x, y)
    np.testing.assert_allclose(per_sample_losses(lf, (x, y), {}, out), want.numpy(), rtol=RTOL)
    xg = x.clone().requires_grad_(True)
    out = lf(xg, y)
    np.testing.assert_allclose(per_sample_losses(lf, (xg, y), {}, out), want.numpy(), rtol=RTOL)
