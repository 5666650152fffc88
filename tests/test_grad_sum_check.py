"""The engine's first-step check: the per-sample gradients it sees must add up to p.grad.

A parameter that gets gradient from outside the module calls the engine hooks (a regulariser added to
the loss, a functional use of a weight) would otherwise have silently wrong per-sample statistics.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cockpit_lite import Cockpit, Need
from tests import models
from tests.reference import Probe

MISMATCH = "do not add up to the gradient"


def _step(model, loss_fn, x, y, extra=None, scale=1.0, zero_grad=True, probe=None, device="cpu"):
    """One step on ``device`` (model and data moved there, p.grad with the model)."""
    model.to(device)
    x, y = x.to(device), y.to(device)
    probe = probe or Probe(flags={Need.PER_SAMPLE_SQ_NORMS})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ck = Cockpit(model, opt, loss_fn, instruments=[probe])
    if zero_grad:
        opt.zero_grad()
    loss = loss_fn(model(x), y)
    if extra is not None:
        loss = loss + extra(model)
    (loss * scale).backward()
    opt.step()
    ck.close()
    return ck, probe.records[0]


@pytest.mark.parametrize(
    "name,build,batch",
    [
        ("mlp", lambda: models.mlp(), lambda: (torch.randn(7, 6), torch.randint(0, 3, (7,)))),
        ("cnn", lambda: models.GroupedCNN(), lambda: models.cnn_batch(6)),
        ("transformer", lambda: models.TinyTransformer(), lambda: models.token_batch(5)),
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_supported_models_pass_the_check(device, name, build, batch, reduction):
    torch.manual_seed(0)
    model = build()
    x, y = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all, the mismatch one included
        ck, rec = _step(model, nn.CrossEntropyLoss(reduction=reduction), x, y, device=device)
    assert ck.engine.checks_left == 0, "the check did not complete"
    assert not any(MISMATCH in n for n in rec.notes)


class TinyBranch(nn.Module):
    """A branch whose gradient is about 1e-25 (its output scaled by 1e-25: what HF's std-0.02 init leaves in
    deep MobileNetV2 / EfficientNet stacks): products of such gradients underflow float32."""

    def __init__(self):
        super().__init__()
        self.small, self.other, self.head = nn.Linear(5, 8), nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.other(x) + 1e-25 * self.small(x))


def test_gradients_too_small_to_check_in_float32_raise_no_false_alarm(device):
    """The per-sample numbers of such a layer are exact (session 14's sweep); the check, whose float32
    products underflow, used to call them a mismatch. Below what float32 can resolve it says nothing."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck, rec = _step(
            TinyBranch(), nn.CrossEntropyLoss(), torch.randn(4, 5), torch.randint(0, 3, (4,)), device=device
        )
    assert ck.engine.checks_left == 0
    assert not any(MISMATCH in n for n in rec.notes)


def test_amp_like_loss_scale_passes_the_check(device):
    torch.manual_seed(0)
    model = models.mlp()
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck, _ = _step(model, nn.CrossEntropyLoss(), x, y, scale=1024.0, device=device)
    assert ck.engine.checks_left == 0


def test_regulariser_added_outside_the_loss_module_is_reported(device):
    torch.manual_seed(0)
    model = models.mlp()
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    with pytest.warns(RuntimeWarning, match=MISMATCH) as caught:
        _, rec = _step(
            model, nn.CrossEntropyLoss(), x, y, extra=lambda m: 0.1 * m[2].weight.square().sum(), device=device
        )
    text = " ".join(str(w.message) for w in caught if MISMATCH in str(w.message))
    assert "2.weight" in text and "0.weight" not in text and "4.weight" not in text  # only the layer concerned
    assert any(MISMATCH in n for n in rec.notes)
    assert rec.per_sample_sq_norms is not None  # the numbers stay; the note says what they cover


