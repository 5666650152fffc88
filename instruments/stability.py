"""StabilityMonitor: loss spikes by a documented rule, and at the spike step the examples, layers and
optimizer state behind it; a precursor score from gradient norms and update ratios.

Detection rules (``rule=``; docs/instruments/stability.md):

- ``"olmo"`` (default; OLMo-core's stability monitor): with mu and sigma the mean and the population
  standard deviation (ddof = 0) of the previous ``window`` = 128 tracked losses, step t is a spike when
  L_t > mu + k sigma, k = ``sigmas`` = 6. Warm-up: no check before the window holds ``warmup`` losses
  (default: the whole window, as OLMo-core), nor while sigma < 1e-10. Spike losses enter the window
  (as in OLMo-core); ``loss_z`` = (L_t - mu) / sigma.
- ``"megatron"`` (Megatron-LM's rerun state machine, ``is_unexpectedly_large``): the largest |L| of the
  first ``megatron_samples`` = 100 tracked losses is the reference M; afterwards a step with
  |L_t| >= ``factor`` M (factor 10) is a spike. Warm-up: those first 100 losses.
- ``"either"``: a spike by either rule.

A non-finite loss is always a spike (it enters no window).

Attribution, written at a spike step (records keyed by that step):

- examples: the ``top_k`` examples of the batch with the largest per-sample loss l_i and those with
  the largest per-sample gradient norm ||g_i||, by dataset index when the loop iterates
  ``cockpit.track(loader)``, else by position in the batch; with the share of the batch they carry,
  sum_top l_i / sum_i l_i and sum_top ||g_i||^2 / sum_i ||g_i||^2;
- layers (parameter tensors): jump_p = x_p(t) / median(x_p(t-H..t-1)) for the gradient norm
  ||grad_p|| and the update norm ||Delta theta_p||, over the previous ``history`` = 32 tracked steps;
- Adam-family optimizers (a state ``exp_avg_sq``, or ``max_exp_avg_sq`` with amsgrad, and ``eps`` and
  ``betas`` in the parameter group): per tensor the share of entries with sqrt(v_hat) < eps, v_hat =
  v / (1 - beta2^s), s the tensor's step count: there the denominator sqrt(v_hat) + eps is dominated
  by eps (the update is limited by eps, about lr m_hat / eps); elsewhere by the second moment.

Precursor score (every tracked step, after ``score_warmup`` steps): with G_t = ||grad L|| (global, as
the optimizer receives it) and U_t = max_p ||Delta theta_p|| / ||theta_p||, and for a series x the
robust z-score against its previous ``score_window`` = 32 values in log space,

    z(x_t) = (ln x_t - median(ln x)) / max(1.4826 MAD(ln x), 0.05),

score_t = max(z(G_t), z(U_t)). The floor 0.05 (a 5% change) keeps a nearly constant series from
turning round-off into large scores. A score above ``score_threshold`` = 3 is an early warning: the
step changed the parameters or saw a gradient far outside its recent range.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from cockpit_lite.instruments._util import refuse_state
from cockpit_lite.instruments.update_ratio import update_ratios

from cockpit_lite import Instrument, Need, Needs, distributed
from cockpit_lite.panels import COLORS, LinePanel, Panel, latest, note_box, series
from cockpit_lite.providers.param_norms import PARAM_NORMS

RULES = ("olmo", "megatron", "either")
#: OLMo-core: no check while sigma is below this
MIN_SIGMA = 1e-10
#: the robust z-score's floor on 1.4826 MAD in log space (a 5% change)
MIN_LOG_SPREAD = 0.05
#: 1 / Phi^-1(3/4): MAD times this estimates sigma for normal data
MAD_SCALE = 1.4826
#: a layer "jumped" when its norm is at least this many times its recent median
JUMP = 2.0


def robust_z(history: Sequence[float], x: float, floor: float = MIN_LOG_SPREAD) -> float:
    """(ln x - median(ln h)) / max(1.4826 MAD(ln h), floor) over the positive finite values h of
    ``history``; NaN when x is not positive and finite or the history is empty."""
    h = np.asarray([v for v in history if v > 0 and math.isfinite(v)], dtype=np.float64)
    if not h.size or not (x > 0 and math.isfinite(x)):
        return math.nan
    logs = np.log(h)
    med = float(np.median(logs))
    spread = max(MAD_SCALE * float(np.median(np.abs(logs - med))), floor)
    return (math.log(x) - med) / spread


def olmo_check(window: Sequence[float], loss: float, sigmas: float) -> tuple[bool, float, float, float]:
    """(spike, loss_z, mu, threshold) of OLMo-core's rule for ``loss`` against ``window`` (the previous
    losses): mu and sigma (ddof = 0) of the window, spike when loss > mu + sigmas sigma and sigma >= 1e-10."""
    w = np.asarray(window, dtype=np.float64)
    mu = float(w.mean())
    sigma = float(w.std())
    if sigma < MIN_SIGMA:
        return False, math.nan, mu, math.nan
    threshold = mu + sigmas * sigma
    return bool(loss > threshold), (loss - mu) / sigma, mu, threshold


def adam_eps_shares(
    optimizer: torch.optim.Optimizer, params: Mapping[str, torch.Tensor]
) -> dict[str, tuple[float, float, int]] | None:
    """{name: (share of entries with sqrt(v_hat) < eps, median sqrt(v_hat), entries)} for the
    parameters whose optimizer state has a second moment (``exp_avg_sq``; ``max_exp_avg_sq`` when the
    group uses amsgrad), v_hat = v / (1 - beta2^step); None when no parameter has one."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out: dict[str, tuple[float, float, int]] = {}
    for name, p in params.items():
        state = optimizer.state.get(p)
        group = group_of.get(id(p))
        if not state or group is None or "eps" not in group or "betas" not in group:
            continue
        v = state.get("max_exp_avg_sq") if group.get("amsgrad") else None
        v = state.get("exp_avg_sq") if v is None else v
        if v is None or "step" not in state:
            continue
        step = float(state["step"])
        beta2 = float(group["betas"][1])
        correction = 1.0 - beta2**step if step > 0 else 1.0
        with torch.no_grad():  # FSDP2: the local shard's entries (no collective)
            root = (distributed.local(v).detach().double() / correction).sqrt()
            if not root.numel():
                continue
            share = float((root < group["eps"]).double().mean())
            med = float(root.flatten().median())
        out[name] = (share, med, root.numel())
    return out or None


