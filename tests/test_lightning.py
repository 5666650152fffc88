"""cockpit_lite.integrations.lightning.CockpitCallback with the real Lightning Trainer (CPU, a tiny MLP).

Every number is checked against what Lightning or an independent computation gives: the loss against
the module's own losses and Lightning's logged epoch means, the gradient norms against p.grad read in
Lightning's on_after_backward and the parameter update (SGD: ||delta theta|| / lr is the norm the
optimizer received), per-sample norms and TracIn self-influence against a float64 loop over examples
with the network written out as a formula, dataset indices against a sampler the test controls.
"""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cockpit_lite.instruments import Alpha, Clipping, Distance, GradNorm, Loss, PerSampleGradNorms, TracIn, UpdateSize
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Sampler, TensorDataset

from cockpit_lite import CockpitWarning, Instrument, Need, load
from cockpit_lite.integrations.lightning import CockpitCallback

N, B, D_IN, HIDDEN, CLASSES, LR, CLIP = 32, 4, 5, 16, 3, 0.1, 0.3
ACCUMULATE = 2  # loader batches per optimizer step (manual optimization accumulates as many)
TRAINER = dict(
    accelerator="cpu",
    devices=1,
    enable_progress_bar=False,
    enable_model_summary=False,
    log_every_n_steps=1,
    num_sanity_val_steps=0,
)


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, D_IN, generator=g), torch.randint(0, CLASSES, (N,), generator=g))


class FixedOrder(Sampler):
    """Yields ``order`` at every pass: the dataset indices of every batch are known in advance."""

    def __init__(self, order: list[int]):
        self.order = list(order)

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


ORDER = [int(i) for i in np.random.default_rng(1).permutation(N)]