class _FunctionalReuse(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return self.head(h + F.linear(h, self.lin.weight))  # lin.weight used a second time, outside lin


def test_functional_use_of_a_weight_is_reported(device, monkeypatch):
    """The check is the backstop where the forward's graph is not looked through for such uses (a compiled
    or sharded model; tests/test_outside_uses.py has the look itself, which leaves the layer out first)."""
    from cockpit_lite.persample.engine import PerSampleEngine

    monkeypatch.setattr(PerSampleEngine, "_leave_out_outside_uses", lambda self, output: None)
    torch.manual_seed(0)
    model = _FunctionalReuse()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.warns(RuntimeWarning, match=r"lin\.weight and lin\.bias \([-0-9.e]+\) " + MISMATCH):
        _step(model, nn.CrossEntropyLoss(), x, y, device=device)


def test_check_waits_for_a_step_whose_gradients_start_from_zero(device):
    """Gradients left from an earlier step (no zero_grad) are not this step's: no false alarm, and
    the check is tried again on a later step."""
    torch.manual_seed(0)
    model = models.mlp().to(device)
    x, y = torch.randn(7, 6).to(device), torch.randint(0, 3, (7,)).to(device)
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(model(x), y).backward()  # p.grad now holds a gradient the cockpit never saw
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck, _ = _step(model, loss_fn, x, y, zero_grad=False, device=device)
    assert ck.engine.checks_left == ck.engine.CHECKS - 1


class _Pool(nn.Module):
    """core(x) (first output if a tuple), mean over the sequence axis, then a head."""

    def __init__(self, core, d=8, seq_axis=1):
        super().__init__()
        self.core, self.head, self.seq_axis = core, nn.Linear(d, 3), seq_axis

    def forward(self, *x):
        h = self.core(*x)
        h = h[0] if isinstance(h, tuple) else h
        return self.head(h.mean(self.seq_axis))


class _Attend(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=4, vdim=4, add_bias_kv=True)

    def forward(self, x):
        return self.attn(self.proj(x), x, x)[0]


class _Decode(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.layer(x, x)


class _BilinearSelf(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Bilinear(4, 4, 3)

    def forward(self, x):
        return self.b(x, x.flip(1))


LAYERS = {
    "attention kdim/vdim, bias_kv": (lambda: _Pool(_Attend()), lambda: torch.randn(6, 5, 4)),
    "transformer decoder layer": (lambda: _Pool(_Decode()), lambda: torch.randn(6, 5, 8)),
    "Linear on (T, B, d)": (
        lambda: _Pool(nn.Sequential(nn.Linear(4, 8), nn.Tanh()), seq_axis=0),
        lambda: torch.randn(5, 6, 4),
    ),
    "circular conv": (
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), nn.Flatten(), nn.Linear(48, 3)),
        lambda: torch.randn(6, 2, 4, 4),
    ),
    "transposed conv, InstanceNorm": (
        lambda: nn.Sequential(
            nn.ConvTranspose2d(2, 3, 3, stride=2), nn.InstanceNorm2d(3, affine=True), nn.Flatten(), nn.Linear(243, 3)
        ),
        lambda: torch.randn(6, 2, 4, 4),
    ),
    "LayerNorm without bias, PReLU": (
        lambda: nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8, bias=False), nn.PReLU(8), nn.Linear(8, 3)),
        lambda: torch.randn(6, 4),
    ),
    "Bilinear": (_BilinearSelf, lambda: torch.randn(6, 4)),
    "EmbeddingBag": (
        lambda: nn.Sequential(nn.EmbeddingBag(10, 4, mode="mean"), nn.Linear(4, 3)),
        lambda: torch.randint(0, 10, (6, 3)),
    ),
    "Embedding max_norm": (
        lambda: nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Flatten(), nn.Linear(12, 3)),
        lambda: torch.randint(0, 10, (6, 3)),
    ),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_zoo_passes_the_check(device, name):
    """Every handler on less common layers and arguments: the per-sample gradients must add up."""
    build, data = LAYERS[name]
    torch.manual_seed(0)
    model = build()
    x = data()
    y = torch.randint(0, 3, (6,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck, rec = _step(model, nn.CrossEntropyLoss(), x, y, device=device)
    assert ck.engine.checks_left == 0 and rec.per_sample_sq_norms is not None


def test_tf32_loosens_the_check_only_where_products_may_run_in_it(device):
    """cuDNN's TF32 flag (on by default) concerns convolutions and RNNs; a Linear layer's and the
    engine's products are cuBLAS's, loosened only by ``matmul.allow_tf32`` or a float32 matmul
    precision below "highest". On the CPU nothing runs in TF32."""
    from cockpit_lite.persample.engine import _tf32

    g = torch.zeros(2, device=device)
    cuda = torch.device(device).type == "cuda"
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
        torch.set_float32_matmul_precision("highest")
        assert not _tf32(g, nn.Linear(2, 2))
        assert _tf32(g, nn.Conv2d(1, 1, 1)) == cuda
        assert not _tf32(g.double(), nn.Conv2d(1, 1, 1))
        torch.set_float32_matmul_precision("high")
        assert _tf32(g, nn.Linear(2, 2)) == cuda
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
