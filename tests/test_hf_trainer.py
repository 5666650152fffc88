"""The Hugging Face Trainer integration (cockpit_lite.integrations.huggingface) and accelerate's
``prepare``d optimizer, with the real packages on CPU: a GPT-2 from a tiny config with random weights,
an in-memory dataset of token ids, nothing downloaded.

Every sequence's first token is its dataset index, so the dataset index of each example the model
trained on is read off its input, independently of the cockpit's index recording. The Trainer's own
logs (loss, grad_norm, learning_rate) are the references for the step's numbers; a float64 loop over
the sequences, with the model's own loss definition under ``num_items_in_batch``, for the per-sample ones.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from cockpit_lite.instruments import Alpha, Clipping, GradientTests, TracIn
from cockpit_lite.instruments.presets import economy
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from cockpit_lite import Cockpit, CockpitWarning, Instrument, Need, Needs, load
from cockpit_lite.integrations.huggingface import STATE_FILE, CockpitCallback
from cockpit_lite.pause import is_paused

N_DATA, T, VOCAB = 40, 8, 64
BATCH, ACCUM, MAX_NORM = 4, 2, 1.0
STEPS = 20
N = BATCH * ACCUM  # sequences per optimizer step


def dataset() -> list[dict[str, torch.Tensor]]:
    """N_DATA sequences of T tokens; token 0 of sequence i is i; about 20% of the labels are -100."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (N_DATA, T), generator=g)
    ids[:, 0] = torch.arange(N_DATA)
    labels = ids.clone()
    labels[torch.rand(N_DATA, T, generator=g) < 0.2] = -100
    labels[:, 1] = ids[:, 1]  # every sequence has a counted target
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(N_DATA)]


def gpt2(dropout: float = 0.0, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=16,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config)


def training_args(out, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM,
        max_grad_norm=MAX_NORM,
        max_steps=STEPS,
        logging_steps=1,
        learning_rate=1e-3,
        warmup_steps=3,  # a scheduler whose learning rate changes every step
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


class Probe(Instrument):
    """Keeps, per step, what the cockpit computed, and theta_t (before the update) at ``snapshot_step``."""

    def __init__(self, snapshot_step: int | None = None):
        super().__init__(name="probe")
        self.snapshot_step = snapshot_step
        self.steps: dict[int, dict] = {}
        self.theta: dict[str, torch.Tensor] = {}

    def requires(self, step):
        return Needs(
            flags={
                Need.PER_SAMPLE_SQ_NORMS,
                Need.PER_SAMPLE_SQ_NORMS_BY_PARAM,
                Need.PER_SAMPLE_LOSS,
                Need.INDICES,
                Need.GRAD_NORMS,
            }
        )

    def on_before_step(self, record):
        if record.step == self.snapshot_step:
            self.theta = {n: p.detach().clone() for n, p in record.params.items()}

    def compute(self, record):
        self.steps[record.step] = dict(
            loss=record.loss,
            lrs=list(record.lrs),
            batch_size=record.batch_size,
            micro_batches=list(record.micro_batches),
            sq=dict(record.per_sample_sq_norms_by_param or {}),
            per_sample_loss=record.per_sample_loss,
            indices=None if record.indices is None else record.indices.copy(),
            notes=record.notes,
        )
        return {}


class Inputs:
    """A forward pre-hook on the model keeping the inputs of every training forward (grad enabled)."""

    def __init__(self, model: nn.Module):
        self.calls: list[dict] = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if torch.is_grad_enabled() and module.training and not is_paused():
            self.calls.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    def of_step(self, step: int) -> list[dict]:
        return self.calls[ACCUM * step : ACCUM * (step + 1)]


def seen_indices(calls: list[dict]) -> np.ndarray:
    """The dataset indices of the sequences of these model calls, read off their first token."""
    return torch.cat([c["input_ids"][:, 0] for c in calls]).numpy()


def train(model, args, callback=None, eval_dataset=None, **kw) -> Trainer:
    callbacks = [callback] if callback else []
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), eval_dataset=eval_dataset, callbacks=callbacks)
    trainer.train(**kw)
    return trainer


