"""Clipping: how much global, adaptive (AGC) and per-sample (DP-style) gradient clipping would do, or does.

Three kinds, each measured on the gradient as backward left it (before any clipping the loop does):

- global (``torch.nn.utils.clip_grad_norm_``): the norm ||g|| after backward, the norm the optimizer
  receives (so clipping done by the loop is seen), and for a threshold ``max_norm`` whether it clips,
  the clip coefficient min(1, max_norm / (||g|| + 1e-6)) and the rolling fraction of clipped steps.
- AGC (Brock, De, Smith, Simonyan 2021, arXiv:2102.06171): per unit i (a row of a Linear weight, an
  output filter of a conv; biases and gains as a whole) the ratio r_i = ||G_i|| / max(||W_i||, eps); for
  a threshold lambda the fraction of units with r_i >= lambda (those :func:`cockpit_lite.instruments.agc.clip_`
  rescales), the smallest scale factor lambda max(||W_i||, eps) / max(||G_i||, 1e-6), and how many units
  sit on the eps floor (||W_i|| < eps). Per parameter tensor and over all units; the final layer is left
  out by default, as the paper does not clip it.
- per-sample (Abadi et al. 2016, DP-SGD; Opacus): for a threshold C the clip factors
  f_i = min(1, C / (||g_i|| + 1e-6)), the fraction of samples clipped, and the cosine between the
  clipped mean (1/B) sum_i f_i g_i and the true mean (1/B) sum_i g_i,
      cos = f^T K 1 / ( sqrt(f^T K f) sqrt(1^T K 1) ),     K_ij = g_i . g_j  (B x B Gram matrix),
  with the norm ratio ||clipped mean|| / ||true mean|| = sqrt(f^T K f / 1^T K 1). No g_i is materialised.

Threshold suggestions (``clip/suggest/<kind>/pNN``): the threshold below which NN% of the recent
values fall, i.e. the threshold that would clip (100 - NN)% of them: over the window of steps for the
global norm; for AGC ratios and per-sample norms the NN-th percentile within a step (of units, of samples),
median over the window of steps.

Cost: global and AGC statistics cost one pass over gradients and weights (unit norms) and a few
vectorised numpy calls however many tensors the model has; per-sample norms come with the per-sample
engine, and the cosine needs the B x B Gram matrix, so it is computed on every ``cosine_every``-th step
only (docs/clipping.md, docs/performance.md).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from cockpit_lite.instruments._util import QUANTILES, refuse_state, sorted_quantiles
from cockpit_lite.instruments.agc import GRAD_NORM_FLOOR, check_positive, final_layer, unitwise_norm
from cockpit_lite.instruments.panels import ClippingPanel

from cockpit_lite import Instrument, Need, Needs, distributed

KINDS = ("global", "agc", "per_sample")
#: the 1e-6 that torch's clip_grad_norm_ and Opacus add to the norm in the clip coefficient
NORM_EPS = 1e-6
_LEVELS = tuple(QUANTILES.values())


def clip_factors(norms: np.ndarray, threshold: float) -> np.ndarray:
    """min(1, threshold / (norm + 1e-6)), the factor ``clip_grad_norm_`` / Opacus multiply by."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.minimum(1.0, threshold / (np.asarray(norms, dtype=np.float64) + NORM_EPS))


