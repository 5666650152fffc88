"""Gradient accumulation, joined over every example of the step: Gram entries N x N (the blocks across
micro-batches included), materialised g_i, TracIn's probe cross products, g_i . gbar on the first
accumulated step, and train-mode BatchNorm with several micro-batches (the coupled path).

Reference: a float64 loop over the step's N examples with one autograd call each. A sample is an
example of the concatenated batch; the loop scales micro-batch k's loss so that p.grad is the mean
over the N examples (``loss_k * B_k / N``, as Hugging Face's ``num_items_in_batch`` does; unequal
micro-batch sizes), or sums it (``reduction="sum"``), so g_i = d l_i / d theta. With train-mode
BatchNorm, l_i is computed in micro-batch k's forward (its own batch statistics) and g_i is
``autograd.grad(l_i, params, retain_graph=True)`` through that forward. Training is bit-identical with
and without the cockpit in every test (parameters and buffers compared with ``torch.equal``).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cockpit_lite.instruments import Clipping, GradientTests, TracIn
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cockpit_lite import Cockpit, CockpitWarning, Need
from cockpit_lite.persample.views import JoinedView
from cockpit_lite.providers.persample import NORMS_EVERY
from tests import models
from tests.reference import Probe, assert_accumulated_views_match_loop, flat, per_sample_grads_loop

RTOL = 1e-5
ALL = {
    Need.LOSS,
    Need.UPDATE,
    Need.PER_SAMPLE_SQ_NORMS,
    Need.PER_SAMPLE_DOT_MEAN,
    Need.PER_SAMPLE_GRAM_BY_PARAM,
    Need.PER_SAMPLE_GRADS,
}


def _split(x, y, sizes):
    """The micro-batches of sizes ``sizes`` (in order)."""
    cuts = np.cumsum([0, *sizes])
    return [(x[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def _accumulate(model, opt, sched, batches, sizes, loss_fn, clip=None):
    """One optimizer step per batch, each accumulated over micro-batches of ``sizes``; returns theta_t
    (a copy) and the batch of every step."""
    reduction = loss_fn.reduction
    steps = []
    for x, y in batches:
        steps.append((copy.deepcopy(model), x, y))
        opt.zero_grad()
        for xb, yb in _split(x, y, sizes):
            loss = loss_fn(model(xb), yb)
            (loss * len(yb) / len(y) if reduction == "mean" else loss).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()
    return steps


def _assert_same_training(model, plain):
    for (n, a), b in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{n} differs from training without the cockpit"


MODELS = {
    "mlp": (models.mlp, lambda n, g: torch.randn(n, 6, generator=g)),
    "cnn": (models.GroupedCNN, lambda n, g: torch.randn(n, 2, 8, 8, generator=g)),
    "transformer": (models.TinyTransformer, lambda n, g: torch.randint(1, 11, (n, 6), generator=g)),
}


# --- 1. Gram entries, g_i and the clipping cosine over the whole step --------------------------------------
@pytest.mark.parametrize(
    "arch,sizes,reduction",
    [
        ("mlp", [3, 5, 2, 2], "mean"),
        ("mlp", [4, 4], "sum"),
        ("cnn", [2, 4, 3], "mean"),
        ("transformer", [3, 2], "mean"),
    ],
)
def test_gram_and_grads_are_joined_over_the_micro_batches(device, arch, sizes, reduction):
    """The N x N Gram per parameter (blocks of two micro-batches included), g_i, squared norms, g_i . gbar
    (the first step too) and the per-sample clipping cosine (from the Gram) against the float64 loop,
    with momentum, clip_grad_norm_ and a scheduler; the same training as without the cockpit."""
    factory, data = MODELS[arch]
    g = torch.Generator().manual_seed(0)
    n = sum(sizes)
    batches = [(data(n, g).to(device), torch.randint(0, 3, (n,), generator=g).to(device)) for _ in range(3)]
    torch.manual_seed(0)
    model = factory().to(device)
    plain = copy.deepcopy(model)

    def optim(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    probe = Probe(flags=set(ALL))
    clipping = Clipping(per_sample_clip=0.5, kinds=("per_sample",), cosine_every=1)
    opt, sched = optim(model)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    with Cockpit(model, opt, loss_fn, instruments=[probe, clipping]) as ck:
        steps = _accumulate(model, opt, sched, batches, sizes, loss_fn, clip=1.0)
    popt, psched = optim(plain)
    _accumulate(plain, popt, psched, batches, sizes, loss_fn, clip=1.0)
    _assert_same_training(model, plain)

    assert "note/clipping" not in ck.history and "note/probe" not in ck.history
    one = nn.CrossEntropyLoss()
    for step, (theta, x, y) in enumerate(steps):
        rec = probe.records[step]
        assert rec.micro_batches == sizes and rec.batch_size == n
        ref = per_sample_grads_loop(theta, one, x, y)
        G = flat(ref)
        gram = G @ G.T
        scale = np.abs(gram).max()
        np.testing.assert_allclose(rec.per_sample_gram, gram, rtol=RTOL, atol=RTOL * scale)
        for name, gn in ref.items():
            gf = gn.reshape(n, -1)
            np.testing.assert_allclose(
                rec.per_sample_gram_by_param[name], gf @ gf.T, rtol=RTOL, atol=RTOL * scale, err_msg=name
            )
            got = rec.per_sample_grads[name].detach().double().cpu().numpy()
            np.testing.assert_allclose(got, gn, rtol=RTOL, atol=RTOL * np.abs(gn).max() + 1e-9, err_msg=name)
        np.testing.assert_allclose(rec.per_sample_sq_norms, (G**2).sum(1), rtol=RTOL)
        gbar = G.mean(0)  # g_i . gbar with gbar = mean_j g_j (for either reduction)
        np.testing.assert_allclose(rec.per_sample_dot_mean, G @ gbar, rtol=RTOL, atol=RTOL * np.abs(G @ gbar).max())
        # the cosine between the per-sample-clipped sum and the plain sum, formed directly from g_i
        f = np.minimum(1.0, 0.5 / (np.linalg.norm(G, axis=1) + 1e-6))
        clipped, whole = f @ G, G.sum(0)
        cos = clipped @ whole / (np.linalg.norm(clipped) * np.linalg.norm(whole))
        assert dict(ck.history["clip/per_sample/cosine"])[step] == pytest.approx(cos, rel=1e-6, abs=1e-9)


def test_gram_of_tied_embeddings_and_bare_broadcast_parameters(device):
    """nanoGPT-style tied embeddings (TiedEmbeddingView) and a position table broadcast over the batch:
    Gram entries across micro-batches against the float64 loop."""
    from tests.models_lm import NanoGPT, token_batch

    torch.manual_seed(0)
    model = NanoGPT(vocab_size=13, block_size=8, n_layer=1, n_head=2, d=8, dropout=0.0).to(device)
    idx, tgt = (t.to(device) for t in token_batch(b=6, t=8, vocab=13, seed=1))
    probe = Probe(flags={Need.PER_SAMPLE_GRAM_BY_PARAM, Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_DOT_MEAN})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    theta = copy.deepcopy(model).double()
    with Cockpit(model, opt, instruments=[probe]):
        for ib, tb in _split(idx, tgt, [2, 4]):
            _, loss = model(ib, tb)
            (loss * len(ib) / 6).backward()
        opt.step()
    params = dict(theta.named_parameters())
    rows = []
    for i in range(6):
        _, li = theta(idx[i : i + 1], tgt[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(li, list(params.values()))]))
    G = torch.stack(rows).detach().cpu().numpy()
    rec = probe.records[0]
    gram = sum(rec.per_sample_gram_by_param.values())
    np.testing.assert_allclose(gram, G @ G.T, rtol=1e-5, atol=1e-5 * np.abs(G @ G.T).max())
    np.testing.assert_allclose(
        rec.per_sample_dot_mean, G @ G.mean(0), rtol=1e-5, atol=1e-5 * np.abs(G @ G.mean(0)).max()
    )


# --- 1. TracIn over every example of the step ---------------------------------------------------------------
def _tracin_run(arch, sizes, expect=False, batch=None, device="cpu"):
    factory, data = MODELS[arch]
    n_data, n_probes = 20, 3
    batch = batch or sum(sizes)
    g = torch.Generator().manual_seed(0)
    X, Y = data(n_data, g), torch.randint(0, 3, (n_data,), generator=g)
    Xp, Yp = data(n_probes, g), torch.randint(0, 3, (n_probes,), generator=g)
    torch.manual_seed(0)
    model = factory().to(device)
    plain = copy.deepcopy(model)
    head = [p for name, p in model.named_parameters() if name.startswith(("0.", "conv1.", "emb."))]
    rest = [p for name, p in model.named_parameters() if not name.startswith(("0.", "conv1.", "emb."))]
    opt = torch.optim.SGD([{"params": head, "lr": 0.05}, {"params": rest, "lr": 0.02}], lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    tracin = TracIn(probes=(Xp.to(device), Yp.to(device)))
    loader = DataLoader(TensorDataset(X, Y), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(1))
    steps = []
    with Cockpit(model, opt, loss_fn, instruments=[tracin]) as ck:
        if expect:
            ck.engine.expect_accumulation()
        for x, y in ck.track(loader):
            rows = [int(torch.nonzero((X == xi).flatten(1).all(1))[0]) for xi in x]
            x, y = x.to(device), y.to(device)
            steps.append((copy.deepcopy(model), rows, [grp["lr"] for grp in opt.param_groups]))
            opt.zero_grad()
            cut = sizes if sum(sizes) == len(y) else [len(y)]
            for xb, yb in _split(x, y, cut):
                (loss_fn(model(xb), yb) * len(yb) / len(y)).backward()
            opt.step()
    # the same training without the cockpit
    popt = torch.optim.SGD(
        [
            {
                "params": [p for nm, p in plain.named_parameters() if nm.startswith(("0.", "conv1.", "emb."))],
                "lr": 0.05,
            },
            {
                "params": [p for nm, p in plain.named_parameters() if not nm.startswith(("0.", "conv1.", "emb."))],
                "lr": 0.02,
            },
        ],
        lr=0.05,
    )
    for x, y in DataLoader(
        TensorDataset(X, Y), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(1)
    ):
        x, y = x.to(device), y.to(device)
        popt.zero_grad()
        cut = sizes if sum(sizes) == len(y) else [len(y)]
        for xb, yb in _split(x, y, cut):
            (loss_fn(plain(xb), yb) * len(yb) / len(y)).backward()
        popt.step()
    _assert_same_training(model, plain)
    return tracin, steps, (X.to(device), Y.to(device), Xp.to(device), Yp.to(device))


def _tracin_reference(steps, data):
    """sum_t sum_p eta_{t,p} / N_t g_{t,p}(z) . g_{t,p}(z'), one float64 autograd call per example."""
    X, Y, Xp, Yp = data
    self_inf, infl = np.zeros(len(Y)), np.zeros((len(Y), len(Yp)))
    one = nn.CrossEntropyLoss()
    for theta, rows, lrs in steps:
        gz = per_sample_grads_loop(theta, one, X[rows], Y[rows])
        gp = per_sample_grads_loop(theta, one, Xp, Yp)
        for name in gz:
            lr = lrs[0] if name.startswith(("0.", "conv1.", "emb.")) else lrs[1]
            a, b = gz[name].reshape(len(rows), -1), gp[name].reshape(len(Yp), -1)
            np.add.at(self_inf, rows, lr / len(rows) * (a**2).sum(1))
            np.add.at(infl, rows, lr / len(rows) * a @ b.T)
    return self_inf, infl


@pytest.mark.parametrize("arch,sizes", [("mlp", [3, 5]), ("cnn", [2, 3, 3]), ("transformer", [4, 1, 3])])
def test_tracin_scores_every_example_of_an_accumulated_step(device, arch, sizes):
    """Loader batches of 8 split into unequal micro-batches (the last loader batch of 4 is not split):
    self-influence, the influence on every probe, proponents and opponents against the float64 loop."""
    tracin, steps, data = _tracin_run(arch, sizes, device=device)
    ref_self, ref_infl = _tracin_reference(steps, data)
    assert tracin.probe_steps == len(steps) == 3
    np.testing.assert_allclose(tracin.self_influence(), ref_self, rtol=1e-4, atol=1e-9)
    scale = np.abs(ref_infl).max()
    np.testing.assert_allclose(tracin.influence(), ref_infl, rtol=1e-4, atol=1e-5 * scale)
    for probe in range(ref_infl.shape[1]):
        idx, scores = tracin.proponents(probe=probe, k=4)
        np.testing.assert_allclose(scores, np.sort(ref_infl[:, probe])[::-1][:4], rtol=1e-4, atol=1e-5 * scale)
        np.testing.assert_array_equal(np.sort(idx), np.sort(np.argsort(-ref_infl[:, probe], kind="stable")[:4]))
        idx, scores = tracin.opponents(probe=probe, k=4)
        np.testing.assert_allclose(scores, np.sort(ref_infl[:, probe])[:4], rtol=1e-4, atol=1e-5 * scale)


def test_record_views_of_an_accumulated_step_are_joined_views(device):
    """record.views holds one JoinedView per layer with every example's rows; their Gram is the loop's."""
    torch.manual_seed(0)
    model = models.mlp().to(device)
    x, y = torch.randn(7, 6).to(device), torch.randint(0, 3, (7,)).to(device)
    views = assert_accumulated_views_match_loop(model, x, y, [2, 5], rtol=RTOL)
    assert views and all(isinstance(v, JoinedView) and v.batch == 7 for v in views)


# --- 2. g_i . gbar of the first accumulated step --------------------------------------------------------------
class _Kept(GradientTests):
    """GradientTests that also notes, in the optimizer's pre-hook (after the providers), how many views
    the engine still holds and whether it keeps the first micro-batch's on trial."""

    KEY = "gradient_tests"

    def __init__(self, cockpit_ref):
        super().__init__()
        self.ref = cockpit_ref
        self.kept = []

    def on_before_step(self, record):
        eng = self.ref[0].engine
        self.kept.append((len(eng._kept) + sum(len(seg.kept) for seg in eng._segments), eng._trial))


def _first_step(sizes, expect=False, trial_bytes=None, steps=2, device="cpu"):
    g = torch.Generator().manual_seed(0)
    n = sum(sizes)
    batches = [(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)) for _ in range(steps)]
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    torch.manual_seed(0)
    model = models.mlp().to(device)
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = []
    tests = _Kept(ref)
    probe = Probe(flags={Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_DOT_MEAN})
    with Cockpit(model, opt, instruments=[tests, probe]) as ck:
        ref.append(ck)
        if trial_bytes is not None:
            ck.engine.trial_bytes = trial_bytes
        if expect:
            ck.engine.expect_accumulation()
        out = _accumulate(model, opt, None, batches, sizes, nn.CrossEntropyLoss())
    popt = torch.optim.SGD(plain.parameters(), lr=0.1)
    _accumulate(plain, popt, None, batches, sizes, nn.CrossEntropyLoss())
    _assert_same_training(model, plain)
    return ck, tests, probe, out