class StabilityPanel(Panel):
    """The loss, the OLMo threshold (mu + 6 sigma of the window), and the spike steps with the latest
    spike's attribution in a box."""

    title = "Stability: loss spikes"
    ylabel = "loss"
    missing = "not tracked: add the StabilityMonitor instrument (tags `stability/...`)"
    key = "stability"

    def setup(self, ax) -> None:
        self._marks: list = []
        self._box = note_box(ax, fontsize=7)

    def update(self, h: Any) -> None:
        xs, spikes = self.series(h, "stability/spike")
        if not self.shows(len(xs)):
            return
        loss = series(h, self.tag("loss")) if self.prefix else series(h, "loss")
        arrays = []
        if len(loss[0]):
            self.line("loss", *loss, color=COLORS["main"], label="batch loss")
            arrays.append(loss[1])
        tx, thr = self.series(h, "stability/threshold")
        self.line("threshold", tx, thr, color=COLORS["ref"], linestyle="--", linewidth=1.0, label="spike threshold")
        self.clear_patches("_marks")
        at = xs[spikes > 0.5]
        for s in at[-20:]:
            self._marks.append(self.ax.axvline(s, color=COLORS["alert"], alpha=0.6, linewidth=1.2))
        if len(at):
            self._labelled["spike"] = self._marks[-1]
        text = self._short(h, len(at))
        if text is not None:
            self._box.set_text(text)
        self._box.set_visible(text is not None)
        fin = np.concatenate([a[np.isfinite(a)] for a in arrays]) if arrays else np.empty(0)
        if fin.size and fin.min() > 0 and fin.max() / fin.min() > 30:
            self.ax.set_yscale("log")
        self.rescale()
        self.legend(loc="lower left")

    def _short(self, h: Any, count: int) -> str | None:
        """A few lines on the latest spike: the top examples by loss and the layers that jumped most."""
        found = self.latest(h, "stability/attribution")
        if found is None:
            return None
        lines = [f"{count} spike(s); latest at step {found[0]}"]
        table = self.latest(h, "stability/examples/by_loss")
        if table is not None and table[0] == found[0] and isinstance(table[1], dict):
            col = "index" if "index" in table[1] else "position"
            ids = [str(int(v)) for v in np.atleast_1d(table[1][col])[:4]]
            lines.append(f"top losses: {'examples' if col == 'index' else 'positions'} {', '.join(ids)}")
        layers = self.latest(h, "stability/layers")
        if layers is not None and layers[0] == found[0] and isinstance(layers[1], dict):
            names = short_names([str(n) for n in np.atleast_1d(layers[1]["layer"])])
            jumps = np.atleast_1d(np.asarray(layers[1]["grad_jump"], dtype=float))
            lines += [f"{n}: grad norm {j:.3g}x" for n, j in zip(names[:2], jumps[:2], strict=False)]
        return "\n".join(lines)


