"""TracIn: track() batches, online TracIn against a float64 loop over steps, the loss-drop sum check,
random projections, TracInCP against an independent loop and against Captum, records in the run."""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import torch
from cockpit_lite.instruments.tracin import TracIn
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Subset,
    TensorDataset,
    WeightedRandomSampler,
    random_split,
)

from cockpit_lite import Cockpit, Need, load
from cockpit_lite.persample.cross import Projector, ViewCollector, cross
from cockpit_lite.tracking import track
from tests import models
from tests.reference import Probe, flat, per_sample_grads_loop


# --- track(): the same batches as the bare loader, and the right indices -------------------------------
class Indexed(Dataset):
    """Example i is (x_i, y_i) with x_i[0] = i, so a batch tells which indices it holds."""

    def __init__(self, n=23):
        g = torch.Generator().manual_seed(0)
        self.x = torch.cat([torch.arange(n, dtype=torch.float32)[:, None], torch.randn(n, 3, generator=g)], 1)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        if isinstance(i, list):  # batch_size=None with a sampler of index lists
            return self.x[i], self.y[i]
        return self.x[i], self.y[i]


def _dict_collate(items):
    return {"x": torch.stack([x for x, _ in items]), "y": torch.stack([y for _, y in items])}


def _x(batch):
    return batch["x"] if isinstance(batch, dict) else batch[0]


DS = Indexed()
SUB = Subset(DS, [3, 5, 7, 11, 13, 17, 19, 2, 4, 6, 8])
CONFIGS = {
    "shuffle": lambda: DataLoader(DS, batch_size=5, shuffle=True),
    "generator": lambda: DataLoader(DS, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(3)),
    "drop_last": lambda: DataLoader(DS, batch_size=5, shuffle=True, drop_last=True),
    "workers": lambda: DataLoader(DS, batch_size=4, shuffle=True, num_workers=2),
    "persistent_workers": lambda: DataLoader(DS, batch_size=4, shuffle=True, num_workers=2, persistent_workers=True),
    "weighted_sampler": lambda: DataLoader(
        DS, batch_size=6, sampler=WeightedRandomSampler(torch.linspace(0.1, 1, len(DS)), 30, replacement=True)
    ),
    "batch_sampler": lambda: DataLoader(DS, batch_sampler=BatchSampler(RandomSampler(DS), 4, drop_last=False)),
    "index_list_sampler": lambda: DataLoader(DS, batch_size=None, sampler=BatchSampler(RandomSampler(DS), 6, False)),
    "subset": lambda: DataLoader(SUB, batch_size=3, shuffle=True),
    "random_split": lambda: DataLoader(
        random_split(DS, [15, 8], generator=torch.Generator().manual_seed(1))[0], batch_size=4, shuffle=True
    ),
    "collate_fn": lambda: DataLoader(DS, batch_size=5, shuffle=True, collate_fn=_dict_collate),
}


class _Feed:
    """Receives what cockpit.track() feeds the indices provider."""

    def __init__(self):
        self._batch_indices, self._dataset_size = None, None

    def __call__(self, indices, dataset_size):
        self._batch_indices, self._dataset_size = indices, dataset_size


def _epochs(loader, epochs, tracked):
    ck = _Feed()
    batches, indices = [], []
    for _ in range(epochs):
        for batch in track(ck, loader, resolve_subsets=True) if tracked else loader:
            batches.append(batch)
            indices.append(ck._batch_indices)
    return batches, indices, ck


@pytest.mark.parametrize("config", list(CONFIGS))
def test_track_yields_identical_batches_and_right_indices(config):
    epochs = 2
    torch.manual_seed(7)
    bare, _, _ = _epochs(CONFIGS[config](), epochs, tracked=False)
    after_bare = torch.rand(3)
    torch.manual_seed(7)
    tracked, indices, ck = _epochs(CONFIGS[config](), epochs, tracked=True)
    assert torch.equal(torch.rand(3), after_bare)  # same random numbers drawn: the trajectory is unchanged
    assert len(bare) == len(tracked) > 0
    for b, t, idx in zip(bare, tracked, indices, strict=True):
        torch.testing.assert_close(t, b, rtol=0, atol=0)
        # indices into the underlying dataset (resolve_subsets=True): x[:, 0] holds them
        np.testing.assert_array_equal(idx, _x(t)[:, 0].long().numpy())
    assert ck._dataset_size == len(DS)


