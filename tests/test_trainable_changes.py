"""The parameters a run trains may change mid-run: a frozen backbone unfrozen after a few steps (transfer
learning, ULMFiT's gradual unfreezing, fastai's ``fine_tune``), a layer frozen, a parameter group added to the
optimizer. From the first step after the change every statistic covers the new set: the gradient norm, the
update, the distance from the initial parameters (a tensor that starts training measured from its value then:
where it was all along), and the per-sample gradient norms, against direct computation and a float64 loop over
examples (one autograd call each). The step of the change carries a note; a warning says it once.

Before: the cockpit kept the set it was built with: after unfreezing, the gradient norm and the per-sample norms
left the unfrozen layer out while the coverage said 1.0, with no word."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cockpit_lite.instruments import Distance, GradNorm, PerSampleGradNorms, UpdateSize
from torch import nn

from cockpit_lite import Cockpit

B, STEPS, CHANGE = 5, 4, 2


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


@pytest.mark.parametrize("change", ["unfreeze", "freeze", "add_group"])
def test_the_trained_set_is_followed_from_the_step_it_changes(change):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    body, head = list(model[0].parameters()), list(model[2].parameters())
    if change == "unfreeze":
        for p in body:
            p.requires_grad_(False)
    opt = torch.optim.SGD(head if change == "add_group" else model.parameters(), lr=0.1, momentum=0.9)
    if change == "add_group":
        for p in body:
            p.requires_grad_(False)  # (not trained before its group is added)
    lf = nn.CrossEntropyLoss()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    expected, trained_at = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cockpit = Cockpit(
            model, opt, lf, instruments=[GradNorm(), PerSampleGradNorms(), UpdateSize(), Distance()], sinks=[]
        )
        for step in range(STEPS):
            if step == CHANGE:
                if change == "unfreeze":
                    for p in body:
                        p.requires_grad_(True)
                elif change == "freeze":
                    for p in body:
                        p.requires_grad_(False)
                else:
                    for p in body:
                        p.requires_grad_(True)
                    opt.add_param_group({"params": body, "lr": 0.01})
            trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            trained_at.append([n for n, _ in trained])
            x = torch.randn(B, 4, generator=g, dtype=torch.float64)
            y = torch.randint(0, 3, (B,), generator=g)
            copied = copy.deepcopy(model)
            ps = [p for n, p in copied.named_parameters() if p.requires_grad]
            rows = np.stack(
                [
                    _flat(torch.autograd.grad(F.cross_entropy(copied(x[i : i + 1]), y[i : i + 1]), ps)).numpy()
                    for i in range(B)
                ]
            )
            start = {n: p.detach().clone() for n, p in trained}
            opt.zero_grad()
            lf(model(x), y).backward()
            opt.step()
            expected.append(
                {
                    "norms": np.linalg.norm(rows, axis=1),
                    "grad_norm": np.linalg.norm(rows.mean(0)),
                    "update": float(_flat(p - start[n] for n, p in trained).norm()),
                    # theta_t - theta_0 at the step's start (a tensor that starts training: from its value then,
                    # which is theta_0 for a tensor frozen until then)
                    "distance": float(_flat(start[n] - theta0[n] for n, _ in trained).norm()),
                }
            )
        cockpit.close()
    h = cockpit.history
    for step, want in enumerate(expected):
        np.testing.assert_allclose(h.value_at("persample/grad_norm", step), want["norms"], rtol=1e-10)
        assert h.value_at("grad_norm", step) == pytest.approx(want["grad_norm"], rel=1e-10)
        assert h.value_at("update_size", step) == pytest.approx(want["update"], rel=1e-10)
        assert h.value_at("distance", step) == pytest.approx(want["distance"], rel=1e-10, abs=1e-15)
        assert h.value_at("persample/coverage", step) == pytest.approx(1.0)
        per_tensor = sorted(
            t.removeprefix("grad_norm/") for t in h if t.startswith("grad_norm/") and h.value_at(t, step)
        )
        assert per_tensor == sorted(trained_at[step])
    said = [str(w.message) for w in caught if "the parameters the optimizer trains changed" in str(w.message)]
    assert len(said) == 1
    assert f"changed at step {CHANGE}:" in h.value_at("note/grad_norm", CHANGE)  # (the note names the step)
    assert (
        "start training (0.weight, 0.bias)" in said[0]
        if change != "freeze"
        else "stopped (0.weight, 0.bias)" in said[0]
    )
    notes = [s for s, v in h["note/grad_norm"]] if "note/grad_norm" in h else []
    assert notes == [CHANGE]


def test_lightning_backbone_finetuning_is_followed(tmp_path):
    """Lightning's BackboneFinetuning callback: the backbone frozen before training, unfrozen at epoch 1 with
    its own parameter group added to the optimizer. The cockpit's gradient norm of every step against
    ||p.grad|| read in Lightning's on_before_optimizer_step over the parameters the optimizer then holds."""
    import lightning as L
    from lightning.pytorch.callbacks import BackboneFinetuning, Callback

    from cockpit_lite.integrations.lightning import CockpitCallback

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.backbone = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.backbone(x))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    class Truth(Callback):
        def __init__(self):
            self.norms: list[float] = []
            self.trained: list[int] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            held = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            self.norms.append(float(_flat(p.grad for p in held).norm()))
            self.trained.append(len(held))

    g = torch.Generator().manual_seed(2)
    data = torch.utils.data.TensorDataset(
        torch.randn(4 * B, 4, generator=g), torch.randint(0, 3, (4 * B,), generator=g)
    )
    truth = Truth()
    cockpit = CockpitCallback(instruments=[GradNorm(), PerSampleGradNorms()], sinks=[], logdir=tmp_path / "run")
    finetune = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=0.1, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[finetune, truth, cockpit],
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=B))
    assert truth.trained == [2] * 4 + [4] * 4  # (the head alone, then the backbone too)
    h = cockpit.history
    assert [h.value_at("grad_norm", s) for s in range(8)] == pytest.approx(truth.norms, rel=1e-6)
    assert [h.value_at("persample/coverage", s) for s in range(8)] == pytest.approx([1.0] * 8, abs=1e-6)
    assert "changed at step 4:" in h.value_at("note/grad_norm", 4)
    assert any("changed: 2 start training (backbone.0.weight, backbone.0.bias)" in str(w.message) for w in caught)


def test_a_set_toggled_every_step_is_followed_and_said_twice():
    """A loop freezing and unfreezing the same layer step by step: every step is followed (gradient norm against
    ||p.grad|| of the tensors that train that step), and the warning is given once per kind of change."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lf = nn.CrossEntropyLoss()
    want = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Cockpit(model, opt, lf, instruments=[GradNorm(), PerSampleGradNorms()], sinks=[]) as cockpit:
            for step in range(6):
                for p in model[0].parameters():
                    p.requires_grad_(step % 2 == 0)
                x, y = torch.randn(B, 4, dtype=torch.float64), torch.randint(0, 3, (B,))
                opt.zero_grad()
                lf(model(x), y).backward()
                want.append(float(_flat(p.grad for p in model.parameters() if p.grad is not None).norm()))
                opt.step()
    h = cockpit.history
    assert [v for _, v in h["grad_norm"]] == pytest.approx(want, rel=1e-10)
    assert [v for _, v in h["persample/coverage"]] == pytest.approx([1.0] * 6)
    said = [w for w in caught if "the parameters the optimizer trains changed" in str(w.message)]
    assert len(said) == 2  # (stopped, then started again: each said once)