def short_names(names: Sequence[str]) -> list[str]:
    """The names without the dotted prefix they all share (``net.transformer.h.0.ln_1.weight`` ->
    ``h.0.ln_1.weight``)."""
    parts = [n.split(".") for n in names]
    k = 0
    while parts and all(len(p) > k + 1 and p[k] == parts[0][k] for p in parts):
        k += 1
    return [".".join(p[k:]) for p in parts]


class LayerJumpPanel(Panel):
    """At the latest spike: the parameter tensors whose gradient norm jumped most against their
    recent median (bars), with their update-norm jumps."""

    title = "Spike attribution: layers (latest spike)"
    xlabel = "jump against the median of the previous steps (x)"
    ylabel = ""
    missing = "not tracked: add the StabilityMonitor instrument (tags `stability/...`)"
    key = "stability_layers"
    TOP = 8

    def setup(self, ax) -> None:
        self._bars: list = []

    def update(self, h: Any) -> None:
        self.clear_patches("_bars")
        found = self.latest(h, "stability/layers")
        if found is None or not isinstance(found[1], dict):
            seen = self.latest(h, "stability/spike") is not None
            self.note("no loss spike yet" if seen else self.missing_text())
            return
        step, table = found
        names = [str(n) for n in np.atleast_1d(table.get("layer", []))][: self.TOP]
        grad = np.atleast_1d(np.asarray(table.get("grad_jump", []), dtype=float))[: self.TOP]
        upd = np.atleast_1d(np.asarray(table.get("update_jump", []), dtype=float))[: self.TOP]
        if not names:
            self.note("the spike's layer table is empty")
            return
        self.note(None)
        y = np.arange(len(names))[::-1]
        self._bars = [
            self.ax.barh(y + 0.2, grad, height=0.4, color=COLORS["alert"], alpha=0.8, label="gradient norm"),
        ]
        if len(upd) == len(names):
            self._bars.append(
                self.ax.barh(y - 0.2, upd, height=0.4, color=COLORS["second"], alpha=0.8, label="update norm")
            )
        shown = short_names(names)
        self.ax.set_yticks(y, [n if len(n) <= 28 else "…" + n[-27:] for n in shown], fontsize=6.5)
        vals = np.concatenate([grad, upd]) if len(upd) == len(names) else grad
        fin = vals[np.isfinite(vals) & (vals > 0)]
        if fin.size and fin.max() / fin.min() > 30:
            self.ax.set_xscale("log")
        self.ax.set_title(f"{self.display_title.split(' (')[0]}, step {step}", fontsize=10.5, loc="left")
        self.ax.relim()
        self.ax.autoscale_view()
        self._legend_keys = ()
        self.legend(loc="lower right")


def stability_summary(h: Any, tag: Any) -> list[str]:
    """``cockpit-lite summary`` lines: the spike count and steps, and the latest attribution."""
    xs, spikes = series(h, tag("stability/spike"), None)
    if not len(xs):
        return []
    at = [int(s) for s in xs[spikes > 0.5]]
    if not at:
        return [f"loss spikes: none in {len(xs)} tracked steps"]
    shown = ", ".join(map(str, at[:10])) + (", ..." if len(at) > 10 else "")
    out = [f"loss spikes: {len(at)} (steps {shown})"]
    text = latest(h, tag("stability/attribution"))
    if text is not None:
        out.append(f"  latest (step {text[0]}): {text[1]}")
    return out


