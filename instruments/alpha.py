"""Alpha: where each step lands on a noise-aware 1-D quadratic fit along the step, for any optimizer,
and a learning-rate verdict from its distribution.

Definition (Cockpit 1.0.2, Schneider, Dangel & Hennig 2021; REFERENCE.md section 3): for the step taken at
step t, with the actual update d = theta_{t+1} - theta_t and step length s = ||d||,

- start point (theta_t, batch t) and end point (theta_{t+1}, batch t+1), the end point being the next
  step's own forward/backward (no extra pass);
- at each point: f = mean_i l_i, var_f = unbiased variance of the l_i, df = mean_i (g_i . d) / s and
  var_df = unbiased variance over i of (g_i . d) / s;
- the weighted least-squares quadratic f(x) = m0 + m1 x + m2 x^2 through y = [f_0, f_s, df_0, df_s] at
  x = [0, s], Phi rows [1,0,0], [1,s,s^2], [0,1,0], [0,1,2s], Lambda = diag(var_f_0, var_f_s, var_df_0,
  var_df_s) (zeros replaced by 1e-10), m = (Phi^T Lambda^-1 Phi)^-1 Phi^T Lambda^-1 y;
- alpha = 2 s / abar - 1 with abar = -m1 / m2, i.e. s / x* - 1 with x* the fitted minimiser.

Reading: -1 did not move, 0 landed on the valley floor, 1 landed on the opposite flank at the starting
height, > 1 overshot uphill, < -1 moved uphill.

The per-sample projections g_i . d come from the per-sample engine's layer factors, kept until the
optimizer's post-hook, because d is known only after the step: both the start projections (onto d_t) and
the end projections of the previous step (onto d_{t-1}) are taken from the same factors of step t in one
pass. Alpha itself keeps O(D + B): the previous update and a few scalars; never a per-sample gradient.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from cockpit_lite.instruments._util import refuse_state
from cockpit_lite.instruments.panels import AlphaPanel

from cockpit_lite import Instrument, Need, Needs, StepRecord, distributed
from cockpit_lite.compat import foreach_copy_

#: Cockpit's replacement for a zero variance in the fit.
EPS_VAR = 1e-10

#: status of a step whose alpha is NaN (recorded as text under ``alpha/status``)
CONCAVE = "concave"  # m2 <= 0: the fit has no minimum (Cockpit reports -1)
SINGULAR = "singular"  # Phi^T Lambda^-1 Phi could not be inverted (Cockpit reports None)
ZERO_STEP = "zero_step"  # s = 0: the parameters did not move (Cockpit reports -1)
NO_END_POINT = "no_end_point"  # the run ended (cockpit closed) before the step's end point was seen
MISSING_DATA = "missing_data"  # per-sample losses or projections were not available at a point
BATCH_TOO_SMALL = "batch_too_small"  # B < 2: the variances are undefined
NONFINITE = "nonfinite"  # a non-finite loss, gradient projection or update
PERTURBED = "perturbed"  # the loss and gradients were taken off the update's line (SAM's perturbed point)


@dataclass
class AlphaFit:
    """Result of :func:`fit_alpha`: ``alpha`` (NaN unless ``status == "ok"``), the status, the fitted
    coefficients ``m = (m0, m1, m2)`` in the original coordinate x (None if no fit) and ``s``."""

    alpha: float
    status: str
    m: tuple[float, float, float] | None
    s: float


def fit_alpha(
    s: float,
    f: tuple[float, float],
    var_f: tuple[float, float],
    df: tuple[float, float],
    var_df: tuple[float, float],
) -> AlphaFit:
    """Cockpit's alpha from the observations at the start (x = 0) and end (x = s) of a step.

    Solves the weighted least-squares normal equations m = (Phi^T Lambda^-1 Phi)^-1 Phi^T Lambda^-1 y
    (see the module docstring). The system is solved in the step-normalised coordinate u = x / s (the
    same objective: derivative observations and their standard deviations scale by s), which keeps it
    well conditioned for tiny steps; alpha = 2 / ubar - 1 with ubar = -m1' / m2' equals 2 s / abar - 1.
    Zero variances are replaced by 1e-10 in the original coordinate, as Cockpit does.
    """
    vals = [s, *f, *var_f, *df, *var_df]
    if not all(math.isfinite(v) for v in vals):
        return AlphaFit(math.nan, NONFINITE, None, s)
    if s == 0.0:
        return AlphaFit(math.nan, ZERO_STEP, None, s)
    var_f_ = [v if v != 0.0 else EPS_VAR for v in var_f]
    var_df_ = [v if v != 0.0 else EPS_VAR for v in var_df]
    phi = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    y = np.array([f[0], f[1], s * df[0], s * df[1]], dtype=np.float64)
    lam_inv = 1.0 / np.array([var_f_[0], var_f_[1], s * s * var_df_[0], s * s * var_df_[1]], dtype=np.float64)
    a = phi.T @ (lam_inv[:, None] * phi)
    b = phi.T @ (lam_inv * y)
    try:
        with np.errstate(all="ignore"):
            mu = np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return AlphaFit(math.nan, SINGULAR, None, s)
    if not np.all(np.isfinite(mu)) or not np.all(np.isfinite(a)):
        return AlphaFit(math.nan, SINGULAR, None, s)
    m = (float(mu[0]), float(mu[1]) / s, float(mu[2]) / (s * s))
    if mu[2] <= 0.0:
        return AlphaFit(math.nan, CONCAVE, m, s)
    ubar = -mu[1] / mu[2]
    with np.errstate(all="ignore"):
        alpha = float(2.0 / ubar - 1.0)
    if not math.isfinite(alpha):  # m1 = 0 with m2 > 0: the minimum is at the start, s / 0
        return AlphaFit(math.nan, SINGULAR, m, s)
    return AlphaFit(alpha, "ok", m, s)


def point_statistics(per_sample_loss: np.ndarray, projections: np.ndarray, s: float) -> dict[str, float]:
    """f, var_f, df, var_df at one point: mean and unbiased variance of l_i and of (g_i . d) / s."""
    losses = np.asarray(per_sample_loss, dtype=np.float64)
    proj = np.asarray(projections, dtype=np.float64) / s
    return {
        "f": float(losses.mean()),
        "var_f": float(losses.var(ddof=1)),
        "df": float(proj.mean()),
        "var_df": float(proj.var(ddof=1)),
    }


# --- the learning-rate verdict ---------------------------------------------------------------------------
#: median alpha below this: the learning rate is likely too small
TOO_SMALL_MEDIAN = -0.3
#: median alpha above this, or a share of steps with alpha > 1 above OVERSHOOT_SHARE: likely too large
TOO_LARGE_MEDIAN = 0.4
OVERSHOOT_SHARE = 0.3


def lr_verdict(alphas: np.ndarray, window: int | None = None) -> tuple[str, str]:
    """(label, sentence) for a window of finite alphas; label in {"too small", "about right", "too large",
    "undecided"}.

    Rules (docs/alpha.md, where the thresholds are calibrated): median alpha < -0.3 -> too small (steps stop
    well short of the fitted valley floor); median > 0.4 or more than 30% of the steps with alpha > 1 ->
    too large (steps overshoot the valley floor); otherwise about right (Cockpit's best runs had a median
    slightly above 0).
    """
    a = np.asarray(alphas, dtype=np.float64)
    n = len(a)
    over = f"over the last {n} tracked steps" if window is None or n >= window else f"over {n} tracked steps"
    if n == 0:
        return "undecided", "no alpha yet: the learning-rate verdict needs tracked steps with a defined alpha"
    med = float(np.median(a))
    share = float(np.mean(a > 1.0))
    stats = f"median alpha {med:.2f} {over}, {100 * share:.0f}% of steps overshoot (alpha > 1)"
    if med > TOO_LARGE_MEDIAN or share > OVERSHOOT_SHARE:
        return "too large", (
            f"{stats}: steps overshoot the valley floor, the learning rate is likely too large (try about 2-3x smaller)"
        )
    if med < TOO_SMALL_MEDIAN:
        return "too small", (
            f"{stats}: steps stop well short of the valley floor, the learning rate is likely too small "
            "(try about 2-3x larger)"
        )
    return "about right", f"{stats}: steps land near the valley floor, the learning rate looks about right"


@dataclass
class _Start:
    step: int
    s: float
    update: dict[str, torch.Tensor]
    stats: dict[str, float]


class Alpha(Instrument):
    """The effective relative step size alpha of every tracked step, for any optimizer, and a
    learning-rate verdict over a rolling window.

    Args:
        window: number of most recent finite alphas the verdict looks at.
        verdict_every: write the verdict (``verdict/lr``) every this many alphas; also when closing.
        min_alphas: fewest finite alphas in the window before a verdict other than "undecided" is made.
        every, schedule, name: see :class:`~cockpit_lite.Instrument` (the step after a tracked step is
            used for its end point).

    Tags (stored under the step t whose update is measured, written when step t+1 completes):
    ``alpha`` (NaN when undefined), ``alpha/status`` (text, only where alpha is NaN: ``concave``,
    ``singular``, ``zero_step``, ``no_end_point``, ``missing_data``, ``batch_too_small``, ``nonfinite``),
    ``alpha/step_length`` (s); with each verdict ``verdict/lr`` (text), ``alpha/median`` and
    ``alpha/overshoot_share`` over the window.

    Cost: per-sample losses, one parameter snapshot (the update), projections of the per-sample gradients
    onto two directions from the layer factors kept until the optimizer's post-hook, and the previous
    update (D floats) held between steps.
    """

    TAGS = {
        "alpha": "alpha of the step theta_t -> theta_{t+1}; NaN when undefined",
        "alpha/status": "why alpha is NaN (text)",
        "alpha/step_length": "s = ||theta_{t+1} - theta_t||",
        "alpha/median": "median alpha over the verdict window",
        "alpha/overshoot_share": "share of alpha > 1 over the verdict window",
        "verdict/lr": "the learning-rate verdict (text)",
    }
    PANELS = (AlphaPanel(),)
    CHARTS = {"Step size": {"alpha (0 = valley floor, >1 = overshoot)": ["Multiline", ["^alpha$"]]}}
    SUMMARY = (("alpha", "alpha (0 = valley floor)"),)
    ORDER = 40.0
    READS_VALUES_IN_HOOKS = False  # (its hook copies record.update, a tensor field filled at once)

    def __init__(self, window: int = 100, verdict_every: int = 100, min_alphas: int = 10, **kw):
        super().__init__(**kw)
        if window < 1 or verdict_every < 1 or min_alphas < 1:
            raise ValueError("Alpha: window, verdict_every and min_alphas must be positive integers")
        self.window = window
        self.verdict_every = verdict_every
        self.min_alphas = min_alphas
        self._pending: _Start | None = None
        self._alphas: deque[float] = deque(maxlen=window)
        self._since_verdict = 0
        self.counts: dict[str, int] = {}
        self._last_step = 0
        self._update_copy: dict[str, torch.Tensor] | None = None
        #: (step t, our copy of its update d_t): the end point's direction, projected at step t + 1
        self._kept: tuple[int, dict[str, torch.Tensor]] | None = None
        self._params: dict[str, torch.Tensor] | None = None  # the model's, to place a loaded update
        self._start_fn = lambda rec: rec.update
        self._end_fn = lambda rec: self._kept[1] if self._kept is not None and self._kept[0] == rec.step - 1 else None

    def _keep(self, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copy d_t into a buffer of our own (allocated once): it is the direction of the end point,
        projected at the next step, after the core has reused its update buffers."""
        if self._update_copy is None or self._update_copy.keys() != update.keys():
            self._update_copy = {n: torch.empty_like(t) for n, t in update.items()}
        local = distributed.local  # FSDP2: DTensors, copied shard by shard (to_local shares the storage)
        foreach_copy_([local(t) for t in self._update_copy.values()], [local(t) for t in update.values()])
        return self._update_copy

    def on_attach(self, model, optimizer) -> None:
        self._params = dict(model.named_parameters())
        if self._pending is not None:  # a state loaded before attaching
            self._pending.update = self._update_copy = self._placed(self._pending.update)
            self._kept = (self._pending.step, self._pending.update)

    # --- state (resuming a run) ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``pending``: the start point awaiting its end point (None if none): its step, step length
        s, point statistics and the update d_t (a copy, D floats, on the parameters' device);
        ``alphas``: the window of finite alphas, oldest first; ``since_verdict``, ``counts`` (steps by
        status) and ``last_step``."""
        pending = None
        if self._pending is not None:
            p = self._pending
            update = {n: t.detach().clone() for n, t in p.update.items()}
            pending = {"step": p.step, "s": p.s, "stats": dict(p.stats), "update": update}
        return {
            "pending": pending,
            "alphas": list(self._alphas),
            "since_verdict": self._since_verdict,
            "counts": dict(self.counts),
            "last_step": self._last_step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. With another ``window`` the most recent alphas that fit are
        kept; the pending update is moved to the parameters' device and dtype."""
        pending = state["pending"]
        start = None
        if pending is not None:
            update = {str(n): t.detach().clone() for n, t in pending["update"].items()}
            stats = {str(k): float(v) for k, v in pending["stats"].items()}
            start = _Start(int(pending["step"]), float(pending["s"]), self._placed(update), stats)
        self._pending = start
        self._update_copy = start.update if start is not None else None
        self._kept = (start.step, start.update) if start is not None else None
        self._alphas = deque((float(a) for a in state["alphas"]), maxlen=self.window)
        self._since_verdict = int(state["since_verdict"])
        self.counts = {str(k): int(v) for k, v in state["counts"].items()}
        self._last_step = int(state["last_step"])

    def _placed(self, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A loaded update on its parameters' device and dtype; refused if it does not fit the model."""
        if self._params is None:  # not attached yet: on_attach places it
            return update
        bad = sorted(n for n, t in update.items() if n not in self._params or self._params[n].shape != t.shape)
        if bad:
            raise refuse_state(
                "Alpha",
                f"the saved update has parameters {bad} that this model does not have (or of another shape)",
                "Load the state saved from this model, or leave 'alpha' out of the state to start Alpha afresh "
                "(the alpha of the step before the checkpoint is then not recorded).",
            )
        return {n: t.to(device=self._params[n].device, dtype=self._params[n].dtype) for n, t in update.items()}

    @property
    def _start_key(self) -> str:
        return f"{self.key}/start"

    @property
    def _end_key(self) -> str:
        return f"{self.key}/end"

    def _expects_end(self, step: int) -> bool:
        return self._pending is not None and self._pending.step == step - 1

    def _wants_end(self, step: int) -> bool:
        """Whether ``step`` projects onto d_{step-1}: whenever it was kept, as compute of step - 1, which
        says whether a start point awaits this end, may not have run yet (``overlap=True``). (So the
        projections of a step are the same with and without overlap: one more direction can move the
        last bits of the others, and a step after one without a start point projects onto both.)"""
        return self._kept is not None and self._kept[0] == step - 1

    def requires(self, step: int) -> Needs:
        needs = Needs()
        if self.scheduled(step):
            needs.flags |= {Need.PER_SAMPLE_LOSS, Need.UPDATE}
            needs.directions[self._start_key] = self._start_fn
        if self._wants_end(step):
            needs.flags.add(Need.PER_SAMPLE_LOSS)
            needs.directions[self._end_key] = self._end_fn
            needs.early.add(self._end_key)  # d_{t-1}: known, and left as it is, until this step's on_after_step
        return needs

    # --- records ---------------------------------------------------------------------------------------
    def _result(self, step: int, alpha: float, status: str, s: float | None) -> dict[Any, Any]:
        self.counts[status] = self.counts.get(status, 0) + 1
        self._last_step = max(self._last_step, step)
        out: dict[Any, Any] = {(step, self.tag("alpha")): alpha}
        if status != "ok":
            out[(step, self.tag("alpha/status"))] = status
        if s is not None:
            out[(step, self.tag("alpha/step_length"))] = s
        if math.isfinite(alpha):
            self._alphas.append(alpha)
            self._since_verdict += 1
            if self._since_verdict >= self.verdict_every:
                out.update(self._verdict_records(step))
        return out

    def _verdict_records(self, step: int) -> dict[Any, Any]:
        self._since_verdict = 0
        a = np.asarray(self._alphas)
        out: dict[Any, Any] = {(step, self.tag("verdict/lr")): self._verdict()[1]}
        if len(a):
            out[(step, self.tag("alpha/median"))] = float(np.median(a))
            out[(step, self.tag("alpha/overshoot_share"))] = float(np.mean(a > 1.0))
        return out

    def _verdict(self) -> tuple[str, str]:
        a = np.asarray(self._alphas)
        if len(a) < self.min_alphas:
            undefined = sum(v for k, v in self.counts.items() if k != "ok")
            return "undecided", (
                f"only {len(a)} tracked steps with a defined alpha ({undefined} undefined): too few for a "
                f"learning-rate verdict (needs {self.min_alphas})"
            )
        return lr_verdict(a, self.window)

    @staticmethod
    def _point(rec, key: str, s: float) -> dict[str, float] | str:
        """The point statistics, or the status explaining why they are missing."""
        if rec.perturbed:  # (SAM: the step's loss and gradients at theta_t + e, its update from theta_t)
            return PERTURBED
        proj = rec.projections.get(key)
        if rec.per_sample_loss is None or proj is None or len(proj) != len(rec.per_sample_loss):
            return MISSING_DATA
        if len(proj) < 2:
            return BATCH_TOO_SMALL
        with np.errstate(all="ignore"):
            stats = point_statistics(rec.per_sample_loss, proj, s)
        if not all(math.isfinite(v) for v in stats.values()):
            return NONFINITE
        return stats

    def _finish(self, start: _Start, end: dict[str, float] | str) -> dict[Any, Any]:
        if isinstance(end, str):
            return self._result(start.step, math.nan, end, start.s)
        st = start.stats
        fit = fit_alpha(
            start.s,
            (st["f"], end["f"]),
            (st["var_f"], end["var_f"]),
            (st["df"], end["df"]),
            (st["var_df"], end["var_df"]),
        )
        return self._result(start.step, fit.alpha, fit.status, start.s)

    @torch.no_grad()
    def on_after_step(self, record) -> None:
        """Keep d_t (our copy): the next step projects onto it, possibly before :meth:`compute` of this
        step has run (``Cockpit(..., overlap=True)``)."""
        if self.scheduled(record.step) and record.update is not None:
            self._kept = (record.step, self._keep(record.update))

    @torch.no_grad()
    def compute(self, record) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        step = record.step
        # end point of the previous step: (theta_t, batch t) projected onto d_{t-1}
        if self._expects_end(step):
            start, self._pending = self._pending, None
            out.update(self._finish(start, self._point(record, self._end_key, start.s)))
        elif self._pending is not None:  # the step after it was not seen (e.g. an optimizer.step(closure))
            start, self._pending = self._pending, None
            out.update(self._result(start.step, math.nan, MISSING_DATA, start.s))
        # start point of this step: (theta_t, batch t) projected onto d_t
        if not self.scheduled(step):
            return out
        if record.update is None:
            out.update(self._result(step, math.nan, MISSING_DATA, None))
            return out
        kept = self._kept
        # (our copy from on_after_step; the core reuses its buffers at the next step)
        update = kept[1] if kept is not None and kept[0] == step else self._keep(record.update)
        s = StepRecord.global_norm(record.update_norms) or 0.0
        if not math.isfinite(s):
            out.update(self._result(step, math.nan, NONFINITE, s))
        elif s == 0.0:
            out.update(self._result(step, math.nan, ZERO_STEP, s))
        else:
            stats = self._point(record, self._start_key, s)
            if isinstance(stats, str):
                out.update(self._result(step, math.nan, stats, s))
            else:
                self._pending = _Start(step, s, update, stats)
        return out

    def on_close(self) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        if self._pending is not None:
            start, self._pending = self._pending, None
            out.update(self._result(start.step, math.nan, NO_END_POINT, start.s))
            last = start.step
        else:
            last = self._last_step
        if self.counts:
            out.update(self._verdict_records(last))
        return out

    def verdicts(self) -> list[str]:
        """The learning-rate verdict over the window, e.g. "median alpha 0.90 over the last 100 tracked
        steps, ...: steps overshoot the valley floor, the learning rate is likely too large ..."."""
        if not self.counts:
            return []
        return [f"learning rate: {self._verdict()[1]}"]

    def verdict(self) -> str:
        """The verdict's label: "too small", "about right", "too large" or "undecided"."""
        return self._verdict()[0]