def test_track_indices_are_positions_in_a_subset_by_default():
    ck = _Feed()
    loader = DataLoader(SUB, batch_size=4, shuffle=True)
    for x, _ in track(ck, loader):
        np.testing.assert_array_equal(np.asarray(SUB.indices)[ck._batch_indices], x[:, 0].long().numpy())
    assert ck._dataset_size == len(SUB)


def test_track_passes_other_iterables_through_with_a_warning():
    ck = _Feed()
    batches = [(torch.randn(2, 3), torch.tensor([0, 1]))]
    with pytest.warns(RuntimeWarning, match="not a torch DataLoader"):
        out = list(track(ck, batches))
    assert out == batches and ck._batch_indices is None


def test_cockpit_fills_record_indices():
    torch.manual_seed(0)
    model, loss_fn = nn.Linear(4, 3), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = Probe(flags={Need.INDICES})
    loader = DataLoader(DS, batch_size=5, shuffle=True)
    seen = []
    with Cockpit(model, opt, loss_fn, instruments=[probe]) as cockpit:
        for x, y in cockpit.track(loader):
            seen.append(x[:, 0].long().numpy())
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    assert len(probe.records) == len(seen)
    for rec, idx in zip(probe.records, seen, strict=True):
        np.testing.assert_array_equal(rec.indices, idx)
        assert rec.dataset_size == len(DS)


# --- online TracIn against a float64 loop over the steps of a short SGD run ------------------------------
def _mlp():
    return models.mlp(d_in=6, hidden=5, classes=3)


def _cnn():
    return models.GroupedCNN(classes=3)


def _tied():
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    model[2].weight = model[0].weight  # tied weights: each sample's gradient sums both uses
    return model


class _TiedLM(nn.Module):
    """Input embedding and output layer share one matrix (GPT-2 style), module "0" for the lr groups."""

    def __init__(self):
        super().__init__()
        self.add_module("0", nn.Embedding(7, 4))
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7)
        self.head.weight = self.get_submodule("0").weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.get_submodule("0")(tokens)))).mean(1)


class _Bag(nn.Module):
    """An embedding (with padding) and a Linear layer per position: TracIn's lookup cross products."""

    def __init__(self):
        super().__init__()
        self.add_module("0", nn.Embedding(7, 4, padding_idx=0))
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):
        return self.head(torch.tanh(self.get_submodule("0")(tokens))).mean(1)


ARCH = {
    "mlp": (_mlp, lambda n, g: torch.randn(n, 6, generator=g)),
    "embedding": (_Bag, lambda n, g: torch.randint(0, 7, (n, 5), generator=g)),
    "tied_lm": (_TiedLM, lambda n, g: torch.randint(0, 7, (n, 5), generator=g)),
    "tied": (_tied, lambda n, g: torch.randn(n, 6, generator=g)),
    "cnn": (_cnn, lambda n, g: torch.randn(n, 2, 8, 8, generator=g)),
}


