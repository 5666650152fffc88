"""Language models, a vision transformer and a ResNet through the exactness harness: every trainable
parameter's per-sample split (||g_i||^2, g_i . gbar, projections) against the float64 loop, with a loss
module on the logits (``nn.CrossEntropyLoss`` on (B, V, T) logits: one loss per sequence).

Position embeddings looked up with positions shared by the batch (nanoGPT's ``wpe(arange(T))``,
GPT-2's and BERT's (1, T) position ids) and ViT's bare ``cls_token`` and ``position_embeddings`` are
split into examples where they meet the batch (cockpit_lite/persample/broadcast.py). Dropout in train
mode is replayed from a seed by the harness (tests/harness.py), which checks that the replay drew the
step's masks (the loop's shares add up to the step's p.grad)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cockpit_lite.persample import broadcast
from tests import models_lm as M
from tests.harness import assert_matches_loop, is_random


def _no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout_prob"):  # Hugging Face eager attention's functional dropout
            m.dropout_prob = 0.0
    return model


#: name -> (model builder, batch, whether the model is random in train mode)
CASES = {
    "nanogpt": (lambda: M.NanoGPT(dropout=0.0), lambda: M.token_batch(5, 8), False),
    "nanogpt dropout": (lambda: M.NanoGPT(dropout=0.2), lambda: M.token_batch(5, 8), True),
    "nanogpt sdpa": (lambda: M.NanoGPT(dropout=0.0, flash=True), lambda: M.token_batch(5, 8), False),
    "nanogpt sdpa dropout": (lambda: M.NanoGPT(dropout=0.2, flash=True), lambda: M.token_batch(5, 8), True),
    "hf gpt2": (M.hf_gpt2, lambda: M.token_batch(5, 8), True),
    "hf gpt2 no dropout": (lambda: _no_dropout(M.hf_gpt2()), lambda: M.token_batch(5, 8), False),
    "hf bert mlm": (M.hf_bert, lambda: M.mlm_batch(5, 8), True),
    "hf gemma": (M.hf_gemma, lambda: M.token_batch(5, 8), False),
    "hf vit": (M.hf_vit, lambda: M.image_batch(6), False),
    "hf vit dropout": (
        lambda: M.hf_vit(hidden_dropout=0.1, attention_dropout=0.1),
        lambda: M.image_batch(6),
        True,
    ),
}


def _check_split(name, device="cpu"):
    build, batch, random = CASES[name]
    torch.manual_seed(0)
    model = M.LogitsForLoss(build())
    x, y = batch()
    assert is_random(model, x) is random  # the dropout cases do drop
    checked = assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), device=device)
    assert set(checked.record.per_sample_sq_norms_by_param) == {n for n, _ in model.named_parameters()}
    assert not checked.warnings


@pytest.mark.parametrize("name", [n for n, case in CASES.items() if not case[2]])
def test_split_matches_the_loop(device, name):
    _check_split(name, device)


@pytest.mark.parametrize("name", [n for n, case in CASES.items() if case[2]])
def test_split_matches_the_loop_with_dropout(name):
    """CPU only: the float64 loop must draw the float32 step's dropout masks, which CUDA kernels do not
    promise across dtypes (tests/test_attention_dropout.py checks CUDA against same-device shares)."""
    _check_split(name)


def test_sum_reduction_and_one_sequence():  # dropout: CPU only, as above
    torch.manual_seed(0)
    model = M.LogitsForLoss(M.NanoGPT(dropout=0.1))
    assert_matches_loop(model, *M.token_batch(4, 8), nn.CrossEntropyLoss(reduction="sum"))
    assert_matches_loop(model, *M.token_batch(1, 8), nn.CrossEntropyLoss())


def test_the_broadcast_tensors_are_split_where_they_meet_the_batch(device, monkeypatch):
    """The position embeddings and ViT's bare parameters take the broadcast path (not a fallback), and
    the harness fails when their split is wrong although it adds up (two examples' shares swapped)."""
    seen = []
    original = broadcast.per_example

    def spy(t, shape, batch):
        out = original(t, shape, batch)
        seen.append(tuple(shape))
        return out

    monkeypatch.setattr(broadcast, "per_example", spy)
    torch.manual_seed(0)
    assert_matches_loop(
        M.LogitsForLoss(M.hf_vit()), *M.image_batch(6), nn.CrossEntropyLoss(), device=device, totals=False
    )
    assert sorted(seen) == [(1, 1, 32), (1, 5, 32)]  # cls_token (expanded), position_embeddings (added)

    def swapped(t, shape, batch):
        out = original(t, shape, batch).clone()
        out[[0, 1]] = out[[1, 0]]
        return out

    monkeypatch.setattr(broadcast, "per_example", swapped)
    with pytest.raises(AssertionError) as err:
        assert_matches_loop(M.LogitsForLoss(M.NanoGPT()), *M.token_batch(5, 8), nn.CrossEntropyLoss(), device=device)
    msg = str(err.value)
    assert "||g_i||^2 of net.transformer.wpe.weight" in msg and "reference" not in msg
    assert "||g_i||^2 of net.transformer.wte.weight" not in msg


def test_resnet18_in_eval_mode(device):
    """BatchNorm with running statistics (eval mode): per-sample gradients are defined and exact."""
    torch.manual_seed(0)
    model = M.resnet18(width=4, classes=3).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))
    checked = assert_matches_loop(model, x, y, nn.CrossEntropyLoss(), device=device)
    assert len(checked.record.per_sample_sq_norms_by_param) == len(list(model.parameters()))


def test_nanogpt_returns_its_loss_and_ties_its_embeddings(device):
    torch.manual_seed(0)
    net = M.NanoGPT().to(device)
    x, y = (t.to(device) for t in M.token_batch(3, 8))
    logits, loss = net(x, y)
    assert logits.shape == (3, 8, 50) and net.transformer.wte.weight is net.lm_head.weight
    assert torch.allclose(loss, nn.functional.cross_entropy(logits.transpose(1, 2), y))
    assert net(x)[1] is None
