"""PEFT's LoRA adapters (the fine-tuning loop most people run: a frozen transformers model, trainable low-rank
adapters) served exactly: per-sample statistics of the adapters' parameters against the float64 loop of
tests/harness.py, on GPT-2 (LoRA on its Conv1D layers, ``fan_in_fan_out``) and Llama (LoRA on Linear layers, with
adapter dropout replayed from a seed; DoRA's magnitude vectors; rsLoRA's scaling). Random weights, small configs;
the adapters' B matrices are drawn non-zero so that A's gradients are not zero."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from tests.harness import assert_matches_loop
from tests.models_lm import LastLogits

V = 50


def _adapted(arch: str, dropout: float, variant: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=V, n_positions=16, attn_pdrop=0.0,
                         resid_pdrop=0.0, embd_pdrop=0.0)  # fmt: skip
        base, targets = GPT2LMHeadModel(cfg), ["c_attn", "c_proj"]
    else:
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, vocab_size=V, max_position_embeddings=16)  # fmt: skip
        base, targets = LlamaForCausalLM(cfg), ["q_proj", "v_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets,
                        use_dora=variant == "dora", use_rslora=variant == "rslora")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (GPT-2's Conv1D: peft sets fan_in_fan_out itself and says so)
        model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    return LastLogits(model)


@pytest.mark.parametrize(
    "arch, dropout, variant",
    [("gpt2", 0.0, "lora"), ("llama", 0.1, "lora"), ("llama", 0.0, "dora"), ("llama", 0.0, "rslora")],
)
def test_peft_adapters_match_the_loop(arch, dropout, variant):
    model = _adapted(arch, dropout, variant)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)  # (only the adapters train)
    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, V, (5, 8), generator=g), torch.randint(0, V, (5,), generator=g)
    checked = assert_matches_loop(model, ids, y, nn.CrossEntropyLoss())
    assert not checked.warnings
    # every adapter parameter was split (DoRA's magnitudes too), none left out
    assert set(checked.record.per_sample_sq_norms_by_param) == set(checked.reference) == set(trained)
    if variant == "dora":
        assert any("lora_magnitude_vector" in n for n in trained)


def test_the_hf_trainer_fine_tuning_a_peft_model(tmp_path):
    """The Hugging Face Trainer fine-tuning a LoRA-adapted GPT-2 (the usual script): the cockpit's loss of each
    step is the one the Trainer logs, the per-sample statistics cover every adapter (coverage 1), no note."""
    from cockpit_lite.instruments import GradNorm, Loss, PerSampleGradNorms
    from transformers import Trainer, TrainingArguments

    from cockpit_lite.integrations.huggingface import CockpitCallback

    model = _adapted("gpt2", 0.0, "lora").m  # (the PEFT model itself: the Trainer calls it with labels)
    ids = torch.randint(0, V, (16, 8), generator=torch.Generator().manual_seed(1))

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i]}

    instruments = [Loss(), GradNorm(), PerSampleGradNorms()]
    callback = CockpitCallback(instruments=instruments, sinks=[], logdir=tmp_path / "run")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, report_to=[],
                             use_cpu=True, logging_steps=1, save_strategy="no", learning_rate=1e-3)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=Data(), callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    h = callback.cockpit.history
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert [v for _, v in h["loss"]] == pytest.approx(logged, rel=1e-6) and len(logged) == 3
    assert [v for _, v in h["persample/coverage"]] == pytest.approx([1.0] * 3, abs=1e-6)
    assert len(h["persample/grad_norm"]) == 3 and not [t for t in h if t.startswith("note/")]