def _expected_indices(step: int, accumulate: int = ACCUMULATE) -> np.ndarray:
    """The examples of optimizer step ``step``: ``accumulate`` consecutive loader batches of ORDER, repeated."""
    per_step = B * accumulate
    stream = np.tile(ORDER, (step + 1) * per_step // N + 1)
    return stream[step * per_step : (step + 1) * per_step]


class Net(L.LightningModule):
    """``calls="self"``: training_step calls self(x); ``"model"``: self.model(x), a submodule holding
    every parameter; ``"parts"``: self.body, then self.head (the LightningModule's forward is never
    called in the last two). ``manual``: manual optimization with its own accumulation over ACCUMULATE
    batches and its own clipping. ``norm``: a BatchNorm1d after the first layer."""

    def __init__(self, calls: str = "self", manual: bool = False, dropout: float = 0.0, norm: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Dropout(dropout))
        if norm:
            self.body.insert(1, nn.BatchNorm1d(HIDDEN))
        self.head = nn.Linear(HIDDEN, CLASSES)
        self.model = nn.Sequential(self.body, self.head)  # the same layers again: parameter names stay body.*, head.*
        self.calls, self.automatic_optimization = calls, not manual
        self.micro: list[float] = []  # every training_step's loss, as computed

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.calls == "self":
            logits = self(x)
        elif self.calls == "model":
            logits = self.model(x)
        else:
            logits = self.head(self.body(x))
        loss = F.cross_entropy(logits, y)
        self.micro.append(float(loss.detach().double()))
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        self.manual_backward(loss / ACCUMULATE)
        if (batch_idx + 1) % ACCUMULATE == 0:
            self.clip_gradients(opt, gradient_clip_val=CLIP, gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad()
        return None

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.head(self.body(x)), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class Truth(Callback):
    """Per optimizer step, independently of the cockpit: the parameters at its start, its examples,
    ||p.grad|| after its last backward (before clipping) and ||theta_{t+1} - theta_t|| / lr."""

    def __init__(self):
        self.steps: list[dict] = []
        self._new = True

    @staticmethod
    def _params(module):
        return {n: p.detach().double().clone() for n, p in module.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._new:
            self.steps.append({"theta": self._params(pl_module), "x": [], "y": [], "global_step": trainer.global_step})
            self._new = False
        self.steps[-1]["x"].append(batch[0].clone())
        self.steps[-1]["y"].append(batch[1].clone())

    def on_after_backward(self, trainer, pl_module):
        sq = sum(float(p.grad.double().pow(2).sum()) for p in pl_module.parameters() if p.grad is not None)
        self.steps[-1]["backward_norm"] = sq**0.5

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = self.steps[-1]
        if trainer.global_step > step["global_step"]:  # the optimizer stepped in this batch
            after = self._params(pl_module)
            delta = sum(float((after[n] - step["theta"][n]).pow(2).sum()) for n in after)
            step["received_norm_from_update"] = delta**0.5 / LR
            self._new = True


class IndicesSeen(Instrument):
    """Keeps record.indices of every step (the need TracIn reads)."""

    NEEDS = frozenset({Need.INDICES})

    def __init__(self):
        super().__init__(name="indices_seen")
        self.seen: dict[int, np.ndarray | None] = {}

    def compute(self, record):
        self.seen[record.step] = None if record.indices is None else np.array(record.indices)
        return {}


def _reference_sq_norms(theta: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """||g_i||^2 in float64, one autograd call per example, the network as a formula:
    logits = W2 tanh(W0 x + b0) + b2, l_i = cross-entropy(logits_i, y_i), g_i = d l_i / d theta."""
    names = ["body.0.weight", "body.0.bias", "head.weight", "head.bias"]
    params = [theta[n].clone().requires_grad_(True) for n in names]
    out = []
    for xi, yi in zip(x.double(), y, strict=True):
        w0, b0, w2, b2 = params
        logits = torch.tanh(xi @ w0.T + b0) @ w2.T + b2
        li = -torch.log_softmax(logits, 0)[yi]
        grads = torch.autograd.grad(li, params)
        out.append(sum(float(g.pow(2).sum()) for g in grads))
    return np.array(out)


def _reference_coupled_sq_norms(theta: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """||g_i||^2 in float64 for the network with a train-mode BatchNorm1d (batch mean, biased batch
    variance, eps 1e-5) after its first layer: every example's loss depends on the whole batch, and
    g_i = d l_i / d theta of the batch's own forward, one autograd call per example."""
    names = ["body.0.weight", "body.0.bias", "body.1.weight", "body.1.bias", "head.weight", "head.bias"]
    params = [theta[n].clone().requires_grad_(True) for n in names]
    w0, b0, gamma, beta, w2, b2 = params
    z = x.double() @ w0.T + b0
    zn = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5) * gamma + beta
    losses = -torch.log_softmax(torch.tanh(zn) @ w2.T + b2, 1)[torch.arange(len(y)), y]
    out = []
    for li in losses:
        grads = torch.autograd.grad(li, params, retain_graph=True)
        out.append(sum(float(g.pow(2).sum()) for g in grads))
    return np.array(out)


def _epoch_means(log_dir: str) -> dict[int, float]:
    with open(os.path.join(log_dir, "metrics.csv")) as f:
        return {int(r["epoch"]): float(r["train_loss_epoch"]) for r in csv.DictReader(f) if r["train_loss_epoch"]}


def _fit(module, callbacks, tmp_path, name, max_steps, loader=None, ckpt_path=None, **trainer_kw):
    if not module.automatic_optimization:
        trainer_kw = {k: v for k, v in trainer_kw.items() if k not in ("accumulate_grad_batches", "gradient_clip_val")}
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        logger=CSVLogger(str(tmp_path), name=name),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        **TRAINER,
        **trainer_kw,
    )
    if loader is None:
        loader = DataLoader(_data(), batch_size=B, sampler=FixedOrder(ORDER))
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize(
    "calls, manual, accumulate, overlap",
    [
        ("self", False, ACCUMULATE, False),
        ("parts", False, ACCUMULATE, False),
        ("model", False, 1, False),
        ("parts", True, ACCUMULATE, False),
        ("self", False, ACCUMULATE, True),
    ],
    ids=[
        "automatic-self(x)",
        "automatic-submodules",
        "automatic-model(x)-no-accumulation",
        "manual-submodules",
        "automatic-self(x)-overlap",
    ],
)
def test_every_number_matches_lightning_and_the_float64_loop(tmp_path, calls, manual, accumulate, overlap):
    """accumulate_grad_batches and gradient_clip_val (manual: its own accumulation and
    self.clip_gradients), 20 steps: loss, gradient norms before and after clipping, per-sample norms,
    dataset indices and TracIn self-influence; also with each step's records made during the next step
    (``overlap=True``)."""
    torch.manual_seed(0)
    module, truth, indices, tracin = Net(calls, manual), Truth(), IndicesSeen(), TracIn()
    instruments = [Loss(), GradNorm(), Clipping(max_norm=CLIP), PerSampleGradNorms(), tracin, indices]
    cb = CockpitCallback(instruments=instruments, logdir=str(tmp_path / "cockpit"), sinks=[], overlap=overlap)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CockpitWarning)
        trainer = _fit(
            module, [truth, cb], tmp_path, "csv", 20, accumulate_grad_batches=accumulate, gradient_clip_val=CLIP
        )
    h = load(tmp_path / "cockpit")
    steps = truth.steps
    assert cb.cockpit.model is (module.model if calls == "model" else module)  # the module training_step calls
    assert trainer.global_step == 20 and len(steps) == 20
    assert [s for s, _ in h["loss"]] == list(range(20))
    assert not [t for t in h.tags() if t.startswith("note/")], {t: h[t] for t in h.tags() if t.startswith("note/")}

    # the loss: the mean of the step's micro-batch losses; Lightning's logged epoch means
    micro = np.array(module.micro).reshape(20, accumulate)
    np.testing.assert_allclose([v for _, v in h["loss"]], micro.mean(1), rtol=1e-6)
    steps_per_epoch = N // (B * accumulate)
    whole = 20 // steps_per_epoch * steps_per_epoch  # steps of whole epochs
    cockpit_epochs = np.array([v for _, v in h["loss"]])[:whole].reshape(-1, steps_per_epoch).mean(1)
    lightning_epochs = _epoch_means(trainer.logger.log_dir)
    np.testing.assert_allclose(cockpit_epochs, [lightning_epochs[e] for e in range(len(cockpit_epochs))], rtol=1e-6)

    # gradient norms: at backward (before clipping), and as the optimizer received them (after)
    backward = np.array([s["backward_norm"] for s in steps])
    np.testing.assert_allclose([v for _, v in h["clip/global/norm"]], backward, rtol=1e-6)
    clipped = backward * np.minimum(1.0, CLIP / (backward + 1e-6))  # torch.nn.utils.clip_grad_norm_
    np.testing.assert_allclose([v for _, v in h["grad_norm"]], clipped, rtol=1e-6)
    from_update = [s["received_norm_from_update"] for s in steps]
    np.testing.assert_allclose([v for _, v in h["grad_norm"]], from_update, rtol=1e-4)
    np.testing.assert_allclose([v for _, v in h["clip/global/received_ratio"]], clipped / backward, rtol=1e-6)
    assert (backward > CLIP).sum() >= 10  # clipping happened on most steps, and shows as received < 1

    # dataset indices from the Trainer's own dataloader, and per-sample norms against the float64 loop
    si = np.zeros(N)
    for s, step in enumerate(steps):
        np.testing.assert_array_equal(indices.seen[s], _expected_indices(s, accumulate))
        ref = _reference_sq_norms(step["theta"], torch.cat(step["x"]), torch.cat(step["y"]))
        np.testing.assert_allclose(h.value_at("persample/grad_norm", s) ** 2, ref, rtol=1e-5)
        np.add.at(si, _expected_indices(s, accumulate), LR / (B * accumulate) * ref)  # sum_t eta_t c_t ||g_i||^2
    np.testing.assert_allclose(tracin.self_influence(), si, rtol=1e-5)
    np.testing.assert_allclose(h.last("tracin/self_influence"), si, rtol=1e-5)


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_training_and_lightnings_logs_are_unchanged(tmp_path, manual):
    """Parameters bit-identical with and without the callback (shuffled loader, dropout: the tap and
    the cockpit draw no random numbers); Lightning's CSV logs identical, validation (and its sanity
    check) included: the validation loader is not tapped and evaluation forwards begin no step."""
    params, logs = [], []
    with_cockpit = [CockpitCallback("full", logdir=str(tmp_path / "run"), sinks=[])]
    for run, callbacks in (("plain", []), ("cockpit", with_cockpit)):
        L.seed_everything(0, verbose=False)
        module = Net("parts", manual, dropout=0.2)
        loader = DataLoader(_data(), batch_size=B, shuffle=True)
        val_loader = DataLoader(_data(), batch_size=8)
        trainer = L.Trainer(
            max_steps=12,
            callbacks=callbacks,
            logger=CSVLogger(str(tmp_path), name=run),
            enable_checkpointing=False,
            **{**TRAINER, "num_sanity_val_steps": 2},
            **({} if manual else dict(accumulate_grad_batches=ACCUMULATE, gradient_clip_val=CLIP)),
        )
        trainer.fit(module, loader, val_loader)
        params.append({k: v.clone() for k, v in module.state_dict().items()})
        with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as f:
            logs.append(f.read())
    assert params[0].keys() == params[1].keys()
    for k in params[0]:
        assert torch.equal(params[0][k], params[1][k]), k
    assert logs[0] == logs[1] and "train_loss_step" in logs[0] and "val_loss" in logs[0]
    assert [s for s, _ in load(tmp_path / "run")["loss"]] == list(range(12))
    assert type(loader.batch_sampler) is BatchSampler  # the tap gave the loader its sampler back
    assert type(val_loader.batch_sampler) is BatchSampler


def _jsonl_steps(logdir) -> list[int]:
    with open(os.path.join(logdir, "cockpit.jsonl")) as f:
        return [json.loads(line)["step"] for line in f if "loss" in json.loads(line)["records"]]


def test_checkpoint_and_resume_continue_the_run(tmp_path):
    """The callback's state rides in Lightning checkpoints: a run stopped after step 6, resumed from its
    step-4 checkpoint to step 8, writes every step once and the same records as an uninterrupted run
    (Alpha finishes the step pending at the checkpoint; Distance, TracIn keep their state). The logdir
    held another run, so the first run went to <logdir>-2: the resumed run continues that directory."""

    def instruments():
        return [Loss(), GradNorm(), UpdateSize(), Distance(), Alpha(), TracIn()]

    def run(name, max_steps, callbacks, ckpt_path=None):
        torch.manual_seed(0)
        module = Net("self")
        cb = CockpitCallback(instruments(), logdir=str(tmp_path / name), sinks=[])  # JSON lines only
        _fit(module, [cb, *callbacks], tmp_path, name, max_steps, ckpt_path=ckpt_path, accumulate_grad_batches=2)
        return cb

    whole = run("whole", 8, [])
    (tmp_path / "resumed").mkdir()
    (tmp_path / "resumed" / "cockpit.jsonl").write_text('{"step": 0, "records": {"loss": 9.0}}\n')  # another run
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), filename="{step}", every_n_train_steps=4, save_top_k=-1)
    with pytest.warns(CockpitWarning, match="resumed-2"):
        first = run("resumed", 6, [ckpt])
    assert _jsonl_steps(tmp_path / "resumed-2") == list(range(6))
    path = tmp_path / "ckpt" / "step=4.ckpt"
    saved = torch.load(path, weights_only=True)["callbacks"][first.state_key]
    assert saved["cockpit"]["step"] == 4 and saved["run_dir"] == str(tmp_path / "resumed-2")
    second = run("resumed", 8, [], ckpt_path=str(path))
    assert second.cockpit.step == 8 and second.cockpit.logdir == str(tmp_path / "resumed-2")
    assert _jsonl_steps(tmp_path / "resumed-2") == list(range(8))  # steps 4 and 5 of the first run were cut
    assert _jsonl_steps(tmp_path / "resumed") == [0] and not (tmp_path / "resumed-3").exists()
    a, b = load(tmp_path / "whole"), load(tmp_path / "resumed-2")
    for tag in ("loss", "grad_norm", "update_size", "distance", "alpha"):
        assert [s for s, _ in a[tag]] == [s for s, _ in b[tag]], tag
        np.testing.assert_allclose([v for _, v in b[tag]], [v for _, v in a[tag]], rtol=1e-12, err_msg=tag)
    np.testing.assert_allclose(
        second.cockpit.instruments[-1].self_influence(), whole.cockpit.instruments[-1].self_influence(), rtol=1e-12
    )


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent-workers", "passes-cut-short"])
def test_dataset_indices_with_worker_processes(tmp_path, persistent):
    """Two workers draw index lists ahead of their batches. Persistent workers, two epochs with
    accumulation; or every epoch cut to 3 batches (limit_train_batches), so that each pass leaves index
    lists drawn ahead whose batches never come: every step's indices are still its batch's."""
    torch.manual_seed(0)
    indices = IndicesSeen()
    loader = DataLoader(_data(), batch_size=B, sampler=FixedOrder(ORDER), num_workers=2, persistent_workers=persistent)
    cb = CockpitCallback([Loss(), indices], logdir=None)
    kw = dict(accumulate_grad_batches=ACCUMULATE) if persistent else dict(limit_train_batches=3)
    _fit(Net("parts"), [cb], tmp_path, "workers", 7, loader=loader, **kw)
    assert sorted(indices.seen) == list(range(7))
    for s in range(7):
        want = _expected_indices(s) if persistent else np.array(ORDER[(s % 3) * B : (s % 3 + 1) * B])
        np.testing.assert_array_equal(indices.seen[s], want)


