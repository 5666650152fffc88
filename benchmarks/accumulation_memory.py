"""What gradient accumulation keeps between micro-batches, measured on the benchmark GPT.

    python benchmarks/accumulation_memory.py [--micro 4,8,16] [--small]

For the small GPT of benchmarks/common.py (4 layers, d = 256, T = 128, vocabulary 512, tied embeddings;
``--small``: tests/models_lm.py's default NanoGPT) and each micro-batch size B_k, one step of two
micro-batches is run under a cockpit whose instrument asks for squared norms and g_i . gbar (the
gradient tests: what the first-step trial keeps views for). Printed per B_k:

- ``views``: bytes of the per-layer views one micro-batch keeps until the optimizer step (its layer
  inputs and output gradients; each storage once, ``views.view_bytes``): what the engine holds per
  micro-batch under accumulation, and on the first step on trial (``TRIAL_BYTES``);
- ``saved``: bytes of the tensors autograd saves for backward in one micro-batch's forward (each storage
  once), the activation memory of a plain step, for scale;
- ``p.grad``: the copy of p.grad taken after the last backward (D floats, for g_i . gbar);
- ``gram``: the N x N Gram (float32) of a step of two micro-batches, per parameter tensor and summed.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cockpit_lite import Cockpit, Instrument, Need, Needs  # noqa: E402
from cockpit_lite.persample.views import view_bytes  # noqa: E402
from tests import models_lm  # noqa: E402

GPT = dict(vocab_size=512, block_size=128, n_layer=4, n_head=4, d=256, dropout=0.0, flash=True)


class _Views(Instrument):
    """Asks for what the gradient tests ask; reads the views the engine kept when the step ends."""

    def __init__(self, ref):
        super().__init__()
        self.ref, self.bytes = ref, []

    def requires(self, step):
        return Needs({Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_DOT_MEAN})

    def on_before_step(self, record):
        eng = self.ref[0].engine
        self.bytes = [sum(view_bytes(v) for v in seg.kept) for seg in eng._segments] + [
            sum(view_bytes(v) for v in eng._kept)
        ]


def _saved_bytes(model, idx, tgt) -> int:
    seen, total = set(), [0]

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total[0] += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, tgt)
    del loss
    return total[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--micro", default="4,8,16")
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    cfg = {} if args.small else GPT
    torch.manual_seed(0)
    model = models_lm.NanoGPT(**cfg)
    d = sum(p.numel() for p in model.parameters())
    vocab, t = model.vocab_size, model.transformer.wpe.num_embeddings
    print(f"GPT {cfg or 'tests/models_lm.py default'}: D = {d:,} parameters, T = {t}")
    print("| B_k | views kept per micro-batch | autograd's saved tensors | p.grad copy | Gram of 2 B_k |")
    print("|---|---|---|---|---|")
    for b in (int(v) for v in args.micro.split(",")):
        idx, tgt = models_lm.token_batch(b=2 * b, t=t, vocab=vocab, seed=1)
        ref = []
        inst = _Views(ref)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        with Cockpit(model, opt, instruments=[inst]) as ck:
            ref.append(ck)
            ck.engine.expect_accumulation()
            opt.zero_grad()
            for k in range(2):
                _, loss = model(idx[k * b : (k + 1) * b], tgt[k * b : (k + 1) * b])
                (loss / 2).backward()
            opt.step()
        saved = _saved_bytes(model, idx[:b], tgt[:b])
        n_tensors = sum(1 for p in model.parameters())
        mib = lambda x: f"{x / 2**20:.1f} MiB"  # noqa: E731
        print(
            f"| {b} | {mib(inst.bytes[0])} | {mib(saved)} | {mib(4 * d)} | "
            f"{mib(4 * (2 * b) ** 2)} per tensor, {mib(4 * (2 * b) ** 2 * n_tensors)} for all {n_tensors} |"
        )


if __name__ == "__main__":
    main()