def _train(
    arch, reduction, n=20, batch=6, epochs=2, lr=0.05, probes=4, instruments_fn=None, seed=0, logdir=None, device="cpu"
):
    """Train with TracIn on ``device`` (the data drawn on the CPU, the loader's batches moved there); the
    loop itself keeps theta_t, the batch rows and the lr of every step."""
    factory, data = ARCH[arch]
    g = torch.Generator().manual_seed(seed)
    X, Y = data(n, g), torch.randint(0, 3, (n,), generator=g)
    Xp, Yp = data(probes, g), torch.randint(0, 3, (probes,), generator=g)
    Xp, Yp = Xp.to(device), Yp.to(device)
    torch.manual_seed(seed)
    model = factory().to(device)
    first = [p for n_, p in model.named_parameters() if n_.startswith(("0.", "conv1."))]
    rest = [p for n_, p in model.named_parameters() if not n_.startswith(("0.", "conv1."))]
    opt = torch.optim.SGD([{"params": first, "lr": lr}, {"params": rest, "lr": lr / 2}], lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    tracin = TracIn(probes=(Xp, Yp)) if probes else TracIn()
    instruments = [tracin] + (instruments_fn(Xp, Yp) if instruments_fn else [])
    steps = []
    loader = DataLoader(TensorDataset(X, Y), batch_size=batch, shuffle=True)
    with Cockpit(model, opt, loss_fn, instruments=instruments, logdir=logdir) as cockpit:
        for _ in range(epochs):
            for x, y in cockpit.track(loader):
                rows = [int(torch.nonzero((X == xi).flatten(1).all(1))[0]) for xi in x]
                x, y = x.to(device), y.to(device)
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                steps.append((state, rows, [grp["lr"] for grp in opt.param_groups]))
                opt.step()
                sched.step()
    return types.SimpleNamespace(
        tracin=tracin, steps=steps, X=X.to(device), Y=Y.to(device), Xp=Xp, Yp=Yp, factory=factory, loss_fn=loss_fn,
        model=model, device=device,
    )  # fmt: skip


def _reference(run, reduction):
    """sum_t sum_p eta_{t,p} c_t g_{t,p}(z) . g_{t,p}(z'), one float64 autograd call per example per step."""
    n, k = len(run.Y), len(run.Yp)
    self_inf, infl = np.zeros(n), np.zeros((n, k))
    one = nn.CrossEntropyLoss()  # the loss of one example
    for state, rows, lrs in run.steps:
        model = run.factory().to(run.device)
        model.load_state_dict(state)
        lr_of = {nm: lrs[0] if nm.startswith(("0.", "conv1.")) else lrs[1] for nm, _ in model.named_parameters()}
        c = 1 / len(rows) if reduction == "mean" else 1.0
        gz = per_sample_grads_loop(model, one, run.X[rows], run.Y[rows])
        gp = per_sample_grads_loop(model, one, run.Xp, run.Yp)
        for nm in gz:
            a = gz[nm].reshape(len(rows), -1)
            b = gp[nm].reshape(k, -1)
            w = lr_of[nm] * c
            np.add.at(self_inf, rows, w * (a**2).sum(1))
            np.add.at(infl, rows, w * a @ b.T)
    return self_inf, infl


@pytest.mark.parametrize(
    "arch,reduction",
    [("mlp", "mean"), ("mlp", "sum"), ("cnn", "mean"), ("tied", "mean"), ("embedding", "mean"), ("tied_lm", "mean")],
)
def test_online_tracin_matches_float64_loop_over_steps(device, arch, reduction):
    run = _train(arch, reduction, device=device, **({"n": 10, "batch": 4, "epochs": 1} if arch == "cnn" else {}))
    ref_self, ref_infl = _reference(run, reduction)
    np.testing.assert_allclose(run.tracin.self_influence(), ref_self, rtol=1e-4, atol=1e-9)
    scale = np.abs(ref_infl).max()
    np.testing.assert_allclose(run.tracin.influence(), ref_infl, rtol=1e-4, atol=1e-5 * scale)
    idx, scores = run.tracin.proponents(probe=1, k=3)
    np.testing.assert_array_equal(idx, np.argsort(-ref_infl[:, 1], kind="stable")[:3])
    idx, scores = run.tracin.opponents(probe=1, k=3)
    np.testing.assert_allclose(scores, np.sort(ref_infl[:, 1])[:3], rtol=1e-4)


def test_sum_over_training_examples_matches_the_probe_loss_drop(device):
    """REFERENCE.md section 5: sum_z TracIn(z, z') ~ l(theta_0, z') - l(theta_T, z') at a small lr."""
    run = _train("mlp", "mean", n=30, batch=5, epochs=3, lr=1e-3, probes=5, device=device)
    one = nn.CrossEntropyLoss()
    first = run.factory().to(device)
    first.load_state_dict(run.steps[0][0])
    with torch.no_grad():
        drop = np.array(
            [
                (
                    one(first(run.Xp[k : k + 1]), run.Yp[k : k + 1])
                    - one(run.model(run.Xp[k : k + 1]), run.Yp[k : k + 1])
                )
                .double()
                .item()
                for k in range(5)
            ]
        )
    total = run.tracin.influence().sum(0)
    np.testing.assert_allclose(total, drop, rtol=0.01, atol=1e-3 * np.abs(drop).max())


def test_without_track_tracin_says_what_it_needs():
    torch.manual_seed(0)
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracin = TracIn()
    with pytest.warns(RuntimeWarning, match=r"cockpit\.track\(loader\)"):
        with Cockpit(model, opt, loss_fn, instruments=[tracin]):
            for _ in range(2):
                opt.zero_grad()
                loss_fn(model(torch.randn(4, 6)), torch.randint(0, 3, (4,))).backward()
                opt.step()
    with pytest.raises(RuntimeError, match=r"cockpit\.track"):
        tracin.self_influence()


def test_probe_pass_leaves_the_trajectory_unchanged(device, tmp_path):
    """Dropout in train mode: the probe pass runs under a forked RNG (the device's generator on CUDA),
    so training is bit-identical."""

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)).to(device)

    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
    finals = []
    for with_cockpit in (False, True):
        model, loss_fn = build(), nn.CrossEntropyLoss()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = DataLoader(TensorDataset(X, Y), batch_size=4, shuffle=True)
        torch.manual_seed(5)
        if with_cockpit:
            tracin = TracIn(probes=(X[:3].to(device), Y[:3].to(device)))
            with Cockpit(model, opt, loss_fn, instruments=[tracin]) as ck:
                for x, y in ck.track(loader):
                    x, y = x.to(device), y.to(device)
                    opt.zero_grad()
                    loss_fn(model(x), y).backward()
                    opt.step()
            assert tracin.probe_steps == 3
        else:
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
        finals.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*finals, strict=True):
        assert torch.equal(a, b)