def test_train_mode_batchnorm_through_the_submodule_training_step_calls(tmp_path):
    """self.model(x) with a train-mode BatchNorm: the Cockpit is on self.model, whose forward the coupled
    path replays; squared norms (every 10th step) against the float64 loop over the coupled batch."""
    torch.manual_seed(0)
    module, truth = Net("model", norm=True), Truth()
    cb = CockpitCallback([Loss(), PerSampleGradNorms()], logdir=str(tmp_path / "bn"), sinks=[])
    _fit(module, [truth, cb], tmp_path, "bn", 11)
    assert cb.cockpit.model is module.model
    h = load(tmp_path / "bn")
    assert [s for s, _ in h["persample/grad_norm"]] == [0, 10]
    for s in (0, 10):
        step = truth.steps[s]
        ref = _reference_coupled_sq_norms(step["theta"], torch.cat(step["x"]), torch.cat(step["y"]))
        np.testing.assert_allclose(h.value_at("persample/grad_norm", s) ** 2, ref, rtol=1e-5)


def test_batchnorm_in_parts_of_the_module_is_named_in_a_warning(tmp_path):
    """training_step calling self.body and self.head of a model with train-mode BatchNorm: its forward
    cannot be replayed as one call; a warning says what to change (training is unaffected)."""
    torch.manual_seed(0)
    cb = CockpitCallback([Loss(), PerSampleGradNorms()], logdir=None)
    with pytest.warns(CockpitWarning, match=r"BatchNorm layers \(body.1\).*call self\(x\)"):
        trainer = _fit(Net("parts", norm=True), [cb], tmp_path, "bn_parts", 2)
    assert trainer.global_step == 2 and [s for s, _ in cb.history["loss"]] == [0, 1]
    # the run's note says the same (the statistics are left out, not wrong)
    assert "whole forward as one call" in cb.history["note/per_sample_grad_norms"][0][1]
    assert "persample/grad_norm" not in cb.history