@pytest.mark.parametrize("sizes", [[2, 3, 4], [5, 1]])
def test_the_first_accumulated_step_has_g_i_dot_gbar(device, sizes):
    """Nothing asks for projections: the first micro-batch's views are kept on trial (under
    TRIAL_BYTES), so the first step's g_i . gbar (and the gradient tests) are exact, without a note."""
    ck, tests, probe, steps = _first_step(sizes, device=device)
    assert "note/gradient_tests" not in ck.history
    for step, (theta, x, y) in enumerate(steps):
        G = flat(per_sample_grads_loop(theta, nn.CrossEntropyLoss(), x, y))
        rec = probe.records[step]
        np.testing.assert_allclose(rec.per_sample_dot_mean, G @ G.mean(0), rtol=RTOL, atol=1e-9)
        gbar = G.mean(0)
        n = len(y)
        norm_test = math.sqrt(((G - gbar) ** 2).sum() / (n * (n - 1) * (gbar @ gbar)))
        assert dict(ck.history["tests/norm"])[step] == pytest.approx(norm_test, rel=1e-4)
    assert ck.engine.accumulating
    # the views were joined and released in the optimizer's pre-hook, before the optimizer ran
    assert [k for k, _ in tests.kept] == [0, 0]


def test_a_loop_without_accumulation_keeps_the_views_on_trial_once_and_releases_them_at_the_step(device):
    ck, tests, probe, _ = _first_step([6], steps=3, device=device)
    # step 0: the trial ran and its views were released in the step's pre-hook; later steps keep nothing
    assert tests.kept == [(0, True), (0, False), (0, False)]
    assert not ck.engine.accumulating and ck.engine._tried
    assert "note/gradient_tests" not in ck.history