class StabilityMonitor(Instrument):
    """Loss spikes (OLMo-core's rule by default), what caused them, and a precursor score.

    Args:
        rule: ``"olmo"`` (L > mean + ``sigmas`` std of the previous ``window`` losses), ``"megatron"``
            (|L| >= ``factor`` x the largest of the first ``megatron_samples`` losses) or ``"either"``.
        window, sigmas, warmup: OLMo-core's rule; no check before the window holds ``warmup`` losses
            (default: ``window``).
        factor, megatron_samples: Megatron-LM's rule.
        per_sample: ask for per-sample gradient norms at every tracked step (the per-sample engine: about
            one extra weight-gradient product per layer), needed to rank examples by ||g_i||; with False
            examples are ranked by their loss only.
        top_k: examples and layers in the attribution tables.
        history: previous tracked steps the layer jumps are measured against (their median).
        score_window, score_warmup, score_threshold: the precursor score (module docstring).
        standout: the verdict names the examples whose loss (gradient norm) exceeds this many times the
            batch median (the tables always hold the ``top_k``).
        every, schedule, name: see :class:`~cockpit_lite.Instrument` (windows hold tracked steps only).

    Tags, every tracked step: ``stability/spike`` (0 or 1), ``stability/loss_z`` ((L - mu) / sigma,
    NaN in the warm-up), ``stability/threshold`` (mu + k sigma), ``stability/score`` and its parts
    ``stability/grad_norm_z``, ``stability/update_ratio_z``, ``stability/max_update_ratio``. At a spike
    step: ``stability/attribution`` (text), the tables ``stability/examples/by_loss``,
    ``stability/examples/by_grad_norm``, ``stability/layers`` and, for Adam-family optimizers,
    ``stability/adam``; ``verdict/stability`` (text) at a spike and at close.

    Dataset indices: asked for at the first tracked step; when the loop does not iterate
    ``cockpit.track(loader)`` (a note says so once) examples are named by their position in the batch.

    Cost per tracked step: per-sample losses (one extra loss evaluation), per-sample squared gradient
    norms (with ``per_sample=True``), gradient, parameter and update norms per tensor (a parameter
    snapshot, D floats); a few hundred floats of windows. At a spike, one pass over the Adam state.
    """

    KEY = "stability"
    TAGS = {
        "stability/spike": "1 at a loss spike, else 0",
        "stability/loss_z": "(L - mu) / sigma over the previous window of losses",
        "stability/threshold": "mu + k sigma: a loss above it is a spike (OLMo-core's rule)",
        "stability/score": "precursor score: max of the robust z-scores of the gradient norm and the update ratio",
        "stability/grad_norm_z": "robust z-score of ln ||grad L|| against its recent median",
        "stability/update_ratio_z": "robust z-score of ln max_p ||Delta theta_p|| / ||theta_p||",
        "stability/max_update_ratio": "max_p ||Delta theta_p|| / ||theta_p||",
        "stability/attribution": "at a spike: the examples, layers and optimizer state behind it (text)",
        "stability/examples/by_(loss|grad_norm)": "at a spike: the top examples by l_i or ||g_i|| (table)",
        "stability/layers": "at a spike: the tensors whose gradient / update norm jumped most (table)",
        "stability/adam": "at a spike: per tensor, the share of entries with sqrt(v_hat) < eps (table)",
        "verdict/stability": "the stability verdict (text)",
    }
    PANELS = (
        StabilityPanel(),
        LinePanel(
            "Stability: precursor score",
            ["stability/score", "stability/loss_z"],
            ylabel="z",
            labels=["precursor score (grad norm / update ratio)", "loss z (mean, sigma of the window)"],
            log=False,
            ref=(3.0, "score threshold 3"),
            missing="not tracked: add the StabilityMonitor instrument (tags `stability/...`)",
            key="stability_score",
        ),
        LayerJumpPanel(),
    )
    CHARTS = {
        "Stability": {
            "loss spikes (1 = spike)": ["Multiline", ["^stability/spike$"]],
            "precursor score and loss z": ["Multiline", ["^stability/score$", "^stability/loss_z$"]],
            "score parts": ["Multiline", ["^stability/grad_norm_z$", "^stability/update_ratio_z$"]],
            "spike threshold": ["Multiline", ["^stability/threshold$", "^loss$"]],
            "max update ratio": ["Multiline", ["^stability/max_update_ratio$"]],
        }
    }
    SUMMARY = (("stability/score", "precursor score (z)"), stability_summary)
    ORDER = 110.0
    PLACEHOLDER = False  # shown only in runs that have it

    def __init__(
        self,
        rule: str = "olmo",
        window: int = 128,
        sigmas: float = 6.0,
        warmup: int | None = None,
        factor: float = 10.0,
        megatron_samples: int = 100,
        per_sample: bool = True,
        top_k: int = 5,
        history: int = 32,
        score_window: int = 32,
        score_warmup: int = 8,
        score_threshold: float = 3.0,
        standout: float = 5.0,
        **kw,
    ):
        super().__init__(**kw)
        if rule not in RULES:
            raise ValueError(f"StabilityMonitor: rule={rule!r}; use one of {RULES}")
        warmup = window if warmup is None else warmup
        ints = {"window": window, "warmup": warmup, "megatron_samples": megatron_samples, "top_k": top_k}
        ints |= {"history": history, "score_window": score_window, "score_warmup": score_warmup}
        for what, v in ints.items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"StabilityMonitor: {what}={v!r} must be a positive integer")
        if warmup > window or score_warmup > score_window:
            raise ValueError("StabilityMonitor: warmup must not exceed window, nor score_warmup score_window")
        if not (sigmas > 0 and factor > 1):
            raise ValueError("StabilityMonitor: sigmas must be positive and factor above 1")
        self.rule, self.window, self.sigmas, self.warmup = rule, window, float(sigmas), warmup
        self.factor, self.megatron_samples = float(factor), megatron_samples
        self.per_sample, self.top_k, self.history = per_sample, top_k, history
        self.standout = float(standout)
        self.score_window, self.score_warmup, self.score_threshold = score_window, score_warmup, score_threshold
        self._losses: deque[float] = deque(maxlen=window)
        self._mega_count = 0
        self._mega_max = 0.0
        self._grad_hist: deque[float] = deque(maxlen=score_window)
        self._ratio_hist: deque[float] = deque(maxlen=score_window)
        self._layer_grad: dict[str, deque[float]] = {}
        self._layer_update: dict[str, deque[float]] = {}
        self._spikes: list[dict[str, Any]] = []  # {"step", "text"}
        self._alarms: deque[int] = deque(maxlen=10)  # the latest steps with score > score_threshold
        self._tracked = 0
        self._use_indices = True
        self._asked_indices = False
        self._optimizer: torch.optim.Optimizer | None = None

    # --- needs ----------------------------------------------------------------------------------------
    def requires(self, step: int) -> Needs:
        if not self.scheduled(step):
            return Needs()
        flags = {Need.LOSS, Need.PER_SAMPLE_LOSS, Need.GRAD_NORMS, Need.UPDATE, PARAM_NORMS}
        if self.per_sample:
            flags.add(Need.PER_SAMPLE_SQ_NORMS)
        if self._use_indices:
            flags.add(Need.INDICES)
        return Needs(flags)

    def on_attach(self, model, optimizer) -> None:
        self._optimizer = optimizer

    # --- per step ------------------------------------------------------------------------------------
    def _detect(self, loss: float) -> tuple[bool, float, float, str]:
        """(spike, loss_z, threshold, why) for this step's loss; updates the windows."""
        if not math.isfinite(loss):
            return True, math.nan, math.nan, f"non-finite loss {loss}"
        spike, z, threshold, why = False, math.nan, math.nan, ""
        if len(self._losses) >= self.warmup:
            olmo, z, mu, threshold = olmo_check(self._losses, loss, self.sigmas)
            if olmo and self.rule in ("olmo", "either"):
                spike = True
                why = (
                    f"loss {loss:.4g} > {threshold:.4g} = mean {mu:.4g} + {self.sigmas:g} sigma of the last "
                    f"{len(self._losses)} tracked steps (z = {z:.1f})"
                )
        if self._mega_count >= self.megatron_samples:
            if abs(loss) >= self.factor * self._mega_max and self.rule in ("megatron", "either") and not spike:
                spike = True
                why = (
                    f"|loss| {abs(loss):.4g} >= {self.factor:g} x {self._mega_max:.4g}, the largest of the first "
                    f"{self.megatron_samples} tracked losses"
                )
        else:
            self._mega_count += 1
            self._mega_max = max(self._mega_max, abs(loss))
        self._losses.append(loss)
        return spike, z, threshold, why

    def _score(self, grad_norm: float | None, ratio: float | None) -> dict[str, float]:
        zg = zu = math.nan
        if grad_norm is not None and len(self._grad_hist) >= self.score_warmup:
            zg = robust_z(self._grad_hist, grad_norm)
        if ratio is not None and len(self._ratio_hist) >= self.score_warmup:
            zu = robust_z(self._ratio_hist, ratio)
        if grad_norm is not None and math.isfinite(grad_norm):
            self._grad_hist.append(grad_norm)
        if ratio is not None and math.isfinite(ratio):
            self._ratio_hist.append(ratio)
        parts = [z for z in (zg, zu) if math.isfinite(z)]
        return {
            "stability/score": max(parts) if parts else math.nan,
            "stability/grad_norm_z": zg,
            "stability/update_ratio_z": zu,
            "stability/max_update_ratio": math.nan if ratio is None else ratio,
        }

    def compute(self, record):
        if record.loss is None:
            return {}
        self._tracked += 1
        if self._use_indices and not self._asked_indices:
            self._asked_indices = True
            if record.indices is None:  # no cockpit.track(loader): positions in the batch from now on
                self._use_indices = False
        warming, losses, grads = [], len(self._losses), len(self._grad_hist)
        if losses < self.warmup:
            warming.append(f"the loss check starts once its window holds {self.warmup} losses ({losses} so far)")
        if grads < self.score_warmup:
            warming.append(f"the precursor score starts after {self.score_warmup} tracked steps ({grads} so far)")
        if warming:  # (their tags are NaN until then)
            self.note("warm-up: " + "; ".join(warming))
        spike, z, threshold, why = self._detect(float(record.loss))
        ratios = self._update_ratios(record)
        ratio = max(ratios.values()) if ratios else None
        out: dict[str, Any] = {
            "stability/spike": 1.0 if spike else 0.0,
            "stability/loss_z": z,
            "stability/threshold": threshold,
        }
        out.update(self._score(record.grad_norm, ratio))
        if out["stability/score"] > self.score_threshold:
            self._alarms.append(int(record.step))
        grads = record.grad_norms or {}
        updates = record.update_norms or {}
        if spike:
            out.update(self._attribution(record, why, grads, updates, out["stability/score"]))
        for name, v in grads.items():
            self._layer_grad.setdefault(name, deque(maxlen=self.history)).append(float(v))
        for name, v in updates.items():
            self._layer_update.setdefault(name, deque(maxlen=self.history)).append(float(v))
        return {self.tag(k): v for k, v in out.items()}

    @staticmethod
    def _update_ratios(record) -> dict[str, float]:
        """||Delta theta_p|| / ||theta_p|| per tensor with ||theta_p|| > 0."""
        params = record.get(PARAM_NORMS)
        updates = record.update_norms
        if not params or not updates:
            return {}
        return {n: r for n, r in update_ratios(updates, params).items() if not math.isnan(r)}

    # --- attribution -------------------------------------------------------------------------------
    def _examples(self, record) -> tuple[dict[str, Any], list[str]]:
        losses = record.per_sample_loss
        sq = record.per_sample_sq_norms
        n = len(losses) if losses is not None else (len(sq) if sq is not None else 0)
        if n == 0:
            return {}, ["no per-sample losses or gradient norms at this step"]
        idx = record.indices if record.indices is not None and len(record.indices) == n else None
        label = "examples" if idx is not None else "batch positions"
        names = np.asarray(idx if idx is not None else np.arange(n))
        loss = np.asarray(losses, dtype=np.float64) if losses is not None else np.full(n, np.nan)
        norms = np.sqrt(np.asarray(sq, dtype=np.float64)) if sq is not None and len(sq) == n else np.full(n, np.nan)
        out: dict[str, Any] = {}
        words = []
        k = min(self.top_k, n)
        for key, values, what, total in (
            ("loss", loss, "loss", loss.sum()),
            ("grad_norm", norms, "sum of ||g_i||^2", np.sum(norms**2)),
        ):
            if not np.all(np.isfinite(values)):
                continue
            order = np.argsort(-values, kind="stable")[:k]
            table = {"position": order, "loss": loss[order], "grad_norm": norms[order]}
            if idx is not None:
                table = {"index": names[order], **table}
            out[f"stability/examples/by_{key}"] = table
            med = float(np.median(values))
            standout = [i for i in order if values[i] > self.standout * med] or list(order[:1])
            mass = values if key == "loss" else values**2
            share = float(mass[standout].sum() / total) if total > 0 else math.nan
            shown = ", ".join(str(int(names[i])) for i in standout)
            biggest, plural = ("loss", "losses") if key == "loss" else ("gradient norm", "gradient norms")
            if values[standout[0]] > self.standout * med:
                words.append(
                    f"{label} {shown} ({len(standout)} of {n}, {biggest} above {self.standout:g}x the batch median) "
                    f"carry {100 * share:.0f}% of the batch's {what}"
                )
            else:
                ratio = values[order[0]] / med if med > 0 else math.inf
                first = ", ".join(str(int(names[i])) for i in order[:3])
                words.append(
                    f"the largest {plural}: {label} {first} (at most {ratio:.2g}x the batch median: none stands out)"
                )
        return out, words

    def _layers(self, grads: Mapping[str, float], updates: Mapping[str, float]) -> tuple[dict[str, Any], list[str]]:
        def jumps(now: Mapping[str, float], hist: Mapping[str, deque]) -> dict[str, float]:
            out = {}
            for name, v in now.items():
                h = hist.get(name)
                if h:
                    med = float(np.median(np.asarray(h, dtype=np.float64)))
                    out[name] = v / med if med > 0 else math.inf if v > 0 else math.nan
            return out

        gj, uj = jumps(grads, self._layer_grad), jumps(updates, self._layer_update)
        if not gj and not uj:
            return {}, ["no earlier steps to compare the layers with"]
        key = gj if gj else uj
        names = sorted(key, key=lambda n: -np.nan_to_num(key[n], nan=-np.inf))[: self.top_k]
        table = {
            "layer": np.asarray(names),
            "grad_jump": np.asarray([gj.get(n, math.nan) for n in names], dtype=np.float64),
            "update_jump": np.asarray([uj.get(n, math.nan) for n in names], dtype=np.float64),
            "grad_norm": np.asarray([grads.get(n, math.nan) for n in names], dtype=np.float64),
            "update_norm": np.asarray([updates.get(n, math.nan) for n in names], dtype=np.float64),
        }
        big = [n for n in names[:3] if key[n] >= JUMP] or names[:1]
        shown = ", ".join(f"{n} {key[n]:.3g}x" for n in big)
        what = "gradient norm" if gj else "update norm"
        verb = "jumped" if key[big[0]] >= JUMP else "rose at most"
        words = [f"layers' {what} {verb}: {shown} (against the median of their previous {self.history} steps)"]
        if gj and uj:
            top_u = max(uj, key=lambda n: np.nan_to_num(uj[n], nan=-np.inf))
            words.append(f"the largest update-norm jump: {top_u} {uj[top_u]:.3g}x")
        return {"stability/layers": table}, words

    def _adam(self, record) -> tuple[dict[str, Any], list[str]]:
        if self._optimizer is None:
            return {}, []
        shares = adam_eps_shares(self._optimizer, record.params)
        if shares is None:
            return {}, []
        names = sorted(shares, key=lambda n: -shares[n][0])
        total = sum(c for _, _, c in shares.values())
        overall = sum(s * c for s, _, c in shares.values()) / total if total else math.nan
        table = {
            "layer": np.asarray(names),
            "eps_share": np.asarray([shares[n][0] for n in names], dtype=np.float64),
            "sqrt_v_hat_median": np.asarray([shares[n][1] for n in names], dtype=np.float64),
        }
        top = names[0]
        if shares[top][0] > 0:
            words = (
                f"Adam: {100 * overall:.1f}% of all entries are eps-limited (sqrt(v_hat) < eps), most in {top} "
                f"({100 * shares[top][0]:.0f}%); the rest are limited by the second moment"
            )
        else:
            words = "Adam: every entry's update is limited by the second moment (no sqrt(v_hat) < eps)"
        return {"stability/adam": table}, [words]

    def _attribution(self, record, why: str, grads, updates, score: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        ex, ex_words = self._examples(record)
        layers, layer_words = self._layers(grads, updates)
        adam, adam_words = self._adam(record)
        out.update(ex)
        out.update(layers)
        out.update(adam)
        score_words = f"precursor score {score:.1f}" if math.isfinite(score) else "no precursor score yet"
        text = f"loss spike at step {record.step} ({why}): " + "; ".join(
            [*ex_words, *layer_words, *adam_words, score_words]
        )
        out["stability/attribution"] = text
        self._spikes.append({"step": int(record.step), "text": text})
        out["verdict/stability"] = self._verdict()
        return out

    # --- verdict and state -------------------------------------------------------------------------
    def _verdict(self) -> str:
        rule = {
            "olmo": f"loss > mean + {self.sigmas:g} sigma of the last {self.window} steps",
            "megatron": f"|loss| >= {self.factor:g} x the largest of the first {self.megatron_samples}",
            "either": f"mean + {self.sigmas:g} sigma of {self.window} steps, or {self.factor:g} x the early maximum",
        }[self.rule]
        if not self._spikes:
            need = self.warmup if self.rule != "megatron" else self.megatron_samples
            if self._tracked < need:
                return (
                    f"no loss spike in {self._tracked} tracked steps, but the rule ({rule}) needs {need} steps of "
                    "warm-up before it can flag one"
                )
            alarms = ""
            if self._alarms:
                steps = ", ".join(map(str, self._alarms))
                alarms = (
                    f"; the precursor score exceeded {self.score_threshold:g} at step(s) {steps}: a gradient norm "
                    "or update ratio far outside its recent range"
                )
            return f"no loss spike in {self._tracked} tracked steps (rule: {rule}){alarms}"
        last = self._spikes[-1]["text"]
        if len(self._spikes) == 1:
            return last
        steps = ", ".join(str(s["step"]) for s in self._spikes[-10:])
        return f"{len(self._spikes)} loss spikes (steps {steps}); the latest: {last}"

    def verdicts(self) -> list[str]:
        return [self._verdict()] if self._tracked else []

    def on_close(self) -> Mapping[str, Any]:
        return {self.tag("verdict/stability"): self._verdict()} if self._tracked else {}

    def state_dict(self) -> dict[str, Any]:
        """``losses`` (the window, oldest first), ``megatron`` ([count, max]), ``grad_norms`` and
        ``update_ratios`` (the score's windows), ``layer_grad`` / ``layer_update`` ({tensor: recent norms}),
        ``spikes`` ([{step, text}]), ``alarms`` (steps with a score above the threshold), ``tracked``,
        ``use_indices``, ``asked_indices`` and ``window``."""
        return {
            "window": self.window,
            "losses": list(self._losses),
            "megatron": [self._mega_count, self._mega_max],
            "grad_norms": list(self._grad_hist),
            "update_ratios": list(self._ratio_hist),
            "layer_grad": {n: list(d) for n, d in self._layer_grad.items()},
            "layer_update": {n: list(d) for n, d in self._layer_update.items()},
            "spikes": [dict(s) for s in self._spikes],
            "tracked": self._tracked,
            "use_indices": self._use_indices,
            "asked_indices": self._asked_indices,
            "alarms": list(self._alarms),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. With another ``window`` (or ``history``, ``score_window``) the most
        recent values that fit are kept; refused if the state is not a StabilityMonitor's."""
        missing = {"losses", "megatron", "grad_norms", "update_ratios", "layer_grad", "layer_update"} - set(state)
        if missing:
            raise refuse_state(
                "StabilityMonitor",
                f"the state lacks {sorted(missing)}",
                "Load the state a StabilityMonitor saved, or leave 'stability' out of the state to start afresh.",
            )
        self._losses = deque((float(v) for v in state["losses"]), maxlen=self.window)
        self._mega_count, self._mega_max = int(state["megatron"][0]), float(state["megatron"][1])
        self._grad_hist = deque((float(v) for v in state["grad_norms"]), maxlen=self.score_window)
        self._ratio_hist = deque((float(v) for v in state["update_ratios"]), maxlen=self.score_window)
        self._layer_grad = {
            str(n): deque((float(v) for v in d), maxlen=self.history) for n, d in state["layer_grad"].items()
        }
        self._layer_update = {
            str(n): deque((float(v) for v in d), maxlen=self.history) for n, d in state["layer_update"].items()
        }
        self._spikes = [{"step": int(s["step"]), "text": str(s["text"])} for s in state.get("spikes", [])]
        self._tracked = int(state.get("tracked", 0))
        self._use_indices = bool(state.get("use_indices", True))
        self._asked_indices = bool(state.get("asked_indices", False))
        self._alarms = deque((int(v) for v in state.get("alarms", [])), maxlen=10)
