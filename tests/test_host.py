"""The step's host batch (cockpit_lite/host.py): its values, its callbacks, and one transfer per step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cockpit_lite.instruments import Distance, GradientTests, GradNorm, Loss, UpdateSize
from torch import nn

import cockpit_lite.host as host
from cockpit_lite import Cockpit
from cockpit_lite.host import HostBatch, LazyNorms
from cockpit_lite.step import SealedRecordError, StepRecord


def test_values_come_back_exact_in_their_shapes_from_any_float_dtype(device):
    batch = HostBatch()
    a = torch.randn(3, 4, device=device)
    b = torch.randn((), dtype=torch.float64, device=device)
    c = torch.randn(5, device=device).to(torch.bfloat16)
    first = batch.defer([a, b])
    second = batch.defer([c])
    assert first.values is None and second.values is None  # nothing moves before the flush
    batch.flush()
    got_a, got_b = first.values
    (got_c,) = second.values
    assert got_a.shape == (3, 4) and got_b.shape == () and got_c.shape == (5,)
    assert got_a.dtype == got_b.dtype == got_c.dtype == np.float64
    np.testing.assert_array_equal(got_a, a.double().cpu().numpy())  # float32 -> float64 is exact
    assert float(got_b) == b.item()
    np.testing.assert_array_equal(got_c, c.double().cpu().numpy())  # so is bfloat16 -> float64 (via float32)


def test_a_value_read_before_the_flush_brings_everything_pending():
    batch = HostBatch()
    seen = []
    early = batch.defer([torch.tensor([1.0, 2.0])])
    late = batch.defer([torch.tensor(3.0)], then=lambda values: seen.append(float(values[0])))
    np.testing.assert_array_equal(early.get()[0], [1.0, 2.0])
    assert late.values is not None and seen == [3.0]  # one flush served both, the callback ran
    batch.flush()  # nothing left: nothing runs twice
    assert seen == [3.0]


def test_what_cannot_be_brought_over_becomes_a_note_and_the_rest_arrives():
    record = StepRecord(step=0)
    warned = []
    record.host.warn = warned.append
    good = record.host.defer([torch.tensor([1.0, 2.0])])
    bad = record.host.defer([torch.empty(3, device="meta")])  # no values anywhere: cannot be copied
    failing = record.host.defer([torch.tensor(4.0)], then=lambda v: 1 / 0)
    record.host.defer([torch.tensor(5.0)], then=lambda v: setattr(record, "loss", float(v[0])))
    record.host.flush()  # never raises
    np.testing.assert_array_equal(good.values[0], [1.0, 2.0])
    assert record.loss == 5.0  # a failing callback does not stop the others
    with pytest.raises(RuntimeError, match="could not be brought to the host"):
        bad.get()
    assert failing.error.startswith("ZeroDivisionError")
    assert len(record.notes) == 2 and all("left out" in n for n in record.notes) and len(warned) == 2
    assert record.note_needs == (frozenset(), frozenset())  # (a note for every instrument of the step)


def test_lazy_norms_read_as_a_dict_and_know_their_length_without_a_transfer(monkeypatch):
    batch = HostBatch()
    tensors = [torch.randn(4, 3), torch.randn(7)]
    calls = []
    real = host.host_float64
    monkeypatch.setattr(host, "host_float64", lambda t: calls.append(1) or real(t))
    norms = host.norms(batch, ["w", "b"], tensors)
    assert isinstance(norms, LazyNorms) and len(norms) == 2 and list(norms) == ["w", "b"] and not calls
    want = {n: float(torch.linalg.vector_norm(t.double())) for n, t in zip(["w", "b"], tensors, strict=True)}
    assert dict(norms) == pytest.approx(want, rel=1e-6)
    assert len(calls) == 1
    assert host.norms(None, ["w"], tensors[:1]) == pytest.approx({"w": want["w"]}, rel=1e-6)  # no batch: now


def test_callbacks_fill_a_sealed_record_and_leave_it_sealed():
    record = StepRecord(step=0)
    record.host.defer([torch.tensor([1.0, 2.0])], then=lambda v: setattr(record, "per_sample_loss", v[0]))
    record.seal()
    with pytest.raises(SealedRecordError):
        record.loss = 1.0
    record.host.flush()  # (an instrument's read of a lazy value flushes while the record is sealed)
    np.testing.assert_array_equal(record.per_sample_loss, [1.0, 2.0])
    with pytest.raises(SealedRecordError):
        record.loss = 1.0


def test_a_tracked_step_brings_its_norms_and_per_sample_vectors_over_in_one_transfer(device, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(8, 6, device=device), torch.randint(0, 3, (8,), device=device)
    instruments = [Loss(), GradNorm(), UpdateSize(), Distance(), GradientTests()]
    with Cockpit(model, opt, loss_fn, instruments=instruments, sinks=[]) as cockpit:
        for _ in range(2):  # (the first step also checks that the per-sample gradients add up)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        transfers = []

        class Counted(host._Copy):  # every transfer, the blocking one (CPU) and the pinned one (CUDA)
            def __init__(self, t):
                transfers.append(t.numel())
                super().__init__(t)

        monkeypatch.setattr(host, "_Copy", Counted)
        theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        out = loss_fn(model(x), y)
        out.backward()
        loss = out.item()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        h = cockpit.history
    # the loss, the per-sample losses, 4 tensors x 3 norms (gradient, update, distance), ||g_i||^2 and
    # g_i . gbar (B = 8 each): one transfer
    assert transfers == [1 + 8 + 3 * 4 + 2 * 8]
    step = 2
    assert h.value_at("loss", step) == pytest.approx(loss, rel=1e-7)
    want_grad = float(torch.sqrt(sum(g.double().square().sum() for g in grads.values())))
    assert h.value_at("grad_norm", step) == pytest.approx(want_grad, rel=1e-6)
    for n, p in model.named_parameters():
        assert h.value_at(f"update_size/{n}", step) == pytest.approx(
            float((p.detach() - theta[n]).double().norm()), rel=1e-5
        )
        assert h.value_at(f"grad_norm/{n}", step) == pytest.approx(float(grads[n].double().norm()), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_norms_of_half_precision_parameters_are_taken_in_float32(dtype):
    """A model trained in float16/bfloat16 (not autocast): ||g|| against the float64 norm of the same
    gradients (a float16 norm above 65504 was inf; bfloat16 kept 8 bits); ||theta_t - theta_0|| and
    ||update|| too, up to the rounding of the differences, which are taken in the parameters' dtype."""
    torch.manual_seed(0)
    model = nn.Linear(100, 100).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    seen: dict[str, list[float]] = {"grad": [], "before": [], "after": []}
    theta0 = torch.cat([p.detach().double().flatten() for p in model.parameters()])

    def flat(ts):
        return torch.cat([t.detach().double().flatten() for t in ts])

    with Cockpit(model, opt, None, instruments=[GradNorm(), UpdateSize(), Distance()], sinks=[]) as cockpit:
        opt.register_step_pre_hook(lambda *a: seen["grad"].append(flat(p.grad for p in model.parameters())))
        opt.register_step_pre_hook(lambda *a: seen["before"].append(flat(model.parameters())))
        opt.register_step_post_hook(lambda *a: seen["after"].append(flat(model.parameters())))
        for _ in range(2):
            x = torch.randn(32, 100).to(dtype)
            opt.zero_grad()
            (model(x) * 200.0).sum().backward()  # gradient entries about 1e3, their norm about 1e5
            opt.step()
    h = cockpit.history
    for step in range(2):
        grad = seen["grad"][step].norm().item()
        assert grad > 65504  # what a float16 norm cannot hold
        assert dict(h["grad_norm"])[step] == pytest.approx(grad, rel=1e-5)
        rounding = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0**-11  # of the differences in the dtype
        assert dict(h["distance"])[step] == pytest.approx((seen["before"][step] - theta0).norm().item(), rel=rounding)
        update = (seen["after"][step] - seen["before"][step]).norm().item()
        assert dict(h["update_size"])[step] == pytest.approx(update, rel=rounding)