def trainer_logs(trainer: Trainer) -> list[dict]:
    """The Trainer's per-step logs, in step order (entry k describes optimizer step k)."""
    return [e for e in trainer.state.log_history if "grad_norm" in e]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """20 steps, gradient_accumulation_steps=2, max_grad_norm=1.0, the economy preset plus TracIn, an
    evaluation every 5 steps (forwards the cockpit must not take for training steps)."""
    model = gpt2()
    inputs = Inputs(model)
    probe = Probe(snapshot_step=7)
    # Alpha writes its verdict (verdict/lr) every 5 defined alphas: records to forward to the Trainer's log
    instruments = [i for i in economy() if not isinstance(i, Alpha)] + [Alpha(verdict_every=5, min_alphas=3)]
    callback = CockpitCallback(instruments=[*instruments, TracIn(), probe])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = training_args(tmp_path_factory.mktemp("hf"), eval_strategy="steps", eval_steps=5)
        trainer = train(model, args, callback, eval_dataset=dataset()[:8])
    inputs.handle.remove()
    cockpit_warnings = [str(w.message) for w in caught if issubclass(w.category, CockpitWarning)]
    return dict(trainer=trainer, callback=callback, probe=probe, inputs=inputs, warnings=cockpit_warnings, model=model)


def test_loss_grad_norm_and_learning_rate_equal_the_trainers_logs(run):
    logs, h, probe = trainer_logs(run["trainer"]), run["callback"].cockpit.history, run["probe"]
    assert len(logs) == STEPS and [e["step"] for e in logs] == list(range(1, STEPS + 1))
    assert run["warnings"] == []
    assert sum("eval_loss" in e for e in run["trainer"].state.log_history) == STEPS // 5  # evaluations ran
    loss = dict(h["loss"])
    norm, received = dict(h["clip/global/norm"]), dict(h["clip/global/received_norm"])
    ratio, grad_norm = dict(h["clip/global/received_ratio"]), dict(h["grad_norm"])
    for t, e in enumerate(logs):
        # the loss the step optimizes: sum over micro-batches of (token losses / num_items_in_batch)
        assert loss[t] == pytest.approx(e["loss"], rel=1e-6), t
        # the norm the Trainer clips (and logs) is the cockpit's norm before clipping
        assert norm[t] == pytest.approx(e["grad_norm"], rel=1e-5), t
        # clip_grad_norm_: the optimizer receives g * min(1, max_norm / (||g|| + 1e-6))
        coef = min(1.0, MAX_NORM / (e["grad_norm"] + 1e-6))
        assert received[t] == pytest.approx(e["grad_norm"] * coef, rel=1e-5), t
        assert grad_norm[t] == pytest.approx(received[t], rel=1e-9) and ratio[t] == pytest.approx(coef, rel=1e-5)
        # the scheduler's learning rate of this step, in every parameter group
        assert probe.steps[t]["lrs"] == [e["learning_rate"]] * len(probe.steps[t]["lrs"]), t
        assert probe.steps[t]["batch_size"] == N and probe.steps[t]["micro_batches"] == [BATCH] * ACCUM
    assert len({e["learning_rate"] for e in logs}) > 10  # warmup, then decay: the check is not of a constant
    assert any(coef < 1 for coef in ratio.values()) and "clip/global/would_clip" in h  # the Trainer clipped


def test_verdicts_reach_the_trainers_log(run):
    trainer, cockpit = run["trainer"], run["callback"].cockpit
    final = trainer.state.log_history[-1]
    assert "train_runtime" in final
    assert final["cockpit/verdicts"] == cockpit.verdicts() and len(final["cockpit/verdicts"]) == 2
    assert final["cockpit/verdicts"][0].startswith("learning rate:")
    assert final["cockpit/verdicts"][1].startswith("clipping: max_norm=1")
    json.dumps(trainer.state.log_history)  # trainer_state.json can hold them
    # each verdict record the cockpit wrote during training is in the Trainer's next log, once (Alpha's
    # records of step t are written after step t + 1, which has the end point of step t)
    written = list(cockpit.history["verdict/lr"])[:-1]  # the last one is written at close
    logged = [(e["step"] - 1, e["cockpit/verdict/lr"]) for e in trainer.state.log_history if "cockpit/verdict/lr" in e]
    assert len(written) >= 3 and [v for _, v in logged] == [v for _, v in written]
    assert all(s_log == s + 1 for (s_log, _), (s, _) in zip(logged, written, strict=True))


