"""A GAN's loop: the cockpit watches the generator and its optimizer, while the discriminator trains beside it
with its own optimizer and losses in the same iteration. The generator's step (its loss, per-sample losses,
gradient norm, per-sample gradient norms) must be exactly the generator's, whichever network steps first and
whether the loss is a module the cockpit watches (shared by both networks, as Lightning's GAN example does) or
a functional loss. Checked against a float64 loop over examples, one autograd call each, with the networks
as they were at the generator's backward; and with the real Lightning Trainer (manual optimization, two
optimizers).

Before this was handled, the discriminator's backward (run between the generator's forward and its step) was
added into the step's loss, its loss-module calls into the per-sample losses (or its per-example
cross-entropy taken for the generator's examples), and its backward through the shared loss module's hook
left the per-sample engine dark for the step."""

from __future__ import annotations

import copy
import warnings

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cockpit_lite.instruments import GradNorm, Loss, PerSampleGradNorms
from torch import nn

from cockpit_lite import Cockpit
from cockpit_lite.integrations.lightning import CockpitCallback

B, Z, X = 5, 4, 6
STEPS = 3


def _nets(classes: int = 1) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(Z, 8), nn.Tanh(), nn.Linear(8, X)).double()
    disc = nn.Sequential(nn.Linear(X, 8), nn.Tanh(), nn.Linear(8, classes)).double()
    return gen, disc


def _bce(logits: torch.Tensor) -> torch.Tensor:
    """The generator's per-example loss: its samples taken for real (label 1)."""
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none").sum(1)


def _ce(logits: torch.Tensor) -> torch.Tensor:
    """The same for a two-class discriminator: class 1, real."""
    return F.cross_entropy(logits, torch.ones(len(logits), dtype=torch.long), reduction="none")


def _reference(gen: nn.Module, disc: nn.Module, z: torch.Tensor, per_example) -> dict:
    """The generator's step by the definitions, float64, one autograd call per example: l_i = the generator
    loss of example i alone, g_i its gradient in the generator's parameters (mean loss: p.grad = mean_i g_i)."""
    gen, disc = copy.deepcopy(gen), copy.deepcopy(disc)  # (no cockpit hook fires on the copies)
    losses, grads = [], []
    for i in range(len(z)):
        li = per_example(disc(gen(z[i : i + 1])))[0]
        g = torch.autograd.grad(li, list(gen.parameters()))
        losses.append(float(li))
        grads.append(torch.cat([t.reshape(-1) for t in g]).numpy())
    grads = np.stack(grads)
    norms = np.linalg.norm(grads, axis=1)
    return {"losses": np.array(losses), "norms": norms, "grad_norm": np.linalg.norm(grads.mean(0))}


def _run_loop(order: str, loss: str) -> tuple[Cockpit, list[dict], list[str]]:
    """STEPS iterations of a GAN loop, the cockpit on the generator. ``order``: "d_first" (the discriminator
    steps on a detached sample between the generator's forward and its step: Lightning's GAN example,
    PyTorch's DCGAN) or "g_first". ``loss``: "module" (one BCEWithLogitsLoss for both, given to the cockpit),
    "functional" (F.binary_cross_entropy_with_logits, no loss_fn) or "cross_entropy" (a two-class
    discriminator with F.cross_entropy: per-example losses from the backward root's NLL node)."""
    classes = 2 if loss == "cross_entropy" else 1
    gen, disc = _nets(classes)
    g_opt = torch.optim.SGD(gen.parameters(), lr=0.1, momentum=0.9)
    d_opt = torch.optim.SGD(disc.parameters(), lr=0.1)
    criterion = nn.BCEWithLogitsLoss()
    per_example = _ce if loss == "cross_entropy" else _bce

    def crit(logits: torch.Tensor, label: float) -> torch.Tensor:
        if loss == "module":
            return criterion(logits, torch.full_like(logits, label))
        if loss == "functional":
            return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))
        return F.cross_entropy(logits, torch.full((len(logits),), int(label)))

    g = torch.Generator().manual_seed(1)
    refs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cockpit = Cockpit(
            gen,
            g_opt,
            criterion if loss == "module" else None,
            instruments=[Loss(), GradNorm(), PerSampleGradNorms()],
            sinks=[],
        )
        for _ in range(STEPS):
            z = torch.randn(B, Z, generator=g, dtype=torch.float64)
            real = torch.randn(B, X, generator=g, dtype=torch.float64)

            def d_step(fake, real=real):
                d_opt.zero_grad()
                (crit(disc(real), 1.0) + crit(disc(fake.detach()), 0.0)).backward()
                d_opt.step()

            if order == "g_first":
                g_opt.zero_grad()
            fake = gen(z)
            if order == "d_first":
                d_step(fake)
                g_opt.zero_grad()
            refs.append(_reference(gen, disc, z, per_example))
            crit(disc(fake), 1.0).backward()
            g_opt.step()
            if order == "g_first":
                d_step(fake)
        cockpit.close()
    return cockpit, refs, [str(w.message) for w in caught]