def test_a_model_moved_after_the_cockpit_was_built_is_followed(device):
    """model.to(...) after Cockpit(...): Distance's theta_0 (taken when attached) and the update's
    buffers follow the parameters to their device and dtype (before, on CUDA the difference raised on
    every step: Distance was dark)."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    theta0 = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cockpit = Cockpit(model, opt, nn.MSELoss(), instruments=[Distance(), UpdateSize()], sinks=[])
    model.to(device=device, dtype=torch.float64)
    before = []
    opt.register_step_pre_hook(lambda *a: before.append(torch.cat([p.detach().flatten() for p in model.parameters()])))
    with cockpit:
        for _ in range(3):
            x = torch.randn(8, 6, dtype=torch.float64, device=device)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), torch.zeros(8, 3, dtype=torch.float64, device=device)).backward()
            opt.step()
    h = cockpit.history
    assert sorted(dict(h["distance"])) == [0, 1, 2] and sorted(dict(h["update_size"])) == [0, 1, 2]
    for step in range(3):
        want = (before[step].cpu() - theta0).norm().item()
        assert dict(h["distance"])[step] == pytest.approx(want, rel=1e-12)  # in float64, as the model now is


def test_norms_of_tensors_on_several_devices_come_together(device):
    """A model spread over devices (HF device_map, pipeline stages): the norms are gathered on the first
    tensor's device before they are stacked (stacking across devices raised: GradNorm was dark)."""
    from cockpit_lite.compat import stacked_norms

    a, b = torch.full((4,), 2.0), torch.full((9,), 1.0, device=device)
    got = stacked_norms([a, b])
    assert got.device == a.device and got.tolist() == [4.0, 3.0]
    batch = HostBatch()
    lazy = host.norms(batch, ["a", "b"], [b, a])
    batch.flush()
    assert dict(lazy) == {"a": 3.0, "b": 4.0}