def test_results_are_written_into_the_run(tmp_path):
    run = _train("mlp", "mean", logdir=tmp_path)
    history = load(tmp_path)
    top = history.last("tracin/self_influence/top")
    si = run.tracin.self_influence()
    np.testing.assert_array_equal(top["index"], np.argsort(-si, kind="stable")[: len(top["index"])])
    np.testing.assert_allclose(top["score"], si[top["index"]])
    np.testing.assert_allclose(history.last("tracin/self_influence"), si)
    pro, opp = history.last("tracin/proponents"), history.last("tracin/opponents")
    assert pro["index"].shape == (4, 20) and opp["score"].shape == (4, 20)
    for k in range(4):
        idx, scores = run.tracin.proponents(probe=k, k=20)
        np.testing.assert_array_equal(pro["index"][k], idx)
        np.testing.assert_allclose(pro["score"][k], scores)
        idx, scores = run.tracin.opponents(probe=k, k=20)
        np.testing.assert_array_equal(opp["index"][k], idx)


# --- random projections: unbiased, with the documented spread -----------------------------------------
def test_projected_cross_is_unbiased_with_the_documented_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 40), nn.Tanh(), nn.Linear(40, 3))
    collect = ViewCollector(model)
    views, _ = collect(torch.randn(6, 50), torch.randint(0, 3, (6,)), nn.CrossEntropyLoss())
    v = views[("0.weight", "0.bias")]
    exact = cross(v, v)["0.weight"].double()
    k, seeds = 16, 400
    est = torch.stack([cross(v, v, Projector(k, seed=s))["0.weight"].double() for s in range(seeds)])
    mean, std = est.mean(0), est.std(0)
    diag = torch.diagonal(exact)
    # unbiased: the mean over projections is within 4 standard errors of the exact value
    assert torch.all((mean - exact).abs() <= 4 * std / seeds**0.5 + 1e-12)
    # self entries ||g||^2 = ||a||^2 ||e||^2: relative sd sqrt((1 + 2/k)^2 - 1), both factors projected
    rel = torch.diagonal(std) / diag
    expected = ((1 + 2 / k) ** 2 - 1) ** 0.5
    assert torch.all((rel / expected - 1).abs() < 0.2), (rel, expected)


