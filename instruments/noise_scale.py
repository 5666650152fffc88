"""GradientNoiseScale: the simple gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al.
2018, "An Empirical Model of Large-Batch Training") from per-sample squared gradient norms, and a
batch-size verdict in words.

Per tracked step, with the B per-sample gradients g_i of the step (over the parameters with per-sample
statistics), S = mean_i ||g_i||^2 and gbar = mean_i g_i, the unbiased estimates (REFERENCE.md section 8;
Gray et al. 2024)

    |G|^2     ~ (B ||gbar||^2 - S) / (B - 1)
    tr(Sigma) ~ B (S - ||gbar||^2) / (B - 1)

(E[||gbar||^2] = |G|^2 + tr(Sigma) / B and E[S] = |G|^2 + tr(Sigma) for independent draws). Each is
smoothed by an exponential moving average with bias correction, m_n = beta m_{n-1} + (1 - beta) x_n,
smoothed = m_n / (1 - beta^n) (n: tracked steps with a finite estimate), and the noise scale is the ratio
of the smoothed numerator and denominator: B_simple = tr(Sigma)_smoothed / |G|^2_smoothed (the ratio of
two noisy estimates is biased; the ratio of their averages is not, to first order).

The verdict compares the batch B with B_simple through McCandlish et al.'s trade-off (their eq. 2.11,
with B_crit ~ B_simple): training needs S = S_min (1 + B_simple / B) steps and E = E_min (1 + B / B_simple)
examples. Thresholds: ``FAR``: B < B_simple / FAR is "far below" (steps are wasted: a larger batch
would use the data as well), B > FAR B_simple is "far above" (examples are wasted: a smaller batch would
reach the same loss with fewer examples), else "near" (about the critical batch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from cockpit_lite.instruments._util import uncovered_note

from cockpit_lite import Instrument, Need
from cockpit_lite.attach import Optimizers
from cockpit_lite.panels import LinePanel

#: the batch is "far below" the noise scale when B < B_simple / FAR, "far above" when B > FAR B_simple
FAR = 5.0
#: the EMA's default decay (about 1 / (1 - BETA) = 20 tracked steps of memory)
BETA = 0.95
#: optimizers for which an SGD-derived noise scale is known to be biased (matched in the class name)
ADAPTIVE = ("adam", "adafactor", "lamb", "lion", "sophia", "shampoo", "soap", "muon")
ADAM_NOTE = (
    "the noise scale B_simple = tr(Sigma) / |G|^2 is derived for SGD; with an Adam-family optimizer ({opt}) the "
    "critical batch it predicts is known to be biased (the preconditioner rescales the noise and the gradient "
    "differently; Merrill et al. 2025 measure the critical batch directly): read it as a trend"
)


def noise_scale_estimates(sq_norms: np.ndarray, mean_grad_sq_norm: float) -> tuple[float, float]:
    """(|G|^2, tr(Sigma)) from ||g_i||^2 (i < B) and ||gbar||^2, gbar = mean_i g_i, both unbiased:

    |G|^2 ~ (B ||gbar||^2 - S) / (B - 1),  tr(Sigma) ~ B (S - ||gbar||^2) / (B - 1),  S = mean_i ||g_i||^2.

    NaN for both when B < 2. The |G|^2 estimate can be negative on a step whose noise hides the gradient.
    """
    sq = np.asarray(sq_norms, dtype=np.float64)
    b = len(sq)
    if b < 2:
        return math.nan, math.nan
    s = float(sq.mean())
    g2 = float(mean_grad_sq_norm)
    return (b * g2 - s) / (b - 1), b * (s - g2) / (b - 1)


def batch_verdict(batch: float, b_simple: float, far: float = FAR) -> tuple[str, str]:
    """(label, sentence) comparing the batch with the noise scale; label in {"far below", "near", "far above",
    "undecided"}.

    Rules: B_simple <= 0 or not finite (the smoothed |G|^2 is not positive: noise hides the gradient) ->
    "far below"; B < B_simple / far -> "far below"; B > far B_simple -> "far above"; else "near". The
    sentence quotes McCandlish et al.'s trade-off: steps S = S_min (1 + B_simple / B), examples
    E = E_min (1 + B / B_simple).
    """
    b = int(round(batch))
    if not math.isfinite(b_simple) or b_simple <= 0:
        return "far below", (
            f"the batch of {b} is far below the noise scale: the smoothed |G|^2 estimate is not positive, the "
            "gradient noise hides the gradient; larger batches would use the data as well, and each step "
            "would make more progress"
        )
    steps, examples = 1.0 + b_simple / b, 1.0 + b / b_simple
    cost = f"(McCandlish et al.: {steps:.2g}x the fewest steps, {examples:.2g}x the fewest examples)"
    about = f"about {b_simple:.3g}"
    if b * far < b_simple:
        return "far below", (
            f"the batch of {b} is far below the noise scale of {about} {cost}: larger batches would use the data "
            f"as well and take fewer steps (up to about {b_simple:.3g}, each doubling of the batch nearly halves the "
            "steps needed)"
        )
    if b > far * b_simple:
        return "far above", (
            f"the batch of {b} is far above the noise scale of {about} {cost}: a smaller batch (about "
            f"{b_simple:.3g}) would reach the same loss with fewer examples; more steps of a smaller batch use the "
            "data better"
        )
    return "near", (
        f"the batch of {b} is near the noise scale of {about} {cost}: a good trade-off between steps and "
        "examples (the critical batch size)"
    )


def is_adaptive(optimizer: Any) -> bool:
    """Whether the optimizer is Adam-family (or another preconditioned method), by its class name; of
    several optimizers read as one (``attach.Optimizers``), whether any is."""
    if isinstance(optimizer, Optimizers):
        return any(is_adaptive(o) for o in optimizer.optimizers)
    name = type(optimizer).__name__.lower()
    return any(k in name for k in ADAPTIVE)


class GradientNoiseScale(Instrument):
    """The gradient noise scale B_simple and a batch-size verdict.

    Args:
        beta: decay of the EMAs of |G|^2 and tr(Sigma) (bias-corrected; 0 = no smoothing).
        far: the verdict's factor: "far below" when B < B_simple / far, "far above" when B > far B_simple.
        verdict_every: write ``verdict/batch_size`` every this many tracked steps; also when closing.
        min_steps: fewest tracked steps with an estimate before a verdict other than "undecided".
        every, schedule, name: see :class:`~cockpit_lite.Instrument`.

    Tags per tracked step: ``noise_scale/b_simple`` (smoothed tr(Sigma) / smoothed |G|^2; NaN while the
    smoothed |G|^2 is not positive), ``noise_scale/b_simple_raw`` (this step's ratio; noisy, may be
    negative), ``noise_scale/grad_sq`` and ``noise_scale/trace`` (smoothed |G|^2 and tr(Sigma)),
    ``noise_scale/grad_sq_raw`` and ``noise_scale/trace_raw`` (this step's unbiased estimates),
    ``noise_scale/batch`` (B); with each verdict ``verdict/batch_size`` (text).

    B is the step's examples: the sum over micro-batches under gradient accumulation, over ranks under
    DDP (the distributed provider gathers the per-sample squared norms and g_i . gbar of the global batch,
    gbar the all-reduced gradient). The per-sample statistics cover the parameters the per-sample engine
    sees; a note says when some are left out (the estimates then describe the covered part).

    Cost: per-sample squared norms and g_i . gbar (as GradientTests; shared when both run), O(B) numpy.
    State: the two EMAs, their count, the last batch and the verdict counter.
    """

    TAGS = {
        "noise_scale/b_simple": "B_simple = tr(Sigma) / |G|^2 from the smoothed estimates (NaN while |G|^2 <= 0)",
        "noise_scale/b_simple_raw": "this step's tr(Sigma) / |G|^2 (noisy)",
        "noise_scale/grad_sq": "|G|^2, smoothed (EMA)",
        "noise_scale/trace": "tr(Sigma), smoothed (EMA)",
        "noise_scale/grad_sq_raw": "this step's unbiased |G|^2 estimate",
        "noise_scale/trace_raw": "this step's unbiased tr(Sigma) estimate",
        "noise_scale/batch": "B, the step's examples",
        "verdict/batch_size": "the batch-size verdict (text)",
    }
    PANELS = (
        LinePanel(
            "Gradient noise scale vs batch size",
            ["noise_scale/b_simple", "noise_scale/batch"],
            ylabel="examples",
            labels=["B_simple = tr(Σ) / |G|² (smoothed)", "batch size B"],
            log=True,
            missing="not tracked: add the GradientNoiseScale instrument (`noise_scale/b_simple`)",
            key="noise_scale",
        ),
    )
    CHARTS = {
        "Batch size": {
            "noise scale B_simple and batch size": ["Multiline", ["^noise_scale/b_simple$", "^noise_scale/batch$"]],
            "|G|^2 and tr(Sigma) (smoothed)": ["Multiline", ["^noise_scale/grad_sq$", "^noise_scale/trace$"]],
        },
    }
    SUMMARY = (
        ("noise_scale/b_simple", "noise scale B_simple (critical batch)"),
        ("noise_scale/batch", "batch size"),
    )
    ORDER = 91.0  # after the built-in 3 x 4 grid (10 to 90), before the cost panels (100)
    PLACEHOLDER = False  # shown only in runs that have it

    NEEDS = frozenset({Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_DOT_MEAN})

    def __init__(self, beta: float = BETA, far: float = FAR, verdict_every: int = 100, min_steps: int = 10, **kw: Any):
        super().__init__(**kw)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"GradientNoiseScale: beta={beta!r} must be in [0, 1)")
        if far <= 1.0:
            raise ValueError(f"GradientNoiseScale: far={far!r} must exceed 1")
        if verdict_every < 1 or min_steps < 1:
            raise ValueError("GradientNoiseScale: verdict_every and min_steps must be positive integers")
        self.beta, self.far, self.verdict_every, self.min_steps = float(beta), float(far), verdict_every, min_steps
        self._ema_g2 = 0.0
        self._ema_tr = 0.0
        self._n = 0  # estimates averaged so far
        self._batch: int | None = None
        self._since_verdict = 0
        self._last_step: int | None = None
        self._adaptive: str | None = None
        self._noted_adaptive = False

    def on_attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        named = repr(optimizer) if isinstance(optimizer, Optimizers) else type(optimizer).__name__
        self._adaptive = named if is_adaptive(optimizer) else None

    # --- the estimates -------------------------------------------------------------------------------
    def smoothed(self) -> tuple[float, float, float]:
        """(|G|^2, tr(Sigma), B_simple) from the bias-corrected EMAs; NaN before the first estimate, and
        B_simple NaN while the smoothed |G|^2 is not positive (noise hides the gradient)."""
        if self._n == 0:
            return math.nan, math.nan, math.nan
        corr = 1.0 - self.beta**self._n
        g2, tr = self._ema_g2 / corr, self._ema_tr / corr
        b_simple = tr / g2 if g2 > 0 else math.nan
        return g2, tr, b_simple

    def compute(self, record) -> dict[Any, Any]:
        sq, g2bar = record.per_sample_sq_norms, record.mean_grad_sq_norm
        if sq is None or g2bar is None:
            return {}
        if self._adaptive is not None and not self._noted_adaptive:
            self.note(ADAM_NOTE.format(opt=self._adaptive))
            self._noted_adaptive = True
        b = len(sq)
        if b < 2:
            self.note("the noise scale needs at least 2 samples per batch: NaN")
        uncovered = uncovered_note(record, "the noise scale is", "it describes")
        if uncovered:
            self.note(uncovered)
        g2, tr = noise_scale_estimates(sq, g2bar)
        out: dict[Any, Any] = {
            self.tag("noise_scale/grad_sq_raw"): g2,
            self.tag("noise_scale/trace_raw"): tr,
            self.tag("noise_scale/b_simple_raw"): tr / g2 if g2 != 0 and math.isfinite(g2) else math.nan,
            self.tag("noise_scale/batch"): float(b),
        }
        if math.isfinite(g2) and math.isfinite(tr):
            self._ema_g2 = self.beta * self._ema_g2 + (1.0 - self.beta) * g2
            self._ema_tr = self.beta * self._ema_tr + (1.0 - self.beta) * tr
            self._n += 1
            self._batch = b
        sg2, str_, bs = self.smoothed()
        if math.isnan(bs) and sg2 <= 0.0:
            self.note(
                f"the smoothed |G|^2 is {sg2:.3g} (not positive: the noise hides the gradient at this batch size): "
                "B_simple is undefined (NaN)"
            )
        out[self.tag("noise_scale/grad_sq")] = sg2
        out[self.tag("noise_scale/trace")] = str_
        out[self.tag("noise_scale/b_simple")] = bs
        self._last_step = record.step
        self._since_verdict += 1
        if self._since_verdict >= self.verdict_every:
            self._since_verdict = 0
            out[self.tag("verdict/batch_size")] = self._verdict()[1]
        return out

    def _verdict(self) -> tuple[str, str]:
        if self._n < self.min_steps or self._batch is None:
            return "undecided", (
                f"only {self._n} tracked steps with a noise-scale estimate: too few for a batch-size verdict "
                f"(needs {self.min_steps})"
            )
        label, text = batch_verdict(self._batch, self.smoothed()[2], self.far)
        if self._adaptive is not None:
            text += f" (an SGD-based estimate: biased for {self._adaptive})"
        return label, text

    def verdict(self) -> str:
        """The verdict's label: "far below", "near", "far above" or "undecided"."""
        return self._verdict()[0]

    def verdicts(self) -> list[str]:
        """The batch-size verdict, e.g. "batch size: the batch of 64 is far below the noise scale of about
        900 ...: larger batches would use the data as well ..."."""
        if self._last_step is None:
            return []
        return [f"batch size: {self._verdict()[1]}"]

    def on_close(self) -> dict[Any, Any]:
        if self._last_step is None:
            return {}
        return {(self._last_step, self.tag("verdict/batch_size")): self._verdict()[1]}

    # --- state (resuming a run) ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``ema_grad_sq``, ``ema_trace`` (the EMAs before bias correction), ``count`` (estimates
        averaged), ``batch`` (the last B), ``since_verdict``, ``last_step``, ``noted_adaptive``."""
        return {
            "ema_grad_sq": float(self._ema_g2),
            "ema_trace": float(self._ema_tr),
            "count": int(self._n),
            "batch": self._batch,
            "since_verdict": int(self._since_verdict),
            "last_step": self._last_step,
            "noted_adaptive": bool(self._noted_adaptive),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the EMAs continue with this instance's ``beta``)."""
        self._ema_g2 = float(state["ema_grad_sq"])
        self._ema_tr = float(state["ema_trace"])
        self._n = int(state["count"])
        self._batch = None if state["batch"] is None else int(state["batch"])
        self._since_verdict = int(state["since_verdict"])
        self._last_step = None if state["last_step"] is None else int(state["last_step"])
        self._noted_adaptive = bool(state.get("noted_adaptive", False))