def test_dataset_indices_are_those_the_trainer_trained_on(run):
    probe, inputs = run["probe"], run["inputs"]
    assert len(inputs.calls) == ACCUM * STEPS
    for t in range(STEPS):
        want = seen_indices(inputs.of_step(t))
        np.testing.assert_array_equal(probe.steps[t]["indices"], want, err_msg=f"step {t}")
    # five steps per epoch: each epoch sees every example once
    for epoch in range(STEPS // 5):
        seen = np.concatenate([probe.steps[t]["indices"] for t in range(5 * epoch, 5 * epoch + 5)])
        assert sorted(seen) == list(range(N_DATA))


def test_tracin_self_influence_is_filed_under_the_examples_trained_on(run):
    """TracIn(z, z) = sum_t lr_t / N ||g_t(z)||^2, with z read off the model's inputs."""
    probe, inputs, h = run["probe"], run["inputs"], run["callback"].cockpit.history
    want = np.zeros(N_DATA)
    for t in range(STEPS):
        sq = sum(probe.steps[t]["sq"].values())
        np.add.at(want, seen_indices(inputs.of_step(t)), probe.steps[t]["lrs"][0] / N * sq)
    got = h.last("tracin/self_influence")
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=0)
    assert h.last("tracin/steps") == STEPS


def test_dataset_indices_with_persistent_loader_workers(tmp_path):
    """Two persistent worker processes (index lists sent ahead of the batches, the iterator reset at each
    epoch): the indices still follow the batches, across the epoch boundary at step 5."""
    model = gpt2()
    inputs, probe = Inputs(model), Probe()
    args = training_args(tmp_path, max_steps=7, dataloader_num_workers=2, dataloader_persistent_workers=True)
    train(model, args, CockpitCallback(instruments=[probe]))
    for t in range(7):
        np.testing.assert_array_equal(probe.steps[t]["indices"], seen_indices(inputs.of_step(t)), err_msg=f"step {t}")


