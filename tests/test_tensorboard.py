"""TensorBoard sink: the event files read back equal the cockpit's history."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cockpit_lite.sinks import JsonLines, TensorBoard
from cockpit_lite.sinks.tensorboard import markdown_table
from tests.sinks_util import B, accumulator, train

BINS = 7
STEPS = 6


def _rx(*tags):
    return [f"^{t}$" for t in tags]


#: The Custom Scalars layout of the built-in instruments and the core, as it was written by hand before
#: the instruments declared their charts: the assembled layout must be exactly this.
LAYOUT = {
    "Loss": {
        "batch loss": ["Multiline", _rx("loss")],
        "per-sample loss: median, 5% and 95% quantiles": [
            "Margin",
            ["loss/per_sample/p50", "loss/per_sample/p5", "loss/per_sample/p95"],
        ],
    },
    "Step size": {
        "gradient norm and update size": ["Multiline", _rx("grad_norm", "update_size")],
        "distance from the initial parameters": ["Multiline", _rx("distance")],
        "alpha (0 = valley floor, >1 = overshoot)": ["Multiline", _rx("alpha")],
    },
    "Gradient tests (1.0 = limit; above = noise dominates)": {
        "norm, inner-product and orthogonality tests": ["Multiline", _rx("tests/norm", "tests/inner", "tests/ortho")],
    },
    "Per-sample gradients": {
        "per-sample gradient norm: median, 5% and 95%": [
            "Margin",
            ["persample/grad_norm/p50", "persample/grad_norm/p5", "persample/grad_norm/p95"],
        ],
        "per-sample gradient norm: max and mean": [
            "Multiline",
            _rx("persample/grad_norm/max", "persample/grad_norm/mean"),
        ],
    },
    "Clipping": {
        "fraction clipped (global, AGC, per-sample)": ["Multiline", _rx(r"clip/(global|agc|per_sample)/frac_clipped")],
        "global norm before clipping and suggested max_norm": [
            "Multiline",
            _rx("clip/global/norm", r"clip/suggest/global/.*"),
        ],
        "AGC ratio ||G_i|| / ||W_i||: median, 5% and 95%": [
            "Margin",
            ["clip/agc/ratio/p50", "clip/agc/ratio/p5", "clip/agc/ratio/p95"],
        ],
    },
    "Influence": {
        "TracIn scalars": ["Multiline", [r"^tracin/.*"]],
    },
    "Cost": {
        "ms per tracked step (whole step, cockpit, sinks, driver)": [
            "Multiline",
            _rx("cost/step_ms", "cost/cockpit_ms", "cost/sinks_ms", "cost/driver_ms"),
        ],
        "ms per tracked step, by instrument": ["Multiline", [r"^cost/(?!step_|cockpit_|sinks_|driver_).*_ms$"]],
        "share of the step, by instrument": ["Multiline", [r"^cost/.*_share$"]],
    },
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("tb")
    sink = TensorBoard(logdir, hist_bins=BINS, image_every=3, image_min_s=0, image_max_share=None)
    cockpit = train(STEPS, logdir=logdir, sinks=[sink])
    return logdir, cockpit, accumulator(logdir)


def _scalar_tags(history):
    return [t for t in history if all(isinstance(v, float) for v in history.values(t))]


def test_scalars_equal_history(run):
    _, cockpit, acc = run
    h = cockpit.history
    tags = _scalar_tags(h)
    assert set(tags) <= set(acc.Tags()["scalars"])
    for tag in ["loss", "grad_norm", "update_size", "distance", "tests/norm", "persample/grad_norm/p50",
                "alpha", "clip/global/norm", "cost/step_ms", "cost/engine_ms", "cost/gradient_tests_share",
                "cost/cockpit_ms", "cost/sinks_ms"]:  # fmt: skip
        assert tag in tags, tag
    for tag in tags:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == list(h.steps(tag)), tag
        # simple_value is float32 on disk
        np.testing.assert_array_equal([e.value for e in events], np.float32(h.values(tag)), err_msg=tag)
    assert len(acc.Scalars("loss")) == STEPS


def test_histograms_have_the_set_bin_count(run):
    _, cockpit, acc = run
    for tag in ["persample/grad_norm", "loss/per_sample"]:
        events = acc.Histograms(tag)
        assert [e.step for e in events] == list(range(STEPS))
        for e, v in zip(events, cockpit.history.values(tag), strict=True):
            hv = e.histogram_value
            assert len(hv.bucket) == BINS and len(hv.bucket_limit) == BINS
            lo, hi = v.min(), v.max()
            assert hv.min == pytest.approx(lo) and hv.max == pytest.approx(hi) and hv.num == B
            assert hv.sum == pytest.approx(v.sum()) and hv.sum_squares == pytest.approx((v**2).sum())
            # independent count: bucket k holds lo + k w <= v < lo + (k+1) w, the last one closed
            w = (hi - lo) / BINS
            expected = np.zeros(BINS)
            for x in v:
                expected[min(int((x - lo) / w), BINS - 1)] += 1
            np.testing.assert_array_equal(hv.bucket, expected)
            np.testing.assert_allclose(hv.bucket_limit, lo + w * np.arange(1, BINS + 1))


def test_custom_scalars_layout(run):
    from tensorboard.plugins.custom_scalar import layout_pb2

    _, cockpit, acc = run
    events = acc.Tensors("custom_scalars__config__")
    assert len(events) == 1  # written once, at open
    layout = layout_pb2.Layout.FromString(events[0].tensor_proto.string_val[0])
    assert [c.title for c in layout.category] == list(LAYOUT)
    assert [[chart.title for chart in c.chart] for c in layout.category] == [list(v) for v in LAYOUT.values()]
    tags = set(cockpit.history)
    charts = {chart.title: chart for c in layout.category for chart in c.chart}
    for spec in LAYOUT.values():
        for title, (kind, series) in spec.items():
            chart = charts[title]
            if kind == "Margin":
                s = chart.margin.series[0]
                assert [s.value, s.lower, s.upper] == series
            else:
                assert list(chart.multiline.tag) == series
    # the charts filled by this run point at tags that exist (regexes match as TensorBoard does: re.match)
    filled = ["batch loss", "gradient norm and update size", "distance from the initial parameters",
              "norm, inner-product and orthogonality tests", "ms per tracked step, by instrument",
              "share of the step, by instrument", "alpha (0 = valley floor, >1 = overshoot)",
              "fraction clipped (global, AGC, per-sample)"]  # fmt: skip
    for title in filled:
        regexes = charts[title].multiline.tag
        assert all(any(re.match(r, t) for t in tags) for r in regexes), title
    by_instrument = charts["ms per tracked step, by instrument"].multiline.tag[0]
    assert re.match(by_instrument, "cost/engine_ms") and not re.match(by_instrument, "cost/step_ms")
    margin = charts["per-sample loss: median, 5% and 95% quantiles"].margin.series[0]
    assert {margin.value, margin.lower, margin.upper} <= tags


def _texts(acc, tag):
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(f"{tag}/text_summary")]


def test_text_verdict_and_table(run):
    _, _, acc = run
    # the verdict repeats each step; only its changes are written
    assert _texts(acc, "verdict/lr") == [(0, "fine"), (3, "too large: alpha > 1")]
    [(step, table)] = _texts(acc, "tracin/top_self_influence")
    assert step == 0
    lines = table.splitlines()
    assert lines[0] == "| index | self_influence |"
    assert lines[2:] == ["| 5 | 0.1 |", "| 7 | 0.9 |", "| 9 | 0.5 |"]


def test_dashboard_image(run):
    _, _, acc = run
    images = acc.Images("dashboard")
    assert [e.step for e in images] == [2, 5]  # every 3 tracked steps; the last one is step 5 already
    for e in images:
        assert e.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
        assert e.width > 500 and e.height > 300


def test_one_run_no_subruns(run):
    logdir, _, _ = run
    assert not [p for p in Path(logdir).iterdir() if p.is_dir()]  # add_scalars/add_hparams would make some
    assert len(list(Path(logdir).glob("events.out.tfevents.*"))) == 1


def test_logdir_alone_defaults_to_jsonl_and_tensorboard(tmp_path):
    c = train(1, talker=False, logdir=tmp_path / "a")
    assert [type(s) for s in c.sinks] == [JsonLines, TensorBoard]
    assert accumulator(tmp_path / "a").Scalars("loss")[0].value == pytest.approx(c.history.last("loss"))
    c = train(1, talker=False, logdir=tmp_path / "b", sinks=[])
    assert [type(s) for s in c.sinks] == [JsonLines]


def test_survives_a_crash_up_to_the_last_flush(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        import torch
        from torch import nn
        from cockpit_lite import Cockpit
        from cockpit_lite.sinks import TensorBoard
        from tests import models
        torch.manual_seed(0)
        model = models.mlp(); opt = torch.optim.SGD(model.parameters(), lr=0.1); loss_fn = nn.CrossEntropyLoss()
        sink = TensorBoard({str(tmp_path)!r}, flush_secs=3600, image_every=None)
        cockpit = Cockpit(model, opt, loss_fn, instruments="minimal", sinks=[sink])
        for step in range(6):
            opt.zero_grad(); loss_fn(model(torch.randn(4, 6)), torch.randint(0, 3, (4,))).backward(); opt.step()
            if step == 3:
                sink.flush()
        os._exit(1)  # a crash: no close, no atexit, no flush
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    steps = [e.step for e in accumulator(tmp_path).Scalars("loss")]
    assert steps[:4] == [0, 1, 2, 3]


def test_markdown_table_of_scalars_and_ragged_columns():
    assert markdown_table({"a": 1.0, "b": "x"}).splitlines() == ["| a | b |", "|---|---|", "| 1 | x |"]
    assert markdown_table({"a": np.array([1, 2]), "b": np.array([3.5])}).splitlines()[2:] == ["| 1 | 3.5 |", "| 2 |  |"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="hist_bins"):
        TensorBoard("x", hist_bins=0)


def test_event_encoding_equals_protobuf():
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

    from cockpit_lite.sinks.events import SummaryEncoder, encode_event, varint
    from cockpit_lite.sinks.tensorboard import histogram_buckets

    rng = np.random.default_rng(0)
    enc = SummaryEncoder()
    values = {
        "loss": 0.25,
        "grad_norm/0.weight": float(rng.random()),
        "é/ünïcode": -3.5,
        "big": 1e300,
        "nan": np.nan,
        "zero": 0.0,
    }
    v = rng.normal(size=50)
    lo, hi, num, total, sq, limits, counts = histogram_buckets(v, 9)
    parts = [enc.scalar(t, x) for t, x in values.items()] + [enc.histogram("h", lo, hi, num, total, sq, limits, counts)]
    expected = Summary(
        value=[Summary.Value(tag=t, simple_value=x) for t, x in values.items()]
        + [Summary.Value(tag="h", histo=HistogramProto(min=lo, max=hi, num=num, sum=total, sum_squares=sq,
                                                         bucket_limit=limits.tolist(), bucket=counts.tolist()))]
    )  # fmt: skip
    # decoded by protobuf itself, the hand-made bytes are exactly the intended messages
    decoded = Summary.FromString(b"".join(parts))
    assert decoded == expected
    assert decoded.value[3].simple_value == np.inf and np.isnan(decoded.value[4].simple_value)
    for step in (0, 1, 127, 128, 300, 2**40):
        event = Event(wall_time=1234.5, step=step, summary=expected)
        assert Event.FromString(encode_event(step, 1234.5, b"".join(parts))) == event
    assert varint(300) == b"\xac\x02"


def test_crc_equals_tensorboards():
    import os

    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference

    from cockpit_lite.sinks.events import crc32c, masked_crc32c

    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    for n in [0, 1, 3, 4, 5, 63, 64, 65, 255, 256, 257, 1000, 3333, 70000]:
        data = os.urandom(n)
        assert masked_crc32c(data) == reference(data), n