class Fails(Net):
    def training_step(self, batch, batch_idx):
        if batch_idx == 3:
            raise RuntimeError("the user's bug")
        return super().training_step(batch, batch_idx)


def test_an_exception_in_training_closes_the_cockpit_and_gives_the_loader_back(tmp_path):
    """The user's exception reaches the caller unchanged; the Cockpit is closed (a loop run afterwards
    by hand adds no record) and the loader has its own sampler again."""
    torch.manual_seed(0)
    module, cb = Fails("parts"), CockpitCallback([Loss()], logdir=None)
    loader = DataLoader(_data(), batch_size=B, sampler=FixedOrder(ORDER))
    trainer = L.Trainer(max_steps=20, callbacks=[cb], logger=False, enable_checkpointing=False, **TRAINER)
    with pytest.raises(RuntimeError, match="the user's bug"):
        trainer.fit(module, loader)
    assert [s for s, _ in cb.history["loss"]] == [0, 1, 2]
    opt = trainer.optimizers[0]  # the optimizer the Cockpit hooked
    for _ in range(2):
        x, y = next(iter(loader))
        opt.zero_grad()
        F.cross_entropy(module.head(module.body(x)), y).backward()
        opt.step()
    assert [s for s, _ in cb.history["loss"]] == [0, 1, 2]
    assert type(loader.batch_sampler) is BatchSampler


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        data = _data()
        return iter([data[i] for i in ORDER])