def _loop_float64(model: nn.Module, theta: dict, calls: list[dict]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """g_i = N d(share_i)/dtheta per sequence i of the step, in float64, one autograd call each, with the
    model's own loss definition: share_i = sum of sequence i's next-token losses (labels -100 ignored) /
    num_items_in_batch (the counted targets of the whole accumulated step). Returns ({name: ||g_i||^2}, shares)."""
    m = copy.deepcopy(model).double()
    m.load_state_dict({k: v.double() for k, v in theta.items()}, strict=False)
    m.eval()  # dropout is 0: train and eval agree; no Trainer RNG in the reference
    params = {n: p for n, p in m.named_parameters() if p.requires_grad}
    items = {float(c["num_items_in_batch"]) for c in calls}
    assert len(items) == 1  # one normaliser for the whole accumulated step
    (items,) = items  # as the Trainer counted it (all labels here: GPT-2's config names no loss_type)
    sq = {n: [] for n in params}
    shares = []
    for c in calls:
        for i in range(c["input_ids"].shape[0]):
            logits = m(input_ids=c["input_ids"][i : i + 1]).logits[0]
            ce = F.cross_entropy(logits[:-1], c["labels"][i, 1:], ignore_index=-100, reduction="sum")
            share = ce / items
            grads = torch.autograd.grad(share, list(params.values()), allow_unused=True)
            for n, g in zip(params, grads, strict=True):
                sq[n].append(0.0 if g is None else float((N * g).square().sum()))
            shares.append(float(share.detach()))
    return {n: np.asarray(v) for n, v in sq.items()}, np.asarray(shares)


def test_per_sample_norms_and_losses_equal_the_float64_loop(run):
    probe, inputs, model = run["probe"], run["inputs"], run["model"]
    t = probe.snapshot_step
    calls = inputs.of_step(t)
    ref, shares = _loop_float64(model, probe.theta, calls)
    got = probe.steps[t]
    assert set(got["sq"]) == set(ref)
    for name, want in ref.items():
        np.testing.assert_allclose(got["sq"][name], want, rtol=1e-5, atol=1e-5 * want.max(), err_msg=name)
    # the step's loss is the sum of the shares; per-sample losses are N x share (mean_i l_i = loss)
    assert shares.sum() == pytest.approx(trainer_logs(run["trainer"])[t]["loss"], rel=1e-5)
    np.testing.assert_allclose(got["per_sample_loss"], N * shares, rtol=1e-5)
    assert not any("left out" in n for n in got["notes"])


def test_the_first_accumulated_step_has_every_statistic(tmp_path):
    """The callback declares the accumulation before the first step, so step 0 keeps its first micro-batch's
    factors and has g_i . gbar (the inner-product test) without an instrument that asks for projections."""
    callback = CockpitCallback(instruments=[GradientTests()])
    train(gpt2(), training_args(tmp_path, max_steps=2), callback)
    h = callback.cockpit.history
    assert [s for s, _ in h["tests/inner"]] == [0, 1] and all(np.isfinite(v) for _, v in h["tests/inner"])
    assert "note/gradient_tests" not in h


def test_training_is_bit_identical_with_and_without_the_callback(tmp_path):
    """Default dropout (the cockpit must not draw from the Trainer's random stream), AdamW, clipping,
    accumulation, a scheduler: the same parameters after 6 steps; with ``overlap=True`` too, whose
    records (made one step later) are the same numbers."""
    steps = 6
    plain = gpt2(dropout=0.1)
    tracked = gpt2(dropout=0.1)
    lagged = gpt2(dropout=0.1)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), tracked.parameters(), strict=True))
    a = train(plain, training_args(tmp_path / "a", max_steps=steps))
    callback = CockpitCallback(instruments=[*economy(), TracIn()])
    b = train(tracked, training_args(tmp_path / "b", max_steps=steps), callback)
    overlapped = CockpitCallback(instruments=[*economy(), TracIn()], overlap=True)
    c = train(lagged, training_args(tmp_path / "c", max_steps=steps), overlapped)
    for (n, p), q, r in zip(plain.named_parameters(), tracked.parameters(), lagged.parameters(), strict=True):
        assert torch.equal(p, q) and torch.equal(p, r), n
    assert [e["loss"] for e in trainer_logs(a)] == [e["loss"] for e in trainer_logs(b)] == [
        e["loss"] for e in trainer_logs(c)
    ]
    assert len(callback.cockpit.history["loss"]) == steps and "persample/grad_norm" in callback.cockpit.history
    assert overlapped.cockpit.overlap
    sync, late = _without_costs(callback.cockpit.history), _without_costs(overlapped.cockpit.history)
    assert sync.keys() == late.keys()
    for tag in sync:
        assert len(sync[tag]) == len(late[tag]) and all(map(_same, sync[tag], late[tag])), tag


def _without_costs(history) -> dict:
    return {tag: history[tag] for tag in history if not tag.startswith(("cost/", "note/"))}


def _same(a, b) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):  # (step, value) pairs
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return a == b


