"""A tracked step reads no tensor value on the host before its one transfer (cockpit_lite/host.py).

On CUDA every read (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``torch.equal``) waits for the
device. Counted on the CPU by :class:`tests.syncs.HostReads` from the second step on (the first step
checks the per-sample engine's gradient sums once, by one transfer), for the loops people run: a loss
module, a functional cross-entropy in the loop, a model that returns its own loss, with the economy
preset and the others.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from cockpit_lite.instruments import presets
from torch import nn

from cockpit_lite import Cockpit
from tests import models, models_lm
from tests.syncs import HostReads
from tests.test_any_loss import OwnLoss


def _mlp_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def _token_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 9, (4, 6), generator=g)
    return ids, ids


def _gpt_batch(seed: int):
    return models_lm.token_batch(4, 8, 50, seed=seed)


def _classes_batch(seed: int):
    torch.manual_seed(seed)
    return models.token_batch()


LOOPS = {
    "loss module": (models.mlp, _mlp_batch, None, nn.CrossEntropyLoss()),
    "functional cross-entropy": (models.mlp, _mlp_batch, lambda m, x, y: F.cross_entropy(m(x), y), None),
    "the model's own loss": (OwnLoss, _token_batch, lambda m, x, y: m(x, y)[1], None),
    # position embeddings broadcast over the batch, tied weights, the loss inside forward
    "nanoGPT": (models_lm.NanoGPT, _gpt_batch, lambda m, x, y: m(x, y)[1], None),
    # nn.MultiheadAttention, replayed in backward
    "TransformerEncoderLayer": (models.TinyTransformer, _classes_batch, None, nn.CrossEntropyLoss()),
}


def _train(make, batch, loss_of, loss_fn, instruments, steps=4, accumulate=1, scaler=None):
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with HostReads() as reads, Cockpit(model, opt, loss_fn, instruments=instruments, sinks=[]) as cockpit:
        for step in range(steps):
            for k in range(accumulate):
                x, y = batch(10 * step + k)
                loss = (loss_fn(model(x), y) if loss_fn is not None else loss_of(model, x, y)) / accumulate
                (scaler.scale(loss) if scaler is not None else loss).backward()
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad()
    return reads, cockpit


@pytest.mark.parametrize("loop", list(LOOPS))
@pytest.mark.parametrize("preset", ["economy", "full"])
def test_no_host_read_before_the_transfer(loop, preset):
    make, batch, loss_of, loss_fn = LOOPS[loop]
    reads, cockpit = _train(make, batch, loss_of, loss_fn, getattr(presets, preset)())
    assert not reads.after(1), reads.after(1)
    assert len(dict(cockpit.history["loss/per_sample"])) == 4  # (the statistics were computed)
    # the counter sees reads: the first step's check of the gradient sums is one
    assert [what for (where, what) in reads.after(0) if where.startswith("engine.py")] == ["cpu", "tolist"]


def test_tracin_with_probes_and_clipping_read_nothing_before_the_transfer():
    """TracIn (self-influence and 100 probes' influence, dataset indices from cockpit.track) and
    Clipping's three kinds: their rows join the step's one transfer (the probe pass itself, its own
    forward and backward, decides its conditions at once: not counted here, as it is not the step's)."""
    from cockpit_lite.instruments import Clipping, TracIn
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    tracin = TracIn(probes=(torch.randn(100, 6), torch.randint(0, 3, (100,))))
    clipping = Clipping(kinds=("global", "agc", "per_sample"), per_sample_clip=1.0)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    with HostReads() as reads, Cockpit(model, opt, loss_fn, instruments=[tracin, clipping], sinks=[]) as cockpit:
        for xb, yb in cockpit.track(loader):
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
    before = Counter({k: v for k, v in reads.after(1).items() if not k[0].startswith("engine.py")})
    assert not before and not reads.after(1, later=True), (before, reads.after(1, later=True))
    assert tracin.probe_steps == 4 and tracin.steps == 4
    h = cockpit.history
    assert len(dict(h["clip/global/norm"])) == len(dict(h["clip/per_sample/frac_clipped"])) == 4


def test_gradient_accumulation_reads_nothing_before_the_transfer():
    """Two micro-batches a step: the forward after a backward tells accumulation from a retry by the
    gradients' tensors and versions (no read), and gbar's check joins the transfer."""
    reads, cockpit = _train(models.mlp, _mlp_batch, None, nn.CrossEntropyLoss(), presets.economy(), accumulate=2)
    assert not reads.after(1) and not reads.after(1, later=True), (reads.after(1), reads.after(1, later=True))
    assert len(dict(cockpit.history["tests/inner"])) == 4  # g_i . gbar of every accumulated step


def test_grad_scaler_scale_is_read_before_the_forward_and_followed_when_it_changes():
    """GradScaler: the loss scale is read at the step's start (nothing of the step queued), not at
    backward, and each step uses the scale its loss was multiplied by, also after an overflowing step
    made the scaler back off (the scale tensor's version counter says it changed)."""
    from tests.reference import Probe

    torch.manual_seed(0)
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    probe = Probe(flags=set(presets.economy()[0].NEEDS))
    loss_fn = nn.CrossEntropyLoss()
    used = []
    with HostReads() as reads, Cockpit(model, opt, loss_fn, instruments=[probe], sinks=[]):
        for step in range(6):
            x, y = _mlp_batch(step)
            loss = loss_fn(model(x), y) * (float("inf") if step == 2 else 1.0)  # step 2 overflows
            used.append(scaler.get_scale())
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    assert not reads.after(1), reads.after(1)
    assert used[2] > used[1] and used[3] < used[2]  # grown, then backed off after the overflow
    # (the overflowing step was skipped by the scaler: no optimizer step, no record)
    assert [r.backward_scale for r in probe.records] == used[:2] + used[3:]