class IteratesItself(Net):
    def training_step(self, dataloader_iter):
        (x, y), _, _ = next(dataloader_iter)
        return F.cross_entropy(self.head(self.body(x)), y)


@pytest.mark.parametrize(
    "module, data, why",
    [
        (Net, Stream(), "an IterableDataset has no dataset indices"),
        (IteratesItself, _data(), r"training_step\(dataloader_iter\) fetches its own batches"),
    ],
    ids=["iterable-dataset", "dataloader_iter"],
)
def test_where_there_are_no_dataset_indices_a_warning_says_why(tmp_path, module, data, why):
    torch.manual_seed(0)
    indices = IndicesSeen()
    cb = CockpitCallback([Loss(), indices], logdir=None)
    with pytest.warns(CockpitWarning, match=f"no dataset indices for the Trainer's train dataloader \\({why}\\)"):
        trainer = _fit(module("parts"), [cb], tmp_path, "no_indices", 4, loader=DataLoader(data, batch_size=B))
    assert trainer.global_step == 4 and [s for s, _ in cb.history["loss"]] == [0, 1, 2, 3]
    assert all(v is None for v in indices.seen.values())


def test_the_documented_example_runs(tmp_path, monkeypatch):
    """docs/integrations.md, "Lightning", as written (JSON lines only: the TensorBoard sink's closing
    dashboard picture is the slow part and no part of the example's point)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text()
    section = text[text.index("## Lightning") :]
    section = section[: section.index("\n## ", 1)] if "\n## " in section[1:] else section
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1 and 'logdir="runs/pl")' in blocks[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(blocks[0].replace('logdir="runs/pl")', 'logdir="runs/pl", sinks=[])'), namespace)
    run = load(tmp_path / "runs" / "pl")
    assert [s for s, _ in run["loss"]] == list(range(40)) and len(run["clip/global/norm"]) == 40
    assert namespace["callback"].verdicts and "verdict/lr" in run
    assert (namespace["tracin"].self_influence() > 0).sum() == 256  # 40 steps x 32 examples: every one seen