@pytest.mark.parametrize("restore_flag", [False, True], ids=["default", "restore_callback_states"])
def test_resume_from_checkpoint_continues_the_cockpit(tmp_path, restore_flag):
    """Checkpoint at step 3 (mid-epoch: the Trainer skips 6 batches on resume), interrupted after step 6,
    resumed from the checkpoint to step 6 with the same logdir: the records of steps 3-5 and TracIn's sums
    equal the uninterrupted run's; the run's directory is continued (no second run directory), its JSON
    lines cut back to the checkpoint, and it reads back as the uninterrupted run's."""
    steps, ckpt = 6, 3
    kw = dict(max_steps=steps, save_strategy="steps", save_steps=ckpt)
    kw["restore_callback_states_from_checkpoint"] = restore_flag
    logdir = tmp_path / "log"
    full_cb = CockpitCallback(instruments=[*economy(), TracIn()], logdir=logdir, sinks=[])
    train(gpt2(), training_args(tmp_path / "a", **kw), full_cb)
    checkpoint = tmp_path / "a" / f"checkpoint-{ckpt}"
    assert (checkpoint / STATE_FILE).exists()
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["CockpitCallback"]
    assert saved["attributes"]["cockpit_step"] == ckpt
    # the uninterrupted run's log, for reference; the run in `logdir` went on past the checkpoint
    shutil.copytree(logdir, tmp_path / "reference")

    model = gpt2(seed=1)  # other weights: the checkpoint's are loaded
    inputs = Inputs(model)
    probe = Probe()
    resumed_cb = CockpitCallback(instruments=[*economy(), TracIn(), probe], logdir=logdir, sinks=[])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = train(model, training_args(tmp_path / "b", **kw), resumed_cb, resume_from_checkpoint=str(checkpoint))
    assert [str(w.message) for w in caught if issubclass(w.category, CockpitWarning)] == []
    assert any(cb is resumed_cb for cb in trainer.callback_handler.callbacks)  # the user's object, not a rebuilt one
    full, resumed = _without_costs(full_cb.cockpit.history), _without_costs(resumed_cb.cockpit.history)
    assert [s for s, _ in resumed["loss"]] == list(range(ckpt, steps))
    for tag, pairs in resumed.items():
        if tag.startswith("probe"):
            continue
        want = [(s, v) for s, v in full[tag] if s >= min(s_ for s_, _ in pairs)]
        assert len(want) == len(pairs) and all(_same(a, b) for a, b in zip(want, pairs, strict=True)), tag
    np.testing.assert_array_equal(resumed["tracin/self_influence"][-1][1], full["tracin/self_influence"][-1][1])
    for t in range(ckpt, steps):  # the skipped batches are skipped in the indices too
        np.testing.assert_array_equal(probe.steps[t]["indices"], seen_indices(inputs.of_step(t - ckpt)))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("log")) == ["log"]
    lines = [json.loads(x) for x in (logdir / "cockpit.jsonl").read_text().splitlines()]
    reference = [json.loads(x) for x in (tmp_path / "reference" / "cockpit.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [x["step"] for x in reference]  # cut: no step written twice
    on_disk_a, on_disk_b = _without_costs(load(tmp_path / "reference")), _without_costs(load(logdir))
    assert on_disk_a.keys() == on_disk_b.keys()
    for tag in on_disk_a:
        assert len(on_disk_a[tag]) == len(on_disk_b[tag]), tag
        assert all(_same(a, b) for a, b in zip(on_disk_a[tag], on_disk_b[tag], strict=True)), tag


# --- accelerate ---------------------------------------------------------------------------------------
def _accelerate_run(prepared: bool, accumulate: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    """Three optimizer steps of GPT-2 on the dataset, clipped to 1.0, with a plain Cockpit; with
    ``prepared`` through ``Accelerator(cpu=True).prepare(model, optimizer)``, ``accelerator.backward``
    and ``accelerator.clip_grad_norm_``; with ``accumulate`` two micro-batches per step (accelerate's
    ``accumulate()``; the plain loop divides the loss by 2)."""
    data = dataset()
    model = gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    k = 2 if accumulate else 1
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=k) if prepared else None
    if prepared:
        model, optimizer = accelerator.prepare(model, optimizer)
        assert type(optimizer).__name__ == "AcceleratedOptimizer"
    cockpit = Cockpit(model, optimizer, instruments=[*economy(), Clipping(max_norm=1.0, kinds="global")])
    with cockpit:
        for micro in range(3 * k):
            batch = {key: torch.stack([d[key] for d in data[BATCH * micro : BATCH * (micro + 1)]]) for key in data[0]}
            if prepared:
                with accelerator.accumulate(model):
                    accelerator.backward(model(**batch).loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    optimizer.zero_grad()
            else:
                (model(**batch).loss / k).backward()
                if (micro + 1) % k == 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    optimizer.zero_grad()
    assert cockpit.optimizer is not optimizer if prepared else cockpit.optimizer is optimizer
    return _without_costs(cockpit.history), {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("accumulate", [False, True], ids=["one_batch", "accumulate_2"])
def test_an_accelerate_prepared_model_and_optimizer_give_the_same_numbers(accumulate):
    plain, theta_plain = _accelerate_run(prepared=False, accumulate=accumulate)
    prepared, theta_prepared = _accelerate_run(prepared=True, accumulate=accumulate)
    assert all(torch.equal(theta_plain[n], theta_prepared[n]) for n in theta_plain)
    assert plain.keys() == prepared.keys() and {"loss", "persample/grad_norm", "tests/inner", "alpha"} <= plain.keys()
    assert [s for s, _ in prepared["loss"]] == [0, 1, 2]
    for tag in plain:  # the same numbers, bit for bit: prepare() on the CPU changes nothing they depend on
        assert len(plain[tag]) == len(prepared[tag]), tag
        assert all(_same(a, b) for a, b in zip(plain[tag], prepared[tag], strict=True)), tag


@pytest.mark.parametrize("wrap", ["prepared", "skip_first_batches", "skip_data_loader"])
def test_track_follows_the_batches_of_accelerate_loaders(wrap):
    """``cockpit.track()`` over accelerate's loaders (which build the torch iterator lazily, at their first
    batch): the recorded indices are those of the examples the model was given, skipped batches skipped."""
    from accelerate.data_loader import SkipDataLoader
    from torch.utils.data import DataLoader

    data = dataset()
    model = gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = DataLoader(data, batch_size=BATCH, shuffle=True)
    if wrap == "skip_data_loader":
        loader = SkipDataLoader(data, skip_batches=3, batch_size=BATCH, shuffle=True)
    else:
        accelerator = Accelerator(cpu=True)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        if wrap == "skip_first_batches":
            loader = accelerator.skip_first_batches(loader, 3)
    inputs, probe = Inputs(model), Probe()
    with Cockpit(model, optimizer, instruments=[probe]) as cockpit:
        for batch in cockpit.track(loader):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    steps = N_DATA // BATCH - (0 if wrap == "prepared" else 3)
    assert len(inputs.calls) == steps and sorted(probe.steps) == list(range(steps))
    for t in range(steps):
        np.testing.assert_array_equal(probe.steps[t]["indices"], seen_indices([inputs.calls[t]]), err_msg=f"step {t}")
    assert probe.steps[0]["indices"].tolist() != list(range(BATCH))  # shuffled: the check is not of 0, 1, 2, ...


def test_a_failure_in_the_callback_warns_and_training_goes_on(tmp_path, monkeypatch):
    from cockpit_lite.integrations import huggingface

    def broken(self):
        raise RuntimeError("boom")

    monkeypatch.setattr(huggingface.TrainerIndices, "next_batch", broken)
    model = gpt2()
    callback = CockpitCallback(instruments=["loss"])
    with pytest.warns(CockpitWarning) as caught:
        trainer = train(model, training_args(tmp_path, max_steps=3), callback)
    messages = sorted({str(w.message) for w in caught if issubclass(w.category, CockpitWarning)})
    assert messages == [
        f"cockpit-lite: the Trainer callback's {event} failed (RuntimeError: boom); training goes on"
        for event in ("on_step_begin", "on_substep_end")
    ]
    assert trainer.state.global_step == 3 and [s for s, _ in callback.cockpit.history["loss"]] == [0, 1, 2]


def test_an_unreadable_state_file_continues_the_step_count_with_a_warning(tmp_path):
    train(gpt2(), training_args(tmp_path / "a", max_steps=2, save_strategy="steps", save_steps=2), CockpitCallback())
    checkpoint = tmp_path / "a" / "checkpoint-2"
    (checkpoint / STATE_FILE).write_bytes(b"not a state")
    callback = CockpitCallback()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(gpt2(), training_args(tmp_path / "b", max_steps=3), callback, resume_from_checkpoint=str(checkpoint))
    messages = [str(w.message) for w in caught if issubclass(w.category, CockpitWarning)]
    assert any("no cockpit_state.pt of step 2" in m and "instruments start afresh" in m for m in messages)
    assert any("no saved state for instrument 'alpha'" in m for m in messages)
    assert [s for s, _ in callback.cockpit.history["loss"]] == [2]
