"""benchmarks/peers.py compares like with like: on tiny models every peer that runs (cockpit-lite,
BackPACK, Opacus, torch.func, the hand-written ghost-norm floor) gives the per-sample squared norms
||g_i||^2 (and g_i . gbar where it computes them) of the float64 loop of tests/harness.py, the
benchmark's own loop reference agrees with that loop, a peer that cannot run says why, and the check
flags numbers that are off."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from tests import models_lm as M
from tests.bench_util import benchmark_module
from tests.harness import shares_loop


@pytest.fixture(scope="module")
def peers():
    yield from benchmark_module("peers")


def _conv_net() -> nn.Module:
    # conv 1 on 8x8: the formed per-sample gradient is cheaper; conv 2 on 2x2 (P = 4): the ghost form
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 6), nn.ReLU(), nn.Linear(6, 3),
    )  # fmt: skip


class _SeqNet(nn.Module):
    """Tokens -> Embedding (vocabulary 500: ghost form) -> LayerNorm -> Linear d 16 -> 16 over T = 4
    positions (ghost form) -> Linear 16 -> 2 (formed) -> mean over positions."""

    def __init__(self):
        super().__init__()
        self.emb, self.ln = nn.Embedding(500, 16), nn.LayerNorm(16)
        self.fc, self.out = nn.Linear(16, 16), nn.Linear(16, 2)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(self.ln(self.emb(idx))))).mean(1)


def _gpt() -> nn.Module:
    # tied embeddings (formed and summed), positions looked up once for the batch, LayerNorm, attention
    return M.LogitsForLoss(M.NanoGPT(vocab_size=20, block_size=8, n_layer=1, n_head=2, d=8, flash=True))


def _batch(kind: str):
    g = torch.Generator().manual_seed(1)
    if kind == "conv":
        return torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 3, (6,), generator=g)
    if kind == "seq":
        return torch.randint(0, 500, (5, 4), generator=g), torch.randint(0, 2, (5,), generator=g)
    return M.token_batch(4, 8, vocab=20)


FACTORIES = {"conv": _conv_net, "seq": _SeqNet, "gpt": _gpt}
#: the rows that must run on each tiny model (the others must say why they cannot)
RUNS = {
    "conv": {"norms", "economy-alpha", "economy", "backpack", "opacus", "func-norms", "func-norms-dot", "floor"},
    "seq": {"norms", "economy-alpha", "economy", "opacus", "func-norms", "func-norms-dot", "floor"},
    "gpt": {"norms", "economy-alpha", "economy", "func-norms", "func-norms-dot", "floor"},
}


def _start(kind: str):
    def start():
        torch.manual_seed(0)
        model = FACTORIES[kind]()
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), nn.CrossEntropyLoss()

    return start


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_every_peer_matches_the_float64_loop(peers, kind):
    x, y = _batch(kind)
    start = _start(kind)
    model, _, loss_fn = start()
    names = [n for n, _ in model.named_parameters()]
    ref = shares_loop(model, x, y, loss_fn, names)
    flat = np.concatenate([ref[n].reshape(len(y), -1) for n in names], 1)
    sq, dots = (flat**2).sum(1), flat @ flat.mean(0)

    ours = peers.loop_reference(model, loss_fn, x, y)  # the benchmark's own check
    np.testing.assert_allclose(ours["sq"], sq, rtol=1e-10)
    np.testing.assert_allclose(ours["dots"], dots, rtol=1e-8, atol=1e-12 * np.abs(dots).max())

    rows = [r for r in peers.ROWS if r != "cockpit-1.0.2"]
    arms, results = peers.build_all(start, rows)
    peers.first_steps(arms, results, [(x, y)], None, kind)
    try:
        ran = {r for r in rows if not results[r].reason}
        assert ran >= RUNS[kind], {r: results[r].reason for r in RUNS[kind] - ran}
        assert all(results[r].reason for r in set(rows) - ran)
        for r in sorted(ran):
            got = arms[r].sq_norms()
            assert got is not None, r
            np.testing.assert_allclose(got, sq, rtol=2e-4, atol=1e-5 * sq.max(), err_msg=r)
            if r == "func-norms-dot":
                np.testing.assert_allclose(arms[r].dots(), dots, rtol=2e-4, atol=1e-4 * np.abs(dots).max())
            if r.startswith("economy"):  # the inner-product test rests on the cockpit's g_i . gbar
                g2 = float(flat.mean(0) @ flat.mean(0))
                b = len(y)
                inner = np.sqrt(((dots - g2) ** 2).sum() / (b * (b - 1) * g2**2))
                assert arms[r].inner() == pytest.approx(inner, rel=1e-3)
    finally:
        peers._close(arms)


def test_peers_that_cannot_run_say_why(peers):
    x, y = _batch("gpt")
    arms, results = peers.build_all(_start("gpt"), ["backpack", "opacus", "cockpit-1.0.2"])
    peers.first_steps(arms, results, [(x, y)], None, "gpt")
    peers._close(arms)
    assert "LayerNorm" in results["backpack"].reason
    assert "tying" in results["opacus"].reason
    assert results["cockpit-1.0.2"].reason == peers.COCKPIT_MISSING
    arms, results = peers.build_all(
        lambda: (lambda m: (m, torch.optim.SGD(m.parameters(), lr=0.1), nn.CrossEntropyLoss()))(M.resnet18(width=4)),
        ["floor"],
    )
    assert "BatchNorm" in results["floor"].reason


def test_the_check_flags_numbers_that_are_off(peers):
    x, y = _batch("conv")
    start = _start("conv")
    model, _, loss_fn = start()
    ref = peers.loop_reference(model, loss_fn, x, y)
    arms, results = peers.build_all(start, ["floor", "func-norms-dot"])
    peers.first_steps(arms, results, [(x, y)], ref, "conv")
    assert results["floor"].agrees and results["func-norms-dot"].agrees
    floor = arms["floor"]
    floor.sq_norms = lambda: ref["sq"] * np.r_[1.0, 1.0, 1.0, 1.0, 1.0, 1.01]  # one example 1% off
    assert peers.check(floor, ref) > peers.RTOL
    func = arms["func-norms-dot"]
    func.dots = lambda: ref["dots"] / len(y)  # g_i . gbar of the mean loss's share, not of l_i
    assert peers.check(func, ref) > peers.RTOL
    peers._close(arms)


def test_cli_prints_the_table_and_appends_json(peers, tmp_path, capsys, monkeypatch):
    tiny = (lambda: nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 10)), lambda b: torch.randn(b, 20), 8)
    monkeypatch.setitem(peers.MODELS, "tiny", tiny)
    out = tmp_path / "rows.json"
    args = [
        "--models",
        "tiny",
        "--rows",
        "norms,floor,cockpit-1.0.2",
        "--reps",
        "1",
        "--steps",
        "1",
        "--json",
        str(out),
    ]
    threads = torch.get_num_threads()
    try:
        peers.main(args + ["--round", "a"])
        peers.main(args + ["--round", "b", "--sweep", "--batches", "4,8"])
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert "| cockpit-lite per-sample norms |" in text and "| hand-written ghost norms (floor of norms) |" in text
    assert "not installable here" in text
    rows = json.loads(out.read_text())
    assert [r["round"] for r in rows] == ["a"] * 4 + ["b"] * 8
    assert [r["batch"] for r in rows] == [8] * 4 + [4] * 4 + [8] * 4
    assert {r["config"] for r in rows} == {"plain", "norms", "floor", "cockpit-1.0.2"}
    checked = [r for r in rows if r["config"] in ("norms", "floor") and not r["sweep"]]
    assert len(checked) == 2 and all(r["check_rel_diff"] < peers.RTOL for r in checked)
    assert all(r["time_ratio"] > 0 for r in rows if r["config"] != "cockpit-1.0.2")
    assert "| tiny | 4 |" in text and "| tiny | 8 |" in text


def test_cli_help_lists_every_row(peers, capsys):
    with pytest.raises(SystemExit) as exit_:
        peers.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(row in out for row in peers.ROWS)  # "economy@5%" once broke argparse's help formatting
