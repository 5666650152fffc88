"""GradientTests: the norm, inner-product and orthogonality tests of Cockpit (Bollapragada et al.
2018; Byrd et al. 2012), exactly as Cockpit 1.0.2 defines them (REFERENCE.md section 3)."""

from __future__ import annotations

import math

import numpy as np
from cockpit_lite.instruments._util import uncovered_note

from cockpit_lite import Instrument, Need
from cockpit_lite.panels import LinePanel


def gradient_tests(sq_norms: np.ndarray, dots: np.ndarray) -> dict[str, float]:
    """The three tests from ||g_i||^2 and g_i . gbar (gbar = mean_i g_i).

    norm  = sqrt( sum_i ||g_i - gbar||^2 / (B (B-1) ||gbar||^2) )
    inner = sqrt( sum_i (g_i . gbar - ||gbar||^2)^2 / (B (B-1) ||gbar||^4) )
    ortho = sqrt( sum_i ||g_i - (g_i . gbar / ||gbar||^2) gbar||^2 / (B (B-1) ||gbar||^2) )
    using sum_i ||g_i - gbar||^2 = sum_i ||g_i||^2 - B ||gbar||^2 and
    ||g_i - c_i gbar||^2 = ||g_i||^2 - (g_i . gbar)^2 / ||gbar||^2. NaN when B = 1 or ||gbar||^2 <= 0.
    """
    b = len(sq_norms)
    g2 = float(np.add.reduce(dots)) / b if b else math.nan  # ||gbar||^2 = mean_i g_i . gbar
    if b < 2 or not g2 > 0.0:  # gbar = 0 (or a round-off below it), or NaN: the tests are undefined
        return {"norm": math.nan, "inner": math.nan, "ortho": math.nan}
    denom = b * (b - 1) * g2
    var = max(float(np.add.reduce(sq_norms)) - b * g2, 0.0)
    inner_sum = float(np.add.reduce((dots - g2) ** 2))
    ortho_sum = max(float(np.add.reduce(sq_norms - dots**2 / g2)), 0.0)
    # (plain floats: np.mean, np.sum and np.errstate cost a Python call each)
    return {
        "norm": math.sqrt(var / denom),
        "inner": math.sqrt(inner_sum / (denom * g2)),
        "ortho": math.sqrt(ortho_sum / denom),
    }


def norm_test(sq_norms: np.ndarray, mean_sq_norm: float) -> float:
    """The norm test from ||g_i||^2 and ||gbar||^2 alone (as in :func:`gradient_tests`):
    sqrt( (sum_i ||g_i||^2 - B ||gbar||^2) / (B (B-1) ||gbar||^2) ). NaN when B = 1 or ||gbar||^2 <= 0."""
    b = len(sq_norms)
    if b < 2 or not mean_sq_norm > 0.0:
        return math.nan
    var = max(float(np.add.reduce(sq_norms)) - b * mean_sq_norm, 0.0)
    return math.sqrt(var / (b * (b - 1) * mean_sq_norm))


class GradientTests(Instrument):
    """Norm, inner-product and orthogonality tests of the mini-batch gradient.

    Each compares the spread of per-sample gradients with the mini-batch gradient: values above 1 mean
    the batch is too small for the gradient's direction (norm test), for descent (inner test) or for
    its orthogonal noise (ortho test). Tags: ``tests/norm``, ``tests/inner``, ``tests/ortho``; NaN with a
    note when the batch has one sample.
    Cost: per-sample squared norms and g_i . gbar from layer factors (Gram of the factors), no B x D.
    Under FSDP2 g_i . gbar is left out (gbar is sharded; the distributed provider's note says why) and the
    norm test alone comes from ||g_i||^2 and ||gbar||^2 (``record.mean_grad_sq_norm``, :func:`norm_test`).
    State: none between steps (each step's tests come from that step's record alone), so
    ``state_dict()`` is ``{}`` and a resumed run continues the same tests without it.
    """

    TAGS = {"tests/norm": "norm test", "tests/inner": "inner-product test", "tests/ortho": "orthogonality test"}
    PANELS = (
        LinePanel(
            "Gradient tests: is the batch gradient noise-dominated?",
            ["tests/norm", "tests/inner", "tests/ortho"],
            ylabel="test statistic (1.0 = limit)",
            labels=["norm test", "inner-product test", "orthogonality test"],
            log=True,
            ref=(1.0, "1.0: above = noise dominates (bigger batch / smaller lr)"),
            missing="not tracked: add the GradientTests instrument (`tests/norm`, `tests/inner`, `tests/ortho`)",
            key="gradient_tests",
        ),
    )
    CHARTS = {
        "Gradient tests (1.0 = limit; above = noise dominates)": {
            "norm, inner-product and orthogonality tests": [
                "Multiline",
                ["^tests/norm$", "^tests/inner$", "^tests/ortho$"],
            ],
        },
    }
    SUMMARY = (
        ("tests/norm", "norm test (>1: noise dominates)"),
        ("tests/inner", "inner-product test"),
        ("tests/ortho", "orthogonality test"),
    )
    ORDER = 50.0

    NEEDS = frozenset({Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_DOT_MEAN})

    def compute(self, record):
        sq, dots, g2 = record.per_sample_sq_norms, record.per_sample_dot_mean, record.mean_grad_sq_norm
        if dots is None and (sq is None or g2 is None):
            return {}
        if sq is None:  # g_i . gbar alone (e.g. a projection-only step): the inner test
            inner = gradient_tests(np.zeros_like(dots), dots)["inner"]
            return {self.tag("tests/inner"): inner}
        if record.batch_size == 1:
            self.note("gradient tests need at least 2 samples per batch: NaN")
        elif g2 is not None and g2 <= 0.0:  # zero, or a round-off below it
            self.note(f"||gbar||^2 = {g2:.3g}: the tests divide by it and are undefined (NaN)")
        uncovered = uncovered_note(record, "the tests are", "they describe")
        if uncovered:
            self.note(uncovered)
        if dots is None:  # ||g_i||^2 and ||gbar||^2 without g_i . gbar (FSDP2: gbar is sharded)
            return {self.tag("tests/norm"): norm_test(sq, g2)}
        tests = gradient_tests(sq, dots)
        return {self.tag(f"tests/{k}"): v for k, v in tests.items()}