def clipped_mean_cosine(gram: np.ndarray, factors: np.ndarray) -> tuple[float, float]:
    """(cosine, norm ratio) between sum_i f_i g_i and sum_i g_i from the Gram matrix K_ij = g_i . g_j:
    cos = f^T K 1 / (sqrt(f^T K f) sqrt(1^T K 1)), ratio = sqrt(f^T K f / 1^T K 1); NaN if a norm is 0."""
    k = np.asarray(gram, dtype=np.float64)
    f = np.asarray(factors, dtype=np.float64)
    k1 = k.sum(1)
    ff, f1, one = float(f @ k @ f), float(f @ k1), float(k1.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = f1 / (math.sqrt(max(ff, 0.0)) * math.sqrt(max(one, 0.0)))
        ratio = math.sqrt(max(ff, 0.0) / one) if one > 0 else float("nan")
    return float(np.clip(cos, -1.0, 1.0)) if math.isfinite(cos) else float("nan"), ratio


def _level_name(q: float) -> str:
    pct = q * 100
    return f"p{pct:g}".replace(".", "_")


class _Window:
    """The last ``size`` rows of ``width`` floats (a ring buffer)."""

    def __init__(self, size: int, width: int):
        self.buf = np.empty((size, width))
        self.n = self.i = 0

    def add(self, row) -> np.ndarray:
        """Add a row; return the rows held (in no particular order)."""
        self.buf[self.i] = row
        self.i = (self.i + 1) % len(self.buf)
        self.n = min(self.n + 1, len(self.buf))
        return self.buf[: self.n]

    def rows(self) -> np.ndarray:
        """The rows held, oldest first."""
        if self.n < len(self.buf):
            return self.buf[: self.n].copy()
        return np.concatenate([self.buf[self.i :], self.buf[: self.i]])

    def load(self, rows: np.ndarray) -> None:
        """Hold ``rows`` (oldest first); the oldest ones are dropped if the window is shorter."""
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, self.buf.shape[1])[-len(self.buf) :]
        self.n = len(rows)
        self.buf[: self.n] = rows
        self.i = self.n % len(self.buf)


#: quantile levels of the unit ratios reported per parameter tensor (the overall set is QUANTILES)
PER_PARAM_LEVELS = {"p5": 0.05, "p50": 0.5, "p95": 0.95}