def test_expect_accumulation_serves_the_first_step_whatever_the_budget(device):
    """With a budget of 0 bytes the trial gives up (a note on the first step); an integration that says
    so in advance (cockpit.engine.expect_accumulation()) gets the first step exact."""
    ck, _, probe, steps = _first_step([3, 3], trial_bytes=0, device=device)
    assert "first step with gradient accumulation" in dict(ck.history["note/gradient_tests"])[0]
    assert 1 not in dict(ck.history["note/gradient_tests"])
    assert probe.records[0].per_sample_dot_mean is None
    ck, _, probe, steps = _first_step([3, 3], trial_bytes=0, expect=True, device=device)
    assert "note/gradient_tests" not in ck.history
    theta, x, y = steps[0]
    G = flat(per_sample_grads_loop(theta, nn.CrossEntropyLoss(), x, y))
    np.testing.assert_allclose(probe.records[0].per_sample_dot_mean, G @ G.mean(0), rtol=RTOL, atol=1e-9)


# --- 3. train-mode BatchNorm with several micro-batches: the coupled path ---------------------------------
def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 6),
        nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3),
    )  # fmt: skip


def _bn_reference(theta, micro, n, reduction):
    """{name: (N, *shape)} float64 g_i = d l_i / d theta, l_i from micro-batch k's train-mode forward
    (its own batch statistics), one autograd call per example (retain_graph)."""
    m = copy.deepcopy(theta).double().train()
    names = [name for name, p in m.named_parameters() if p.requires_grad]
    params = [dict(m.named_parameters())[name] for name in names]
    rows = {name: [] for name in names}
    for xb, yb in micro:
        losses = F.cross_entropy(m(xb.double()), yb, reduction="none")
        for i in range(len(yb)):
            for name, g in zip(names, torch.autograd.grad(losses[i], params, retain_graph=True), strict=True):
                rows[name].append(g)
    return {name: torch.stack(v).cpu().numpy() for name, v in rows.items()}


