"""UpdateRatio: the update-to-parameter ratio ||Delta theta|| / ||theta|| of every parameter tensor, its
distribution over the tensors, and a verdict naming the layers far off the rest.

Per tracked step t and tensor p, with the optimizer's actual update Delta theta_p = theta_{t+1,p} - theta_{t,p}
(so every optimizer, clipping, weight decay and schedule is included) and theta_{t,p} the tensor before
the step:

    r_p = ||Delta theta_p|| / ||theta_{t,p}||,    global: r = ||Delta theta|| / ||theta_t|| (all tensors).

The common rule of thumb (Karpathy; logged per tensor by Levanter's watch callback and on an OLMo-core
branch) puts healthy ratios near 1e-3 per step.

The verdict looks at each tensor's median ratio over the last ``window`` tracked steps, m_p, and at their
median over tensors, m (the typical tensor):

- a tensor is *far off* when |log10(m_p / m)| > log10(FAR) (FAR = 10: more than 10x above or below
  the typical tensor); a tensor whose update is exactly zero over the window is *not updated*;
- the level: m > HIGH (1e-2, ten times the rule of thumb) is "high" (the learning rate is likely too
  large for these parameters), m < LOW (1e-4, a tenth of it) is "low", else "near" the 1e-3 rule.

Tensors with ||theta_t|| = 0 (a zero-initialised bias before its first update) have no ratio; they are
left out of the distribution, with a note.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np
from cockpit_lite.instruments._util import quantile_records

from cockpit_lite import Instrument, Need
from cockpit_lite.panels import COLORS, Panel, QuantilePanel
from cockpit_lite.providers.param_norms import PARAM_NORMS

#: the rule of thumb for a healthy update-to-parameter ratio per step
RULE_OF_THUMB = 1e-3
#: the typical tensor's ratio above this is "high", below LOW "low"
HIGH = 1e-2
LOW = 1e-4
#: a tensor is far off the rest when its ratio differs from the typical tensor's by more than this factor
FAR = 10.0


def update_ratios(update_norms: Mapping[str, float], param_norms: Mapping[str, float]) -> dict[str, float]:
    """{name: ||Delta theta_p|| / ||theta_p||} for the tensors with both norms; NaN where ||theta_p|| = 0."""
    out = {}
    for name, d in update_norms.items():
        p = param_norms.get(name)
        if p is None:
            continue
        out[name] = float(d) / float(p) if p > 0 else math.nan
    return out


def ratio_verdict(
    medians: Mapping[str, float], far: float = FAR, high: float = HIGH, low: float = LOW
) -> tuple[str, str, dict[str, float]]:
    """(level, sentence, far-off tensors {name: median ratio}) from each tensor's median ratio.

    level in {"high", "near", "low", "undecided"} compares the median over tensors m with ``high`` and
    ``low``; a tensor is far off when its ratio is more than ``far`` times above or below m, and named
    "not updated" when it is 0. See the module docstring.
    """
    finite = {n: v for n, v in medians.items() if math.isfinite(v)}
    if not finite:
        return "undecided", "no update ratios yet", {}
    zero = sorted(n for n, v in finite.items() if v == 0.0)
    moving = {n: v for n, v in finite.items() if v > 0.0}
    if not moving:
        return "undecided", f"no tensor moved ({len(zero)} tensors with a zero update)", {}
    m = float(np.median(list(moving.values())))
    lim = math.log10(far)
    above = {n: v for n, v in moving.items() if math.log10(v / m) > lim}
    below = {n: v for n, v in moving.items() if math.log10(v / m) < -lim}
    rule = f"the {RULE_OF_THUMB:g} rule of thumb"
    if m > high:
        level = "high"
        how = f"above {high:g}, more than {high / RULE_OF_THUMB:g}x {rule}: the learning rate is likely too large"
    elif m < low:
        level = "low"
        how = (
            f"below {low:g}, less than {low / RULE_OF_THUMB:g}x {rule}: the parameters barely move (learning rate "
            "too small, or large parameters)"
        )
    else:
        level, how = "near", f"near {rule}"
    parts = [f"the typical tensor moves {m:.2g} of its norm per step ({how})"]

    def listed(d: dict[str, float]) -> str:
        items = sorted(d.items(), key=lambda kv: -abs(math.log10(kv[1] / m)))
        shown = ", ".join(f"{n} ({v:.2g})" for n, v in items[:5])
        return shown + (f" and {len(items) - 5} more" if len(items) > 5 else "")

    if above:
        parts.append(f"far above the rest (more than {far:g}x the typical ratio): {listed(above)}")
    if below:
        parts.append(f"far below the rest (less than 1/{far:g} of the typical ratio): {listed(below)}")
    if zero:
        shown = ", ".join(zero[:5]) + (f" and {len(zero) - 5} more" if len(zero) > 5 else "")
        parts.append(f"not updated: {shown}")
    if not (above or below or zero):
        parts.append(f"no tensor is more than {far:g}x off the typical ratio")
    return level, "; ".join(parts), {**above, **below}


class RatioPanel(QuantilePanel):
    """The quantiles of the ratio over tensors, the global ratio, and the 1e-3 rule of thumb."""

    def setup(self, ax) -> None:
        self._rule = ax.axhline(
            RULE_OF_THUMB, color=COLORS["ref"], linestyle="--", linewidth=1, label=f"{RULE_OF_THUMB:g} rule of thumb"
        )
        self._rule.set_visible(False)

    def update(self, h: Any) -> None:
        super().update(h)
        present = len(self.series(h, "update_ratio/p50")[0]) > 0
        self._rule.set_visible(present)
        if present:
            self._labelled[self._rule.get_label()] = self._rule
            self.legend()


class RatioHistogram(Panel):
    """The histogram of log10 ||Delta theta_p|| / ||theta_p|| over the tensors at the last tracked step."""

    title = "Update ratio by tensor, last tracked step"
    xlabel = "log10 ||Δθ_p|| / ||θ_p||  (-3 = rule of thumb)"
    ylabel = "tensors"
    key = "update_ratio:histogram"

    def setup(self, ax) -> None:
        self._bars: list = []
        self._rule = ax.axvline(math.log10(RULE_OF_THUMB), color=COLORS["ref"], linestyle="--", linewidth=1)
        self._rule.set_visible(False)

    def update(self, h: Any) -> None:
        self.clear_patches("_bars")
        item = self.latest(h, "update_ratio/log10")
        logs = np.asarray(item[1], dtype=np.float64) if item is not None else np.empty(0)
        logs = logs[np.isfinite(logs)]
        self._rule.set_visible(bool(logs.size))
        if not self.shows(logs.size):
            return
        lo, hi = min(logs.min(), -3.0), max(logs.max(), -3.0)
        counts, edges = np.histogram(logs, bins=max(5, min(30, logs.size)), range=(lo - 0.05, hi + 0.05))
        self._bars = [self.histogram_bars(counts, edges, f"step {item[0]}")]
        self.rescale()
        self.legend()


class UpdateRatio(Instrument):
    """||Delta theta_p|| / ||theta_p|| per parameter tensor, its distribution over tensors, and a verdict.

    Args:
        per_param: also write ``update_ratio/param/<name>`` for every tensor.
        window: tracked steps over which each tensor's median ratio is taken for the verdict.
        far: a tensor is far off when its median ratio is more than ``far`` times above or below the
            median over tensors.
        verdict_every: write ``verdict/update_ratio`` every this many tracked steps; also when closing.
        every, schedule, name: see :class:`~cockpit_lite.Instrument`.

    Tags per tracked step: ``update_ratio/global`` (||Delta theta|| / ||theta|| over all tensors),
    ``update_ratio/{p5,p25,p50,p75,p95,max,mean}`` (over the tensors), ``update_ratio/log10`` (the
    tensors' log10 ratios, a vector: a histogram in TensorBoard), ``update_ratio/far_off`` (tensors this
    step more than ``far`` times off the step's median), ``update_ratio/param/<name>``; with each verdict
    ``verdict/update_ratio`` (text).

    Cost: the update (a parameter snapshot, D floats, shared with UpdateSize and Alpha) and one fused norm
    of the parameters before the step; O(#tensors) numbers per step. State: the window of ratios per tensor.
    """

    TAGS = {
        "update_ratio/global": "||Delta theta|| / ||theta|| over all parameters",
        "update_ratio/(p5|p25|p50|p75|p95|max|mean)": "quantiles of ||Delta theta_p|| / ||theta_p|| over tensors",
        "update_ratio/log10": "log10 ||Delta theta_p|| / ||theta_p|| of every tensor (vector)",
        "update_ratio/far_off": "tensors more than 10x off the step's median ratio",
        "update_ratio/param/.+": "||Delta theta_p|| / ||theta_p|| of one tensor",
        "verdict/update_ratio": "the update-ratio verdict (text)",
    }
    PANELS = (
        RatioPanel(
            "update_ratio",
            "update_ratio/global",
            title="Update-to-parameter ratio ||Δθ|| / ||θ||",
            ylabel="||Δθ|| / ||θ|| per step",
            scalar_label="all parameters",
            what="tensors",
            missing="not tracked: add the UpdateRatio instrument (`update_ratio/...`)",
            key="update_ratio",
        ),
        RatioHistogram(missing="not tracked: add the UpdateRatio instrument (`update_ratio/log10`)"),
    )
    CHARTS = {
        "Step size": {
            "update-to-parameter ratio (rule of thumb 1e-3)": [
                "Multiline",
                ["^update_ratio/global$", "^update_ratio/p5$", "^update_ratio/p50$", "^update_ratio/p95$"],
            ],
        },
    }
    SUMMARY = (
        ("update_ratio/global", "update / parameter ratio (rule of thumb 1e-3)"),
        ("update_ratio/p50", "median tensor's update ratio"),
    )
    ORDER = 92.0  # after the built-in 3 x 4 grid (10 to 90), before the cost panels (100)
    PLACEHOLDER = False  # shown only in runs that have it

    NEEDS = frozenset({Need.UPDATE, PARAM_NORMS})

    def __init__(self, per_param: bool = True, window: int = 20, far: float = FAR, verdict_every: int = 100, **kw):
        super().__init__(**kw)
        if window < 1 or verdict_every < 1:
            raise ValueError("UpdateRatio: window and verdict_every must be positive integers")
        if far <= 1.0:
            raise ValueError(f"UpdateRatio: far={far!r} must exceed 1")
        self.per_param, self.window, self.far, self.verdict_every = per_param, window, float(far), verdict_every
        self._ratios: dict[str, deque[float]] = {}
        self._since_verdict = 0
        self._last_step: int | None = None

    def medians(self) -> dict[str, float]:
        """Each tensor's median ratio over the window (finite ratios only; NaN if none)."""
        out = {}
        for n, q in self._ratios.items():
            v = [x for x in q if math.isfinite(x)]
            out[n] = float(np.median(v)) if v else math.nan
        return out

    def compute(self, record) -> dict[Any, Any]:
        before = record.get(PARAM_NORMS)
        if record.update is None or before is None:
            return {}
        after = record.update_norms
        ratios = update_ratios(after, before)
        undefined = sorted(n for n, v in ratios.items() if not math.isfinite(v))
        if undefined:
            self.note(f"||theta|| = 0 before the step for {undefined}: no ratio, left out of the distribution")
        out: dict[Any, Any] = {}
        total_p = math.sqrt(sum(before[n] ** 2 for n in ratios))
        total_d = math.sqrt(sum(after[n] ** 2 for n in ratios))
        out[self.tag("update_ratio/global")] = total_d / total_p if total_p > 0 else math.nan
        values = np.array([v for v in ratios.values() if math.isfinite(v)], dtype=np.float64)
        out.update(quantile_records(self.tag("update_ratio"), values))
        positive = values[values > 0]
        if positive.size:
            logs = np.log10(positive)
            out[self.tag("update_ratio/log10")] = logs
            out[self.tag("update_ratio/far_off")] = float(np.sum(np.abs(logs - np.median(logs)) > math.log10(self.far)))
        if self.per_param:
            out.update({self.tag(f"update_ratio/param/{n}"): v for n, v in ratios.items()})
        for n, v in ratios.items():
            self._ratios.setdefault(n, deque(maxlen=self.window)).append(v)
        self._last_step = record.step
        self._since_verdict += 1
        if self._since_verdict >= self.verdict_every:
            self._since_verdict = 0
            out[self.tag("verdict/update_ratio")] = self._verdict()[1]
        return out

    def _verdict(self) -> tuple[str, str, dict[str, float]]:
        return ratio_verdict(self.medians(), far=self.far)

    def verdict(self) -> str:
        """The level: "high", "near", "low" or "undecided"."""
        return self._verdict()[0]

    def far_off(self) -> dict[str, float]:
        """{name: median ratio} of the tensors far off the typical tensor."""
        return self._verdict()[2]

    def verdicts(self) -> list[str]:
        """E.g. "update ratio: the typical tensor moves 0.0012 of its norm per step (near the 0.001 rule of
        thumb); far above the rest (more than 10x the typical ratio): head.weight (0.031)"."""
        if self._last_step is None:
            return []
        return [f"update ratio: {self._verdict()[1]}"]

    def on_close(self) -> dict[Any, Any]:
        if self._last_step is None:
            return {}
        return {(self._last_step, self.tag("verdict/update_ratio")): self._verdict()[1]}

    # --- state (resuming a run) ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``ratios`` ({name: the window's ratios, oldest first}), ``since_verdict``, ``last_step``."""
        return {
            "ratios": {n: [float(v) for v in q] for n, q in self._ratios.items()},
            "since_verdict": int(self._since_verdict),
            "last_step": self._last_step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; with another ``window`` the most recent ratios that fit are kept."""
        self._ratios = {str(n): deque((float(v) for v in q), maxlen=self.window) for n, q in state["ratios"].items()}
        self._since_verdict = int(state["since_verdict"])
        self._last_step = None if state["last_step"] is None else int(state["last_step"])
