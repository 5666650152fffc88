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