@pytest.mark.parametrize("reduction,sizes", [("mean", [4, 2, 3, 3]), ("sum", [3, 3])])
def test_train_mode_batchnorm_with_accumulation(device, reduction, sizes):
    """Per-sample squared norms, Gram entries (across micro-batches too), g_i, g_i . gbar and projections
    onto the update with micro-batch-wise batch statistics, against autograd.grad(l_i) per example; with
    clip_grad_norm_ and a scheduler; parameters and running statistics bit-identical to a plain run."""
    n = sum(sizes)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 2, 5, 5, generator=g), torch.randint(0, 3, (n,), generator=g)) for _ in range(2)]
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    model, plain = _bn_model().to(device), _bn_model().to(device)
    probe = Probe(flags=set(ALL), directions={"update": lambda rec: rec.update})

    def optim(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    opt, sched = optim(model)
    updates = []
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    with Cockpit(model, opt, loss_fn, instruments=[probe]) as ck:
        steps = []
        for x, y in batches:
            before = [p.detach().clone() for p in model.parameters()]
            steps += _accumulate(model, opt, sched, [(x, y)], sizes, loss_fn, clip=0.5)
            updates.append(
                np.concatenate(
                    [
                        (p.detach() - b).reshape(-1).cpu().numpy()
                        for p, b in zip(model.parameters(), before, strict=True)
                    ]
                )
            )
    popt, psched = optim(plain)
    _accumulate(plain, popt, psched, batches, sizes, loss_fn, clip=0.5)
    _assert_same_training(model, plain)

    for step, (theta, x, y) in enumerate(steps):
        rec = probe.records[step]
        ref = _bn_reference(theta, _split(x, y, sizes), n, reduction)
        G = flat(ref)

        def close(got, want):  # to 1e-4 of each quantity's scale
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

        close(rec.per_sample_dot_mean, G @ G.mean(0))
        close(rec.projections["update"], G @ updates[step])
        if step % NORMS_EVERY == 0:
            close(rec.per_sample_sq_norms, (G**2).sum(1))
            close(rec.per_sample_gram, G @ G.T)
            for name, gn in ref.items():
                got = rec.per_sample_grads[name].detach().double().cpu().numpy()
                # float32 round-off of the whole g_i (a bias before BatchNorm has g_i = 0 exactly)
                np.testing.assert_allclose(got, gn, rtol=1e-4, atol=1e-5 * np.abs(G).max(), err_msg=name)
        else:
            assert rec.per_sample_sq_norms is None and rec.per_sample_gram is None
    notes = dict(ck.history["note/probe"])
    assert 0 not in notes and "every 10th tracked step" in notes[1]


# --- never silently wrong: gbar from p.grad must be the mean of the step's g_i ------------------------------
def _regularised_step(model, x, y, sizes, instruments):
    """One accumulated step whose loss adds a weight penalty outside the model: p.grad is no longer the
    mean of the per-sample gradients of the loss module's term."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    last = list(model.parameters())[-2]  # the output layer's weight (no normalisation after it)
    with Cockpit(model, opt, nn.CrossEntropyLoss(), instruments=instruments) as ck:
        for xb, yb in _split(x, y, sizes):
            loss = F.cross_entropy(model(xb), yb) * len(yb) / len(y)
            (loss + 0.5 * last.square().sum() / len(sizes)).backward()
        opt.step()
    return ck


def test_a_gradient_the_hooks_do_not_see_leaves_g_i_dot_gbar_out_with_a_note(device):
    torch.manual_seed(0)
    model = models.mlp().to(device)
    x, y = torch.randn(7, 6).to(device), torch.randint(0, 3, (7,)).to(device)
    probe = Probe(flags={Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_DOT_MEAN})
    theta = copy.deepcopy(model)
    with pytest.warns(CockpitWarning, match="do not add up"):  # the first backward's one-time check
        ck = _regularised_step(model, x, y, [3, 4], [probe])
    rec = probe.records[0]
    assert rec.per_sample_dot_mean is None
    assert "is not the mean of the step's per-sample gradients" in ck.history.last("note/probe")
    G = flat(per_sample_grads_loop(theta, nn.CrossEntropyLoss(), x, y))
    np.testing.assert_allclose(rec.per_sample_sq_norms, (G**2).sum(1), rtol=RTOL)  # the rest is kept


def test_the_coupled_path_takes_gbar_from_the_replays_when_p_grad_holds_more(device):
    x, y = torch.randn(7, 2, 5, 5).to(device), torch.randint(0, 3, (7,)).to(device)
    model = _bn_model().to(device)
    theta = copy.deepcopy(model)
    probe = Probe(flags={Need.PER_SAMPLE_DOT_MEAN})
    _regularised_step(model, x, y, [3, 4], [probe])
    G = flat(_bn_reference(theta, _split(x, y, [3, 4]), 7, "mean"))
    want = G @ G.mean(0)
    np.testing.assert_allclose(probe.records[0].per_sample_dot_mean, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
