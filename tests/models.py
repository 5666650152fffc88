"""Small models covering every handler of the per-sample engine."""

from __future__ import annotations

import torch
from torch import nn


def mlp(d_in=6, hidden=5, classes=3):
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, classes)
    )


class GroupedCNN(nn.Module):
    """Conv2d (groups=2, padding 'same'), GroupNorm, Conv2d (reflect padding, depthwise), Conv1d, Linear."""

    def __init__(self, classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding="same", groups=2)
        self.norm = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1, padding_mode="reflect", groups=4)
        self.conv1d = nn.Conv1d(4, 3, 2, dilation=2)
        self.head = nn.Linear(3 * 14, classes)

    def forward(self, x):
        x = torch.relu(self.norm(self.conv1(x)))
        x = torch.relu(self.conv2(x))  # (B, 4, 4, 4)
        x = self.conv1d(x.flatten(2))  # (B, 3, 14)
        return self.head(x.flatten(1))


class TinyTransformer(nn.Module):
    """Embedding, TransformerEncoderLayer (MultiheadAttention, LayerNorm, Linear), mean pooling."""

    def __init__(self, vocab=11, d=8, classes=3, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=12, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        h = self.emb(tokens)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.layer(h)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(1))


def cnn_batch(b=5):
    return torch.randn(b, 2, 8, 8), torch.randint(0, 3, (b,))


def token_batch(b=5, t=6, vocab=11):
    tokens = torch.randint(0, vocab, (b, t))
    tokens[0, :2] = 0  # padding entries
    tokens[1, 1] = tokens[1, 3]  # repeated token within a sample
    return tokens, torch.randint(0, 3, (b,))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with BatchNorm, identity or 1x1-conv shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet for 32x32 inputs (He et al. 2016, CIFAR variant): 3x3 stem, four stages of BasicBlocks
    with widths ``width * (1, 2, 4, 8)`` and strides (1, 2, 2, 2), global average pooling, linear head."""

    def __init__(self, blocks=(2, 2, 2, 2), width: int = 64, classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        stages, c_in = [], width
        for k, n in enumerate(blocks):
            c_out = width * 2**k
            for j in range(n):
                stages.append(BasicBlock(c_in, c_out, stride=2 if (k > 0 and j == 0) else 1))
                c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c_in, classes)

    def forward(self, x):
        h = self.stages(torch.relu(self.stem(x)))
        return self.head(h.mean((2, 3)))


def resnet18_cifar(width: int = 64, classes: int = 10) -> ResNetCifar:
    """ResNet-18 for CIFAR (BasicBlocks [2, 2, 2, 2], widths 64..512; 11.2 M parameters). A narrower
    variant (``width=4``: 4..32) keeps tests fast."""
    return ResNetCifar((2, 2, 2, 2), width=width, classes=classes)


class OnceDifferentiableTanh(torch.autograd.Function):
    """tanh with a backward marked ``once_differentiable``: no second derivative (a further derivative
    through it is cut) and no forward-mode rule."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.tanh()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - x.tanh() ** 2)
