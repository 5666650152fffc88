"""UpdateRatio against a direct computation: the parameters copied before each step and after it, the
ratio ||theta_{t+1,p} - theta_{t,p}|| / ||theta_{t,p}|| computed by hand in float64 (SGD with momentum and
weight decay, AdamW); its verdict naming a layer trained at a 100x learning rate; the presentation of
GradientNoiseScale and UpdateRatio (panels drawn, TensorBoard charts, summary lines) from a live run."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from cockpit_lite.instruments.noise_scale import GradientNoiseScale
from cockpit_lite.instruments.update_ratio import UpdateRatio, ratio_verdict
from torch import nn

from cockpit_lite import Cockpit
from tests import models


def _train(model, opt, instruments, steps, seed=0, b=8):
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    thetas = []
    with Cockpit(model, opt, loss_fn, instruments=instruments, sinks=[]) as ck:
        for _ in range(steps):
            x, y = torch.randn(b, 6, generator=gen), torch.randint(0, 3, (b,), generator=gen)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            thetas.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
            opt.step()
    thetas.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
    return ck, thetas


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9, weight_decay=0.01),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    ],
    ids=["sgd", "adamw"],
)
def test_ratios_match_a_direct_computation(make_opt):
    torch.manual_seed(0)
    model = models.mlp()
    ck, thetas = _train(model, make_opt(model.parameters()), [UpdateRatio()], steps=4)
    h = ck.history
    for t in range(4):
        before, after = thetas[t], thetas[t + 1]
        want = {n: float((after[n] - before[n]).norm() / before[n].norm()) for n in before}
        for n, v in want.items():
            assert dict(h[f"update_ratio/param/{n}"])[t] == pytest.approx(v, rel=1e-5)
        d = math.sqrt(sum(float((after[n] - before[n]).norm()) ** 2 for n in before))
        p = math.sqrt(sum(float(before[n].norm()) ** 2 for n in before))
        assert dict(h["update_ratio/global"])[t] == pytest.approx(d / p, rel=1e-5)
        r = np.array(list(want.values()))
        for k, q in (("p5", 0.05), ("p25", 0.25), ("p50", 0.5), ("p75", 0.75), ("p95", 0.95)):
            assert dict(h[f"update_ratio/{k}"])[t] == pytest.approx(np.quantile(r, q), rel=1e-5)
        assert dict(h["update_ratio/max"])[t] == pytest.approx(r.max(), rel=1e-5)
        logs = dict(h["update_ratio/log10"])[t]
        np.testing.assert_allclose(np.sort(logs), np.sort(np.log10(r)), rtol=1e-5)
        far = np.sum(np.abs(np.log10(r) - np.median(np.log10(r))) > 1.0)
        assert dict(h["update_ratio/far_off"])[t] == far


def test_zero_norm_tensor_is_left_out_with_a_note():
    torch.manual_seed(0)
    model = models.mlp()
    with torch.no_grad():
        model[0].bias.zero_()
    ck, thetas = _train(model, torch.optim.SGD(model.parameters(), lr=0.1), [UpdateRatio()], steps=2)
    h = ck.history
    assert math.isnan(dict(h["update_ratio/param/0.bias"])[0])
    assert dict(h["update_ratio/param/0.bias"])[1] > 0  # it moved at step 0
    assert "||theta|| = 0 before the step for ['0.bias']" in dict(h["note/update_ratio"])[0]
    assert 1 not in dict(h.get("note/update_ratio") or [])
    assert len(dict(h["update_ratio/log10"])[0]) == len(thetas[0]) - 1


def test_verdict_names_the_layer_trained_100x_faster():
    """Adam moves each element by about lr per step: the last layer at lr 0.1 moves about 100x more of its
    norm than the first at 1e-3, whose ratio is near the rule of thumb."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    groups = [
        {"params": list(model[0].parameters()) + list(model[2].parameters()), "lr": 1e-3},
        {"params": list(model[4].parameters()), "lr": 1e-1},
    ]
    ur = UpdateRatio(window=10, verdict_every=10)
    ck, thetas = _train(model, torch.optim.Adam(groups), [ur], steps=10)
    assert set(ur.far_off()) == {"4.weight", "4.bias"}
    medians = {
        n: float(np.median([(thetas[t + 1][n] - thetas[t][n]).norm() / thetas[t][n].norm() for t in range(10)]))
        for n in thetas[0]
    }
    for n, v in ur.medians().items():
        assert v == pytest.approx(medians[n], rel=1e-5)
    (text,) = ck.verdicts()
    assert text.startswith("update ratio: the typical tensor moves")
    assert "far above the rest (more than 10x the typical ratio): 4." in text
    assert ck.history.last("verdict/update_ratio") == text.removeprefix("update ratio: ")
    assert ur.verdict() == ratio_verdict(medians)[0]


