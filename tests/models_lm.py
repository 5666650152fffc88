"""Language, vision-transformer and residual models for the per-sample engine's tests and benchmarks.

- :class:`NanoGPT`: a nanoGPT-style decoder (tied ``wte``/``lm_head``, ``wpe(arange(T))`` added to every
  sequence, pre-LayerNorm blocks with causal self-attention and an MLP); ``forward(idx, targets=None)``
  returns ``(logits, loss)`` with the loss computed inside, as nanoGPT does.
- :class:`LogitsForLoss`: any of these models as a module returning (B, V, T) or (B, C) logits, for a
  loss module (``nn.CrossEntropyLoss`` on (B, V, T) logits: one loss per sequence).
- Hugging Face GPT-2, BERT (masked-LM head) and ViT (classification) built from small configs with
  random weights (no download), eager attention, dropout at the configs' defaults.
- :func:`resnet18`: a ResNet-18-style CNN for 32x32 inputs (BasicBlocks [2, 2, 2, 2], BatchNorm) with a
  width parameter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# --- nanoGPT ------------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with its projections as nn.Linear (``c_attn`` makes q, k, v).

    ``flash=True``: ``F.scaled_dot_product_attention(..., is_causal=True)`` with ``dropout_p``;
    ``flash=False``: the explicit form softmax(q k^T / sqrt(d_h) + causal mask) with an ``nn.Dropout``
    on the attention probabilities.
    """

    def __init__(self, d: int, n_head: int, block_size: int, dropout: float, flash: bool):
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.d, self.dropout, self.flash = n_head, d, dropout, flash
        mask = torch.tril(torch.ones(block_size, block_size, dtype=torch.bool))
        self.register_buffer("mask", mask.view(1, 1, block_size, block_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(self.d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        if self.flash:
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])
            att = att.masked_fill(~self.mask[:, :, :t, :t], float("-inf"))
            y = self.attn_dropout(F.softmax(att, dim=-1)) @ v
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c)))


class MLP(nn.Module):
    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.c_fc, self.c_proj, self.dropout = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, d: int, n_head: int, block_size: int, dropout: float, flash: bool):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, n_head, block_size, dropout, flash)
        self.mlp = MLP(d, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's GPT at small sizes: token and position embeddings (positions looked up with
    ``arange(T)``, shared by every sequence of the batch), ``n_layer`` blocks, a final LayerNorm and an
    output layer whose weight is the token embedding's."""

    def __init__(
        self,
        vocab_size: int = 50,
        block_size: int = 16,
        n_layer: int = 2,
        n_head: int = 2,
        d: int = 32,
        dropout: float = 0.0,
        flash: bool = False,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab_size, d),
                wpe=nn.Embedding(block_size, d),
                drop=nn.Dropout(dropout),
                h=nn.ModuleList([Block(d, n_head, block_size, dropout, flash) for _ in range(n_layer)]),
                ln_f=nn.LayerNorm(d),
            )
        )
        self.lm_head = nn.Linear(d, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in nanoGPT

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        t = idx.shape[1]
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


class LogitsForLoss(nn.Module):
    """``net``'s logits for a loss module: sequence logits (B, T, V) as (B, V, T), as
    ``nn.CrossEntropyLoss`` takes them with (B, T) targets; class logits (B, C) as they are. Takes the
    first element of a tuple output and ``.logits`` of a Hugging Face output."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out = self.net(*args)
        logits = out[0] if isinstance(out, tuple) else getattr(out, "logits", out)
        return logits.transpose(1, 2) if logits.dim() == 3 else logits


class LastLogits(nn.Module):
    """A causal LM's logits at the last position: one prediction per sequence (the harness's examples)."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, ids):
        return self.m(input_ids=ids).logits[:, -1]


# --- Hugging Face models from small configs -----------------------------------------------------------
def hf_gpt2(n_layer: int = 2, d: int = 32, n_head: int = 2, vocab: int = 50, n_positions: int = 16) -> nn.Module:
    """``GPT2LMHeadModel`` (tied wte/lm_head, Conv1D projections, wpe looked up with (1, T) positions)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=n_layer,
        n_embd=d,
        n_head=n_head,
        vocab_size=vocab,
        n_positions=n_positions,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config)


def hf_gemma(n_layer: int = 2, d: int = 32, n_head: int = 2, vocab: int = 50, n_positions: int = 16) -> nn.Module:
    """``GemmaForCausalLM``: its token embedding is an ``nn.Embedding`` subclass whose forward multiplies
    the lookup by sqrt(d) (tied to the output layer), RMSNorm with 1 + weight, rotary positions."""
    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=2 * d,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=n_positions,
        use_cache=False,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    config._attn_implementation = "eager"
    return GemmaForCausalLM(config)


def hf_bert(n_layer: int = 2, d: int = 32, n_head: int = 2, vocab: int = 50, n_positions: int = 16) -> nn.Module:
    """``BertForMaskedLM`` (decoder tied to the word embeddings, position ids of shape (1, T))."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=d,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        intermediate_size=2 * d,
        max_position_embeddings=n_positions,
        type_vocab_size=2,
    )
    config._attn_implementation = "eager"
    return BertForMaskedLM(config)


def hf_vit(
    n_layer: int = 2,
    d: int = 32,
    n_head: int = 2,
    image: int = 8,
    patch: int = 4,
    classes: int = 3,
    hidden_dropout: float = 0.0,
    attention_dropout: float = 0.0,
) -> nn.Module:
    """``ViTForImageClassification`` (bare ``cls_token`` expanded over the batch and bare
    ``position_embeddings`` added to every example, both parameters of ``ViTEmbeddings``); the
    dropouts default to ViTConfig's (0)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=image,
        patch_size=patch,
        num_channels=3,
        hidden_size=d,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        intermediate_size=2 * d,
        num_labels=classes,
        hidden_dropout_prob=hidden_dropout,
        attention_probs_dropout_prob=attention_dropout,
    )
    config._attn_implementation = "eager"
    return ViTForImageClassification(config)


# --- ResNet-18 for 32x32 ------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 as for CIFAR (3x3 stem, no max-pool), stages of widths w, 2w, 4w, 8w with two
    BasicBlocks each (strides 1, 2, 2, 2), global average pooling, a linear classifier."""

    def __init__(self, width: int = 64, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, c_in = [], width
        for k, stride in enumerate((1, 2, 2, 2)):
            c_out = width * 2**k
            stages.append(nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet18(width: int = 64, classes: int = 10) -> ResNet18:
    return ResNet18(width, classes)


# --- batches -----------------------------------------------------------------------------------------
def token_batch(b: int = 4, t: int = 8, vocab: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B, T) and next-token targets (B, T)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, t + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def mlm_batch(b: int = 4, t: int = 8, vocab: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B, T) with some positions replaced by a mask token (id 1), and targets (B, T) that are the
    original token there and -100 (ignored) elsewhere; every sequence has at least one target."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, vocab, (b, t), generator=g)
    masked = torch.rand(b, t, generator=g) < 0.3
    masked[:, 0] = True
    targets = torch.where(masked, tokens, torch.full_like(tokens, -100))
    return torch.where(masked, torch.ones_like(tokens), tokens), targets


def image_batch(b: int = 4, image: int = 8, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, image, image, generator=g), torch.randint(0, classes, (b,), generator=g)