def agc_statistics(
    w: np.ndarray,
    g: np.ndarray,
    sizes: Sequence[int],
    eps: float,
    lam: float | None,
    levels: Sequence[float],
    seg_levels: Sequence[float] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """AGC statistics of K steps at once from the unit norms ``w`` = ||W_i|| and ``g`` = ||G_i|` (both
    K x N; the N units are consecutive segments, parameter tensors of ``sizes`` units): over all units
    (arrays of K values, ``quantiles`` L x K) and, with ``seg_levels``, per segment (K x S; quantiles
    S x L x K).

    ratio r_i = ||G_i|| / max(||W_i||, eps): ``quantiles`` at the levels, ``max``, ``mean``; ``floored`` =
    #{||W_i|| < eps}; with lambda: ``clipped`` = #{not ||G_i|| < lambda max(||W_i||, eps)} (the units AGC
    rescales) and ``min_scale`` = the smallest factor lambda max(||W_i||, eps) / max(||G_i||, 1e-6) of a
    clipped unit (1 if none is clipped). Vectorised over steps, so its cost is paid once per K steps.
    """
    w_star = np.maximum(w, eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = g / w_star
    r_sorted = np.sort(ratio, axis=1)  # NaNs last
    floored = w < eps
    overall = {
        "quantiles": sorted_quantiles(r_sorted.T, levels),
        "max": r_sorted[:, -1],
        "mean": ratio.mean(1),
        "floored": floored.sum(1).astype(np.float64),
    }
    if lam is not None:
        max_norm = lam * w_star
        clipped = ~(g < max_norm)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(clipped, max_norm / np.maximum(g, GRAD_NORM_FLOOR), 1.0)
        overall["clipped"] = clipped.sum(1).astype(np.float64)
        overall["min_scale"] = scale.min(1)
    if seg_levels is None:
        return overall, None
    bounds = np.cumsum(sizes)
    starts = np.concatenate([[0], bounds[:-1]]).astype(np.intp)
    qs, tops = [], []
    for a, b in zip(starts, bounds, strict=True):
        seg = np.sort(ratio[:, a:b], axis=1)
        qs.append(sorted_quantiles(seg.T, seg_levels))
        tops.append(seg[:, -1])
    per = {
        "quantiles": np.stack(qs),
        "max": np.stack(tops, axis=1),
        "floored": np.add.reduceat(floored.astype(np.float64), starts, axis=1),
    }
    if lam is not None:
        per["clipped"] = np.add.reduceat(clipped.astype(np.float64), starts, axis=1)
        per["min_scale"] = np.minimum.reduceat(scale, starts, axis=1)
    return overall, per


class Clipping(Instrument):
    """Statistics of global, adaptive (AGC) and per-sample gradient clipping, and threshold suggestions.

    Args:
        max_norm: global threshold to evaluate (as ``clip_grad_norm_(params, max_norm)``), or None.
        agc_clip: AGC lambda to evaluate (as ``agc.clip_(params, clip=agc_clip, eps=agc_eps)``), or None.
        agc_eps: AGC's floor on the weight norm.
        per_sample_clip: per-sample threshold C to evaluate (DP-SGD), or None.
        window: number of tracked steps for the rolling clipped fraction and the suggestions.
        kinds: which of ``"global"``, ``"agc"``, ``"per_sample"`` to measure. Global and AGC cost a pass
            over the gradients; per-sample needs the per-sample engine (norms; the B x B Gram matrix
            for the cosine when ``per_sample_clip`` is given).
        agc_exclude: parameters left out of the AGC statistics: ``"final"`` (the final layer, as the
            paper leaves the classifier unclipped; see :func:`instruments.agc.final_layer`), or a
            collection of parameter names (empty: every parameter).
        suggest: quantile levels in (0, 1) for the threshold suggestions (0.9: clips 10%).
        per_param: also emit the AGC statistics of each parameter tensor.
        cosine_every: the per-sample cosine (which needs the B x B Gram matrix) is computed on steps
            that are multiples of ``cosine_every``; 1 for every tracked step.
        batch_steps: AGC statistics are computed for this many tracked steps at once (vectorised; each
            record keeps its own step, arriving up to ``batch_steps - 1`` steps late, the rest at close);
            1 computes them at every step.

    Tags: ``clip/global/...``, ``clip/agc/...`` (``clip/agc/<param>/...`` per tensor),
    ``clip/per_sample/...``, ``clip/suggest/...`` (docs/clipping.md, docs/tags.md).
    """

    READS_VALUES_IN_HOOKS = False  # (its hook reads parameters and fields filled at once: no flush for it)

    TAGS = {
        "clip/global/.+": "global-norm clipping statistics",
        "clip/agc/.+": "adaptive (AGC) clipping statistics, also per parameter tensor",
        "clip/per_sample/.+": "per-sample clipping statistics",
        "clip/suggest/(global|agc|per_sample)/.+": "threshold suggestions",
    }
    PANELS = (ClippingPanel(),)
    CHARTS = {
        "Clipping": {
            "fraction clipped (global, AGC, per-sample)": [
                "Multiline",
                ["^clip/(global|agc|per_sample)/frac_clipped$"],
            ],
            "global norm before clipping and suggested max_norm": [
                "Multiline",
                ["^clip/global/norm$", "^clip/suggest/global/.*$"],
            ],
            "AGC ratio ||G_i|| / ||W_i||: median, 5% and 95%": [
                "Margin",
                ["clip/agc/ratio/p50", "clip/agc/ratio/p5", "clip/agc/ratio/p95"],
            ],
        },
    }
    SUMMARY = (
        ("clip/global/norm", "global norm before clipping"),
        ("clip/global/frac_clipped", "fraction of steps clipped"),
        ("clip/agc/frac_clipped", "fraction of AGC units clipped"),
        ("clip/per_sample/frac_clipped", "fraction of samples clipped"),
    )
    ORDER = 70.0

    def __init__(
        self,
        max_norm: float | None = None,
        agc_clip: float | None = None,
        agc_eps: float = 1e-3,
        per_sample_clip: float | None = None,
        window: int = 100,
        kinds: Collection[str] = KINDS,
        agc_exclude: str | Iterable[str] = "final",
        suggest: Iterable[float] = (0.5, 0.9),
        per_param: bool = True,
        cosine_every: int = 10,
        batch_steps: int = 10,
        **kw,
    ):
        super().__init__(**kw)
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown or not kinds:
            raise ValueError(f"Clipping: kinds={kinds!r}; choose one or more of {KINDS}")
        self.kinds = frozenset(kinds)
        fix = {
            "max_norm": " (the global threshold as for clip_grad_norm_, e.g. max_norm=1.0), or None",
            "agc_clip": " (AGC's lambda, e.g. agc_clip=0.01), or None",
            "per_sample_clip": " (the per-sample threshold C, e.g. per_sample_clip=1.0), or None",
        }
        for kind, name, value in (
            ("global", "max_norm", max_norm),
            ("agc", "agc_clip", agc_clip),
            ("per_sample", "per_sample_clip", per_sample_clip),
        ):
            if value is not None:
                check_positive(f"Clipping: {name}", value, fix[name])
                if kind not in self.kinds:
                    raise ValueError(f"Clipping: {name} is given but kinds={kinds!r} leaves {kind!r} out")
        self.max_norm = None if max_norm is None else float(max_norm)
        self.agc_clip = None if agc_clip is None else float(agc_clip)
        self.per_sample_clip = None if per_sample_clip is None else float(per_sample_clip)
        self.agc_eps = check_positive("Clipping: agc_eps", agc_eps, " (AGC's weight-norm floor, e.g. 1e-3)")
        for name, value in (("window", window), ("cosine_every", cosine_every), ("batch_steps", batch_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Clipping: {name}={value!r} must be a positive integer (a number of steps)")
        self.window, self.cosine_every, self.batch_steps = window, cosine_every, batch_steps
        self.suggest = tuple(float(q) for q in suggest)
        if (
            not self.suggest
            or not all(0 < q < 1 for q in self.suggest)
            or len(set(map(_level_name, self.suggest))) != len(self.suggest)
        ):
            raise ValueError(f"Clipping: suggest={suggest!r}: use distinct quantile levels in (0, 1), e.g. (0.5, 0.9)")
        if isinstance(agc_exclude, str) and agc_exclude != "final":
            raise ValueError(f'Clipping: agc_exclude={agc_exclude!r}: use "final" or a collection of parameter names')
        self.agc_exclude = agc_exclude if isinstance(agc_exclude, str) else frozenset(agc_exclude)
        self.per_param = per_param
        self.excluded: frozenset[str] = frozenset()
        self._global_norms = _Window(window, 1)
        self._agc_levels = _Window(window, len(self.suggest))
        self._ps_levels = _Window(window, len(self.suggest))
        self._agc: tuple[list[str], list[int], int, torch.Tensor] | None = None
        self._pending: list[tuple] = []
        self._sharded = False  # FSDP2: no unit-wise norms (see on_after_backward)

    # --- core contract ------------------------------------------------------------------------------
    def requires(self, step: int) -> Needs:
        if not self.scheduled(step):
            return Needs()
        flags: set[Need] = set()
        if "global" in self.kinds:
            flags.add(Need.GRAD_NORMS)
            if "agc" not in self.kinds or self._sharded:  # otherwise the unit norms of on_after_backward give it
                flags.add(Need.BACKWARD_GRAD_NORMS)
        if "per_sample" in self.kinds:
            flags.add(Need.PER_SAMPLE_SQ_NORMS)
            if self.per_sample_clip is not None and step % self.cosine_every == 0:
                flags.add(Need.PER_SAMPLE_GRAM)
        return Needs(flags)

    def on_attach(self, model, optimizer) -> None:
        names = {n for n, _ in model.named_parameters()}
        self._sharded = any(distributed.is_sharded(p) for p in model.parameters())
        if self.agc_exclude == "final":
            self.excluded = frozenset(final_layer(model))
        else:
            unknown = sorted(set(self.agc_exclude) - names)
            if unknown:
                raise ValueError(
                    f"Clipping: agc_exclude names {unknown} are not parameters of the model; "
                    f"use names from model.named_parameters(), e.g. {sorted(names)[:4]}"
                )
            self.excluded = frozenset(self.agc_exclude)

    @torch.no_grad()
    def on_after_backward(self, record) -> None:
        """Unit norms of weights and gradients, before the loop can clip the gradients."""
        self._agc = None
        if "agc" not in self.kinds:
            return
        if self._sharded:
            self.note(
                "AGC under FSDP2 (fully_shard): its unit-wise norms (one per row of each weight, one per element of "
                "each bias) would be gathered from the shards of every rank, parameter-sized traffic: left out"
            )
            return
        names, sizes, w_norms, g_norms, g_excluded = [], [], [], [], []
        scale = record.backward_scale  # AMP: p.grad is still multiplied by the loss scale here
        unscale = scale if scale is not None and scale > 0 and math.isfinite(scale) else 1.0
        for name, p in record.params.items():
            if p.grad is None or p.numel() == 0:
                continue
            g = unitwise_norm(p.grad.detach()).reshape(-1) / unscale
            if name in self.excluded:
                g_excluded.append(g)  # only for the global norm
                continue
            names.append(name)
            sizes.append(g.numel())
            g_norms.append(g)
            w_norms.append(unitwise_norm(p.detach()).reshape(-1))
        if g_norms or g_excluded:
            # one tensor: [w (kept units), g (kept units), g (excluded units)], with the step's other numbers
            self._agc = (names, sizes, sum(sizes), record.host.defer([torch.cat(w_norms + g_norms + g_excluded)]))

    def compute(self, record):
        out: dict = {}
        agc_data, self._agc = self._agc, None
        units = None
        if agc_data is not None:
            names, sizes, n, deferred = agc_data
            (flat,) = deferred.get()  # (float64, brought over by the step's one transfer)
            units = (names, sizes, flat[:n], flat[n : 2 * n], flat[n:])
        if "global" in self.kinds:
            out.update(self._global(record, units))
        if "agc" in self.kinds and units is not None and not units[0]:
            self.note(
                f"AGC: every parameter with a gradient ({len(units[4])} units) is left out of it (agc_exclude: "
                "the final layer, which the paper leaves unclipped, by default): no AGC statistics. Pass "
                "agc_exclude=() to include it"
            )
        elif "agc" in self.kinds and units is not None:
            pending = self._pending
            if pending and (pending[0][1], pending[0][2]) != (units[0], units[1]):
                out.update(self._flush_agc())  # the set of tensors with gradients changed
            self._pending.append((record.step, *units[:4]))
            if len(self._pending) >= self.batch_steps:
                out.update(self._flush_agc())
        if "per_sample" in self.kinds:
            out.update(self._per_sample(record))
        return self._tagged(out)

    def on_close(self):
        return self._tagged(self._flush_agc())

    def _tagged(self, out: dict) -> dict:
        if not self.name:
            return out
        return {(k[0], self.tag(k[1])) if isinstance(k, tuple) else self.tag(k): v for k, v in out.items()}

    # --- state (resuming a run) -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The rolling windows, oldest row first (float64): ``global_norms`` (n x 1 pre-clipping norms),
        ``agc_levels`` and ``ps_levels`` (n x L per-step quantiles at the ``suggest`` levels, which are
        stored too); ``agc_pending``: the AGC steps not yet computed (at most ``batch_steps - 1``), each
        its step, parameter names, units per tensor and the unit norms ``w``, ``g`` (float64)."""
        return {
            "suggest": list(self.suggest),
            "global_norms": torch.from_numpy(self._global_norms.rows()),
            "agc_levels": torch.from_numpy(self._agc_levels.rows()),
            "ps_levels": torch.from_numpy(self._ps_levels.rows()),
            "agc_pending": [
                {"step": step, "names": list(names), "sizes": list(sizes), "w": torch.tensor(w), "g": torch.tensor(g)}
                for step, names, sizes, w, g in self._pending
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. Another ``window`` keeps the most recent rows that fit; other
        ``suggest`` levels are refused (the windows hold quantiles at the saved levels)."""
        saved = tuple(float(q) for q in state["suggest"])
        has_levels = len(state["agc_levels"]) or len(state["ps_levels"])
        if saved != self.suggest and has_levels:
            raise refuse_state(
                "Clipping",
                f"the suggestion windows hold quantiles at levels {saved}, this Clipping has suggest={self.suggest}",
                f"Build Clipping(suggest={saved}, ...) as the saved run did, or leave 'clipping' out of the state "
                "to start its windows afresh.",
            )
        as_np = lambda t: t.detach().cpu().double().numpy()  # noqa: E731
        pending = [
            (int(p["step"]), [str(n) for n in p["names"]], [int(k) for k in p["sizes"]], as_np(p["w"]), as_np(p["g"]))
            for p in state["agc_pending"]
        ]
        self._global_norms.load(as_np(state["global_norms"]))
        self._agc_levels.load(as_np(state["agc_levels"]))
        self._ps_levels.load(as_np(state["ps_levels"]))
        self._pending = pending
        self._agc = None

    # --- global ---------------------------------------------------------------------------------------
    def _global(self, record, units) -> dict[str, float]:
        out: dict[str, float] = {}
        if record.backward_grad_norms:
            norm = record.global_norm(record.backward_grad_norms)
        elif units is not None:
            norm = float(np.sqrt(np.dot(units[4], units[4])))  # sum over units of ||G_i||^2 = ||G||^2
        else:
            return out
        out["clip/global/norm"] = norm
        if record.grad_norms:
            received = record.grad_norm
            out["clip/global/received_norm"] = received
            out["clip/global/received_ratio"] = received / norm if norm > 0 else float("nan")
            if norm == 0:
                self.note("clipping: the gradient after backward is zero: received_ratio is undefined (NaN)")
        if not math.isfinite(norm):
            self.note(f"clipping: non-finite gradient norm {norm}; left out of the rolling statistics")
            return out
        norms = self._global_norms.add(norm)[:, 0]
        if self.max_norm is not None:
            coef = min(1.0, self.max_norm / (norm + NORM_EPS))
            out["clip/global/coef"] = coef
            out["clip/global/would_clip"] = float(coef < 1.0)
            out["clip/global/frac_clipped"] = float(np.mean(self.max_norm / (norms + NORM_EPS) < 1.0))
        qs = sorted_quantiles(np.sort(norms), self.suggest)
        out.update({f"clip/suggest/global/{_level_name(q)}": float(v) for q, v in zip(self.suggest, qs, strict=True)})
        return out

    # --- AGC ------------------------------------------------------------------------------------------
    def _flush_agc(self) -> dict:
        """AGC records ``{(step, tag): value}`` of the pending steps, computed together."""
        if not self._pending:
            return {}
        pending, self._pending = self._pending, []
        steps = [p[0] for p in pending]
        names, sizes = pending[0][1], pending[0][2]
        w = np.stack([p[3] for p in pending])
        g = np.stack([p[4] for p in pending])
        seg_levels = tuple(PER_PARAM_LEVELS.values()) if self.per_param else None
        levels = _LEVELS + self.suggest
        overall, per = agc_statistics(w, g, sizes, self.agc_eps, self.agc_clip, levels, seg_levels=seg_levels)
        n = float(w.shape[1])
        cols: dict[str, np.ndarray] = {f"clip/agc/ratio/{k}": overall["quantiles"][j] for j, k in enumerate(QUANTILES)}
        cols["clip/agc/ratio/max"] = overall["max"]
        cols["clip/agc/ratio/mean"] = overall["mean"]
        cols["clip/agc/units"] = np.full(len(steps), n)
        cols["clip/agc/floored"] = overall["floored"]
        cols["clip/agc/frac_floored"] = overall["floored"] / n
        if self.agc_clip is not None:
            cols["clip/agc/frac_clipped"] = overall["clipped"] / n
            cols["clip/agc/min_scale"] = overall["min_scale"]
        sugg = overall["quantiles"][len(_LEVELS) :]  # L x K
        med = np.full_like(sugg, np.nan)
        for k in range(len(steps)):
            if np.all(np.isfinite(sugg[:, k])):
                rows = self._agc_levels.add(sugg[:, k])
                med[:, k] = sorted_quantiles(np.sort(rows, axis=0), [0.5])[0]
        for j, lv in enumerate(self.suggest):
            cols[f"clip/suggest/agc/{_level_name(lv)}"] = med[j]
        if per is not None:
            for i, name in enumerate(names):
                for j, k in enumerate(PER_PARAM_LEVELS):
                    cols[f"clip/agc/{name}/ratio/{k}"] = per["quantiles"][i, j]
                cols[f"clip/agc/{name}/ratio/max"] = per["max"][:, i]
                cols[f"clip/agc/{name}/floored"] = per["floored"][:, i]
                if self.agc_clip is not None:
                    cols[f"clip/agc/{name}/frac_clipped"] = per["clipped"][:, i] / sizes[i]
                    cols[f"clip/agc/{name}/min_scale"] = per["min_scale"][:, i]
        out = {}
        for tag, col in cols.items():
            for step, v in zip(steps, col.tolist(), strict=True):
                if v == v or not tag.startswith("clip/suggest/"):  # no suggestion from non-finite ratios
                    out[(step, tag)] = v
        return out

    # --- per-sample -----------------------------------------------------------------------------------
    def _per_sample(self, record) -> dict[str, float]:
        out: dict[str, float] = {}
        gram = record.per_sample_gram
        sq = record.per_sample_sq_norms
        if sq is None and gram is not None:
            sq = np.diag(gram)
        if sq is None or len(sq) == 0:
            return out
        norms = np.sort(np.sqrt(np.maximum(np.asarray(sq, dtype=np.float64), 0.0)))
        levels = sorted_quantiles(norms, self.suggest)
        if np.all(np.isfinite(levels)):
            rows = self._ps_levels.add(levels)
            med = sorted_quantiles(np.sort(rows, axis=0), [0.5])[0]
            out.update(
                {f"clip/suggest/per_sample/{_level_name(q)}": float(v) for q, v in zip(self.suggest, med, strict=True)}
            )
        if self.per_sample_clip is None:
            return out
        f = clip_factors(norms, self.per_sample_clip)[::-1]  # ascending, as the norms are
        out["clip/per_sample/frac_clipped"] = float(np.mean(f < 1.0))
        qs = sorted_quantiles(f, _LEVELS)
        out.update({f"clip/per_sample/factor/{k}": float(v) for k, v in zip(QUANTILES, qs, strict=True)})
        out["clip/per_sample/factor/min"] = float(f[0])
        out["clip/per_sample/factor/max"] = float(f[-1])
        out["clip/per_sample/factor/mean"] = float(f.mean())
        if gram is not None:
            sqn = np.sqrt(np.maximum(np.asarray(sq, dtype=np.float64), 0.0))
            cos, ratio = clipped_mean_cosine(gram, clip_factors(sqn, self.per_sample_clip))
            out["clip/per_sample/cosine"] = cos
            out["clip/per_sample/norm_ratio"] = ratio
        return out

    # --- plain language -------------------------------------------------------------------------------
    def verdicts(self) -> list[str]:
        out = []
        norms = self._global_norms.buf[: self._global_norms.n, 0]
        if self.max_norm is not None and len(norms) >= 10:
            frac = float(np.mean(self.max_norm / (norms + NORM_EPS) < 1.0))
            med = float(np.median(norms))
            if frac > 0.9:
                out.append(
                    f"clipping: max_norm={self.max_norm:g} clipped {frac:.0%} of the last {len(norms)} steps "
                    f"(median gradient norm {med:.3g}): it rescales almost every step, acting as a fixed step "
                    "length rather than a guard against spikes"
                )
            elif frac == 0.0:
                out.append(
                    f"clipping: max_norm={self.max_norm:g} clipped none of the last {len(norms)} steps (median "
                    f"gradient norm {med:.3g})"
                )
        return out