def _assert_generator_steps(history, refs: list[dict], per_sample_losses: bool = True) -> None:
    for step, ref in enumerate(refs):
        assert history.value_at("loss", step) == pytest.approx(ref["losses"].mean(), rel=1e-12)
        if per_sample_losses:
            np.testing.assert_allclose(history.value_at("loss/per_sample", step), ref["losses"], rtol=1e-10)
        np.testing.assert_allclose(history.value_at("persample/grad_norm", step), ref["norms"], rtol=1e-10)
        assert history.value_at("grad_norm", step) == pytest.approx(ref["grad_norm"], rel=1e-10)
        assert history.value_at("skipped", step) is None  # (no iteration was abandoned)


@pytest.mark.parametrize("order", ["d_first", "g_first"])
@pytest.mark.parametrize("loss", ["module", "functional", "cross_entropy"])
def test_the_generator_step_is_the_generators_alone(order, loss):
    cockpit, refs, said = _run_loop(order, loss)
    # (a functional binary cross-entropy has no per-example losses the cockpit can read: said in a note)
    _assert_generator_steps(cockpit.history, refs, per_sample_losses=loss != "functional")
    notes = [t for t in cockpit.history if t.startswith("note/")]
    assert notes == (["note/loss"] if loss == "functional" else [])  # nothing else left out
    if loss == "functional":
        assert cockpit.history.last("note/loss").startswith("no per-sample losses: the loss is not computed by a loss")
    other = [m for m in said if "did not reach the model's outputs" in m]
    # the discriminator's losses inside a generator step are named once; after its step they are no step's
    assert len(other) == (1 if order == "d_first" else 0)
    assert not [m for m in said if "second backward" in m]


class GAN(L.LightningModule):
    """Lightning's GAN example in small: manual optimization, the discriminator stepped first on a detached
    sample, then the generator, one BCEWithLogitsLoss module for both. ``seen`` keeps, per generator step, its
    noise and both networks as its backward met them (for the float64 reference)."""

    def __init__(self):
        super().__init__()
        self.generator, self.discriminator = _nets()
        self.criterion = nn.BCEWithLogitsLoss()
        self.automatic_optimization = False
        self.seen: list[tuple] = []
        self.g_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        real, z = batch
        g_opt, d_opt = self.optimizers()
        fake = self.generator(z)
        d_loss = self.criterion(self.discriminator(real), torch.ones(len(real), 1, dtype=real.dtype)) + self.criterion(
            self.discriminator(fake.detach()), torch.zeros(len(z), 1, dtype=z.dtype)
        )
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()
        g_loss = self.criterion(self.discriminator(fake), torch.ones(len(z), 1, dtype=z.dtype))
        self.seen.append((z.clone(), copy.deepcopy(self.generator), copy.deepcopy(self.discriminator)))
        self.g_losses.append(float(g_loss))
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()

    def configure_optimizers(self):
        sgd = torch.optim.SGD
        return [sgd(self.generator.parameters(), lr=0.1), sgd(self.discriminator.parameters(), lr=0.1)]


def test_lightning_gan_tracks_the_generator_exactly(tmp_path):
    g = torch.Generator().manual_seed(2)
    real, noise = (torch.randn(STEPS * B, n, generator=g, dtype=torch.float64) for n in (X, Z))
    data = torch.utils.data.TensorDataset(real, noise)
    module = GAN()
    instruments = [Loss(), GradNorm(), PerSampleGradNorms()]
    callback = CockpitCallback(instruments=instruments, loss_fn=module.criterion, sinks=[], logdir=tmp_path / "run")
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=B))
    said = [str(w.message) for w in caught]
    assert any("2 optimizers: the cockpit tracks the first" in m for m in said)
    assert sum("did not reach the model's outputs" in m for m in said) == 1
    assert callback.cockpit.model is module.generator
    refs = [_reference(gen, disc, z, _bce) for z, gen, disc in module.seen]
    assert len(refs) == STEPS
    _assert_generator_steps(callback.history, refs)
    assert [callback.history.value_at("loss", s) for s in range(STEPS)] == pytest.approx(module.g_losses, rel=1e-12)