def test_online_tracin_with_projection_is_unbiased_end_to_end():
    """12 TracIn instruments with different projection seeds on one run: their mean is the exact value."""
    seeds = 12
    sketches = []

    def make(xp, yp):
        sketches.extend(
            TracIn(probes=(xp, yp), projection_dim=4, projection_seed=s, name=f"p{s}") for s in range(seeds)
        )
        return sketches

    run = _train("mlp", "mean", n=12, epochs=1, probes=3, instruments_fn=make)
    for t in sketches:
        assert t.probe_steps == len(run.steps)
    exact = run.tracin.influence()
    est = np.stack([t.influence() for t in sketches])
    se = est.std(0) / seeds**0.5
    assert np.all(np.abs(est.mean(0) - exact) <= 4 * se + 1e-9 * np.abs(exact).max())
    assert not np.allclose(est[0], exact)  # the sketch is not exact at k=4 < widths


# --- TracInCP: checkpoints, an independent float64 loop, Captum -----------------------------------------
class BNNet(nn.Module):
    """Conv1d (T > 1), BatchNorm1d (train mode during training), Linear: every handler kind of TracInCP."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)
        self.bn = nn.BatchNorm1d(3)
        self.head = nn.Linear(3 * 4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def _train_with_checkpoints(tmp_path, n=24, batch=6, epochs=2, wrap=False):
    from cockpit_lite.instruments.tracin_cp import Checkpoints

    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(n, 2, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    Xt, Yt = torch.randn(5, 2, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
    torch.manual_seed(0)
    model, loss_fn = BNNet(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    loader = DataLoader(TensorDataset(X, Y), batch_size=batch, shuffle=True)
    ckpt = Checkpoints(every=len(loader))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # train-mode BatchNorm: no per-sample numbers during training
        net = nn.DataParallel(model) if wrap else model  # on CPU: calls the module; names get "module."
        with Cockpit(net, opt, loss_fn, instruments=[ckpt], logdir=tmp_path) as cockpit:
            for _ in range(epochs):
                for x, y in cockpit.track(loader):
                    opt.zero_grad()
                    loss_fn(net(x), y).backward()
                    opt.step()
                    sched.step()
    return types.SimpleNamespace(model=model, loss_fn=loss_fn, X=X, Y=Y, Xt=Xt, Yt=Yt, paths=ckpt.paths)


def _loop_tracincp(run):
    """sum_k eta_k g_k(z) . g_k(z'): float64, eval mode, one autograd call per example per checkpoint."""
    from cockpit_lite.instruments.tracin_cp import load_checkpoint

    self_inf, infl = 0.0, 0.0
    for path in run.paths:
        state = load_checkpoint(path)
        model = BNNet()
        model.load_state_dict(state["state_dict"])
        model.eval()
        gz = flat(per_sample_grads_loop(model, nn.CrossEntropyLoss(), run.X, run.Y))
        gt = flat(per_sample_grads_loop(model, nn.CrossEntropyLoss(), run.Xt, run.Yt))
        self_inf = self_inf + state["learning_rate"] * (gz**2).sum(1)
        infl = infl + state["learning_rate"] * gz @ gt.T
    return self_inf, infl


def test_checkpoints_store_parameters_and_the_lr_of_their_step(tmp_path):
    from cockpit_lite.instruments.tracin_cp import checkpoint_paths, load_checkpoint

    run = _train_with_checkpoints(tmp_path)
    paths = checkpoint_paths(tmp_path)
    assert [p.name for p in paths] == ["step_00000000.pt", "step_00000004.pt", "step_00000008.pt"]  # + final
    lrs = [load_checkpoint(p)["learning_rate"] for p in paths]
    np.testing.assert_allclose(lrs, [0.1, 0.025, 0.00625])  # StepLR halves every 2 steps; final: the lr now
    final = load_checkpoint(paths[-1])["state_dict"]
    for k, v in run.model.state_dict().items():
        assert torch.equal(final[k], v)


@pytest.mark.parametrize("wrap", [False, True])
def test_tracincp_matches_float64_loop_in_eval_mode(tmp_path, wrap):
    """Also for a wrapped model (DataParallel): checkpoints hold the bare module's state, and TracInCP
    given the wrapper loads them into the module inside."""
    from cockpit_lite.instruments.tracin_cp import TracInCP

    run = _train_with_checkpoints(tmp_path, wrap=wrap)
    run.model.train()  # TracInCP must switch to eval mode itself, and restore train mode afterwards
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    cp = TracInCP(nn.DataParallel(run.model) if wrap else run.model, run.loss_fn, tmp_path, batch_size=7)
    ref_self, ref_infl = _loop_tracincp(run)
    np.testing.assert_allclose(cp.self_influence((run.X, run.Y)), ref_self, rtol=1e-4)
    infl = cp.influence(TensorDataset(run.X, run.Y), (run.Xt, run.Yt))
    np.testing.assert_allclose(infl, ref_infl, rtol=1e-4, atol=1e-5 * np.abs(ref_infl).max())
    assert run.model.training and all(torch.equal(v, before[k]) for k, v in run.model.state_dict().items())
    # written into the run, readable by load()
    records = cp.write(tmp_path, self_influence=ref_self, influence=infl, top_k=5)
    history = load(tmp_path)
    np.testing.assert_array_equal(history.last("tracin/cp/self_influence/top")["index"], np.argsort(-ref_self)[:5])
    np.testing.assert_array_equal(
        history.last("tracin/cp/proponents")["index"], records["tracin/cp/proponents"]["index"]
    )
    assert history.last("tracin/cp/opponents")["score"].shape == (5, 5)


def test_tracincp_agrees_with_captum(tmp_path):
    pytest.importorskip("captum")
    from captum.influence import TracInCP as CaptumTracInCP
    from cockpit_lite.instruments.tracin_cp import TracInCP, captum_loader

    run = _train_with_checkpoints(tmp_path)
    run.model.eval()  # Captum never switches modes: give it the eval-mode model ours uses
    paths = [str(p) for p in run.paths]
    captum = CaptumTracInCP(
        run.model,
        TensorDataset(run.X, run.Y),
        checkpoints=paths,
        checkpoints_load_func=captum_loader,
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=8,
    )
    theirs_infl = captum.influence((run.Xt, run.Yt)).double().numpy().T
    theirs_self = captum.self_influence().double().numpy()
    ours = TracInCP(run.model, run.loss_fn, paths)
    np.testing.assert_allclose(ours.self_influence((run.X, run.Y)), theirs_self, rtol=1e-4)
    scale = np.abs(theirs_infl).max()
    np.testing.assert_allclose(
        ours.influence((run.X, run.Y), (run.Xt, run.Yt)), theirs_infl, rtol=1e-4, atol=1e-5 * scale
    )


def test_mislabel_demo_quick_mode():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "demos" / "mislabel_hunt.py"
    spec = importlib.util.spec_from_file_location("mislabel_hunt", path)
    demo = importlib.util.module_from_spec(spec)
    sys.modules["mislabel_hunt"] = demo  # dataclasses look their module up
    spec.loader.exec_module(demo)
    rows = {name: fr for name, fr, _ in demo.main(["--quick", "--settings", "easy"])["easy"]}
    assert {"online TracIn", "cumulative loss", "final loss", "random", "best possible"} <= set(rows)
    assert any(k.startswith("TracInCP (") for k in rows)
    assert rows["online TracIn"][0] > 2 * rows["random"][0]  # finds flipped labels far better than chance


def test_lookup_cross_products_in_blocks_match_the_formed_gradients(monkeypatch):
    """The embedding cross-Gram sum_{t,t'} [tok == tok'] (u . u'), taken in probe blocks, equals the
    product of the formed (B, V, d) gradients."""
    from cockpit_lite.persample import cross as cross_mod
    from cockpit_lite.persample import views as views_mod
    from cockpit_lite.persample.views import EmbeddingView

    g = torch.Generator().manual_seed(0)
    left = EmbeddingView(torch.randint(0, 9, (5, 4), generator=g), torch.randn(5, 4, 3, generator=g), "w", 9)
    right = EmbeddingView(torch.randint(0, 9, (7, 6), generator=g), torch.randn(7, 6, 3, generator=g), "w", 9)
    formed = left.grads()["w"].reshape(5, -1) @ right.grads()["w"].reshape(7, -1).T
    for block in (1 << 24, 5 * 4 * 6 * 2):  # one block; blocks of two probes
        monkeypatch.setattr(views_mod, "_PAIR_BLOCK", block)
        torch.testing.assert_close(cross_mod.cross(left, right)["w"], formed)