def test_verdict_levels_and_rules():
    level, text, far = ratio_verdict({"a": 1e-3, "b": 2e-3, "c": 1.5e-3, "d": 5e-2, "e": 0.0, "f": 1e-5})
    assert level == "near" and set(far) == {"d", "f"}
    assert "the typical tensor moves 0.0015 of its norm per step (near the 0.001 rule of thumb)" in text
    assert "far above the rest (more than 10x the typical ratio): d (0.05)" in text
    assert "far below the rest (less than 1/10 of the typical ratio): f (1e-05)" in text
    assert "not updated: e" in text
    level, text, _ = ratio_verdict({"a": 0.02, "b": 0.03})
    assert level == "high" and "(above 0.01, more than 10x the 0.001 rule of thumb: the learning rate is" in text
    level, text, _ = ratio_verdict({"a": 2e-5, "b": 3e-5})
    assert level == "low" and "(below 0.0001, less than 0.1x the 0.001 rule of thumb: the parameters" in text
    assert ratio_verdict({"a": 1e-3, "b": 9.9e-3})[2] == {}  # 9.9x: not far off
    assert ratio_verdict({})[0] == "undecided"
    assert UpdateRatio().verdicts() == []


def test_state_dict_round_trip_resumes_exactly():
    torch.manual_seed(0)
    model = models.mlp()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    full, _ = _train(model, torch.optim.SGD(model.parameters(), lr=0.2), [ur_full := UpdateRatio(window=6)], 12)

    model.load_state_dict(init)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(12)]
    loss_fn = nn.CrossEntropyLoss()
    state = None
    for part in (batches[:5], batches[5:]):
        ur = UpdateRatio(window=6)
        with Cockpit(model, opt, loss_fn, instruments=[ur], sinks=[]) as ck:
            if state is not None:
                ck.load_state_dict(state)
            for x, y in part:
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
        buf = io.BytesIO()
        torch.save(ck.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
    assert ur.medians() == pytest.approx(ur_full.medians(), rel=1e-12)
    assert ck.verdicts() == full.verdicts()
    assert dict(ck.history["update_ratio/global"]).keys() == set(range(5, 12))


def test_presentation_of_both_instruments(tmp_path):
    """Live run: both panels draw data (no 'not tracked' text), the TensorBoard layout holds their charts,
    and the summary prints their lines and verdicts."""
    pytest.importorskip("matplotlib")
    from cockpit_lite.figure import DashboardFigure
    from cockpit_lite.presentation import assemble, summary_text

    torch.manual_seed(0)
    model = models.mlp()
    inst = [GradientNoiseScale(verdict_every=5, min_steps=2), UpdateRatio(verdict_every=5)]
    ck, _ = _train(model, torch.optim.SGD(model.parameters(), lr=0.1), inst, steps=6)
    fig = DashboardFigure(instruments=ck.instruments)
    fig.update(ck.history)
    for key in ("noise_scale", "update_ratio"):
        panel = fig.panel(key)
        assert not panel._note.get_visible(), panel._note.get_text()
        assert any(len(line.get_xdata()) for line in panel.ax.get_lines())
    hist = fig.panel("update_ratio:histogram")
    assert not hist._note.get_visible(), hist._note.get_text()
    heights = [bar.get_height() for container in hist._bars for bar in container]
    assert sum(heights) == len(dict(ck.history["update_ratio/log10"])[5]) == len(list(model.parameters()))
    pres = assemble(ck.history, ck.instruments)
    assert not pres.undeclared  # every tag is declared by its instrument
    charts = pres.charts
    assert charts["Batch size"]["noise scale B_simple and batch size"][0] == "Multiline"
    assert "update-to-parameter ratio (rule of thumb 1e-3)" in charts["Step size"]
    text = summary_text(ck.history, instruments=ck.instruments)
    assert "noise scale B_simple (critical batch)" in text
    assert "update / parameter ratio (rule of thumb 1e-3)" in text
    assert "  batch_size (step 5): the batch of 8 is" in text
    assert "  update_ratio (step 5): the typical tensor moves" in text
