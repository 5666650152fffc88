"""What exact per-sample statistics cost on a Transformer LM with attention dropout (the replay).

    python benchmarks/attention_dropout.py                # B = 32, T = 64, d = 128, 2 layers, 4 heads
    python benchmarks/attention_dropout.py --reps 15 --batch 16

A TransformerEncoder LM (embedding, 2 encoder layers, causal, an LM head over positions, cross-entropy
over tokens) trained by Adam, with per-sample squared norms and the gradient tests (g_i . gbar) every
step. Five configurations run interleaved, each with its own model and cockpit, and each is printed as
its median time per step and its ratio to plain training of the same model:

- plain training, dropout 0.1 and dropout 0;
- the cockpit with dropout 0.1 (default): ``MultiheadAttention`` is replayed once per call with the
  saved random state, its projections as factor pairs;
- the cockpit with dropout 0: the same replay (no random state to restore);
- the cockpit with dropout 0 on the torch.func path that served attention before (per-sample
  ``vmap(grad)`` of each attention module, its g_i materialised), by registering ``FuncHandler``.

Besides the whole step, the time the per-sample engine spends on the attention modules (their view:
the replay or vmap, and its reduction to norms and g_i . gbar) is printed per step, from a timer
around the engine's per-module processing; the rest of the cockpit's time is the other layers (the
embedding's g_i . gbar, which forms the B x B Gram of its lookups, is the largest part here).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cockpit_lite.instruments import GradientTests, PerSampleGradNorms  # noqa: E402
from common import interleaved  # noqa: E402

from cockpit_lite import Cockpit, register_handler  # noqa: E402
from cockpit_lite.persample import engine, layers  # noqa: E402

#: seconds the engine spent on attention modules, by engine
ATTENTION_SECONDS: dict[int, float] = {}


def _timed_process():
    """Wrap the engine's per-module processing with a timer for attention modules."""
    process = engine.PerSampleEngine._process

    def timed(self, module):
        t0 = time.perf_counter()
        try:
            return process(self, module)
        finally:
            if isinstance(module, nn.MultiheadAttention):
                ATTENTION_SECONDS[id(self)] = ATTENTION_SECONDS.get(id(self), 0.0) + time.perf_counter() - t0

    engine.PerSampleEngine._process = timed


class LM(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, depth: int, dropout: float):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=dropout, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        t = tokens.shape[1]
        h = self.enc(self.emb(tokens), mask=nn.Transformer.generate_square_subsequent_mask(t), is_causal=True)
        return self.head(h).transpose(1, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed block")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    batches = [
        tuple(torch.randint(0, args.vocab, (args.batch, args.seq), generator=g) for _ in range(2))
        for _ in range(args.steps)
    ]
    _timed_process()
    runners, cockpits, attention = {}, {}, {}

    def setup(name: str, dropout: float, attach: bool, func_path: bool = False) -> None:
        torch.manual_seed(0)
        model = LM(args.vocab, args.dim, args.heads, args.depth, dropout)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        loss_fn = nn.CrossEntropyLoss()
        if attach:
            previous = register_handler(nn.MultiheadAttention, layers.FuncHandler) if func_path else None
            try:
                cockpits[name] = Cockpit(model, opt, loss_fn, instruments=[PerSampleGradNorms(), GradientTests()])
            finally:
                if previous is not None:
                    register_handler(nn.MultiheadAttention, previous)

        def run():
            key = id(cockpits[name].engine) if name in cockpits else None
            before = ATTENTION_SECONDS.get(key, 0.0)
            for x, y in batches:
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
            if key is not None:
                attention.setdefault(name, []).append(ATTENTION_SECONDS.get(key, 0.0) - before)

        run()  # warm-up (kernel choices, first-step checks)
        runners[name] = run

    setup("plain, dropout 0.1", 0.1, False)
    setup("plain, dropout 0", 0.0, False)
    setup("cockpit, dropout 0.1 (replay)", 0.1, True)
    setup("cockpit, dropout 0 (replay)", 0.0, True)
    setup("cockpit, dropout 0 (torch.func, before)", 0.0, True, func_path=True)
    for ck in cockpits.values():
        notes = [n for _, n in ck.history.get("note/gradient_tests", [])]
        if notes or not ck.history["tests/norm"]:
            raise SystemExit(f"a cockpit gave no per-sample statistics: {notes}")
    attention.clear()  # warm-up steps

    t = interleaved(runners, args.reps)
    base = {"0.1": t["plain, dropout 0.1"], "0": t["plain, dropout 0"]}
    print(
        f"TransformerEncoder LM: B={args.batch} T={args.seq} d={args.dim} heads={args.heads} depth={args.depth} "
        f"vocab={args.vocab}, {args.threads} thread(s), median of {args.reps} blocks of {args.steps} steps"
    )
    for name, sec in t.items():
        p = "0.1" if "dropout 0.1" in name else "0"
        line = f"  {name:42s} {1e3 * sec / args.steps:8.1f} ms/step   x{sec / base[p]:.2f} plain (dropout {p})"
        if name in attention:
            ms = 1e3 * statistics.median(attention[name]) / args.steps
            share = ms / (1e3 * base[p] / args.steps)
            line += f"   attention's per-sample work {ms:6.1f} ms/step (x{share:.2f} plain)"
        print(line)
    for ck in cockpits.values():
        ck.close()


if __name__ == "__main__":
    main()
