"""Clipping: how much global, adaptive (AGC) and per-sample (DP-style) gradient clipping would do, or does.

Three kinds, each measured on the gradient as backward left it (before any clipping the loop does):

- global (``torch.nn.utils.clip_grad_norm_``): the norm ||g|| after backward, the norm the optimizer
  receives (so clipping done by the loop is seen), and for a threshold ``max_norm`` whether it clips,
  the clip coefficient min(1, max_norm / (||g|| + 1e-6)) and the rolling fraction of clipped steps.
- AGC (Brock, De, Smith, Simonyan 2021, arXiv:2102.06171): per unit i (a row of a Linear weight, an
  output filter of a conv; biases and gains as a whole) the ratio r_i = ||G_i|| / max(||W_i||, eps); for
  a threshold lambda the fraction of units with r_i >= lambda (those :func:`instruments.agc.clip_`
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
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection, Iterable

import numpy as np
import torch

from cockpit_lite import Instrument, Need, Needs
from instruments._util import quantile_records
from instruments.agc import GRAD_NORM_FLOOR, check_positive, final_layer, unitwise_norm

KINDS = ("global", "agc", "per_sample")
#: the 1e-6 that torch's clip_grad_norm_ and Opacus add to the norm in the clip coefficient
NORM_EPS = 1e-6


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
            only when ``per_sample_clip`` is given).
        agc_exclude: parameters left out of the AGC statistics: ``"final"`` (the final layer, as the
            paper leaves the classifier unclipped; see :func:`instruments.agc.final_layer`), or a
            collection of parameter names (empty: every parameter).
        suggest: quantile levels in (0, 1) for the threshold suggestions (0.9: clips 10%).
        per_param: also emit the AGC statistics of each parameter tensor.

    Tags: ``clip/global/...``, ``clip/agc/...`` (``clip/agc/<param>/...`` per tensor),
    ``clip/per_sample/...``, ``clip/suggest/...`` (docs/clipping.md, docs/tags.md).
    """

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
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"Clipping: window={window!r} must be a positive integer (number of steps)")
        self.window = window
        self.suggest = tuple(float(q) for q in suggest)
        if not all(0 < q < 1 for q in self.suggest) or len(set(map(_level_name, self.suggest))) != len(self.suggest):
            raise ValueError(
                f"Clipping: suggest={suggest!r} must be distinct quantile levels in (0, 1), e.g. (0.5, 0.9)"
            )
        if isinstance(agc_exclude, str) and agc_exclude != "final":
            raise ValueError(f'Clipping: agc_exclude={agc_exclude!r}: use "final" or a collection of parameter names')
        self.agc_exclude = agc_exclude if isinstance(agc_exclude, str) else frozenset(agc_exclude)
        self.per_param = per_param
        self.excluded: frozenset[str] = frozenset()
        self._global_norms: deque[float] = deque(maxlen=window)
        self._global_clipped: deque[bool] = deque(maxlen=window)
        self._agc_levels: deque[np.ndarray] = deque(maxlen=window)
        self._ps_levels: deque[np.ndarray] = deque(maxlen=window)
        self._agc: tuple[list[str], list[int], torch.Tensor, torch.Tensor] | None = None

    # --- core contract ------------------------------------------------------------------------------
    def requires(self, step: int) -> Needs:
        if not self.scheduled(step):
            return Needs()
        flags: set[Need] = set()
        if "global" in self.kinds:
            flags |= {Need.BACKWARD_GRAD_NORMS, Need.GRAD_NORMS}
        if "per_sample" in self.kinds:
            flags.add(Need.PER_SAMPLE_SQ_NORMS)
            if self.per_sample_clip is not None:
                flags.add(Need.PER_SAMPLE_GRAM)
        return Needs(flags)

    def on_attach(self, model, optimizer) -> None:
        names = {n for n, _ in model.named_parameters()}
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
        names, sizes, wn, gn = [], [], [], []
        for name, p in record.params.items():
            if p.grad is None or name in self.excluded:
                continue
            w = unitwise_norm(p.detach()).reshape(-1)
            g = unitwise_norm(p.grad.detach()).reshape(-1)
            names.append(name)
            sizes.append(w.numel())
            wn.append(w)
            gn.append(g)
        if names:
            self._agc = (names, sizes, torch.cat(wn), torch.cat(gn))

    def compute(self, record):
        out: dict[str, float] = {}
        if "global" in self.kinds:
            out.update(self._global(record))
        if "agc" in self.kinds:
            out.update(self._agc_stats())
        if "per_sample" in self.kinds:
            out.update(self._per_sample(record))
        return {self.tag(k): v for k, v in out.items()}

    # --- global ---------------------------------------------------------------------------------------
    def _global(self, record) -> dict[str, float]:
        out: dict[str, float] = {}
        if not record.backward_grad_norms:
            return out
        norm = record.global_norm(record.backward_grad_norms)
        out["clip/global/norm"] = norm
        received = record.grad_norm if record.grad_norms else None
        if received is not None:
            out["clip/global/received_norm"] = received
            out["clip/global/received_ratio"] = received / norm if norm > 0 else float("nan")
        if not math.isfinite(norm):
            record.notes.append(f"clipping: non-finite gradient norm {norm}; left out of the rolling statistics")
            return out
        self._global_norms.append(norm)
        if self.max_norm is not None:
            coef = min(1.0, self.max_norm / (norm + NORM_EPS))
            self._global_clipped.append(coef < 1.0)
            out["clip/global/coef"] = coef
            out["clip/global/would_clip"] = float(coef < 1.0)
            out["clip/global/frac_clipped"] = float(np.mean(self._global_clipped))
        qs = np.quantile(np.asarray(self._global_norms), self.suggest)
        out.update({f"clip/suggest/global/{_level_name(q)}": float(v) for q, v in zip(self.suggest, qs, strict=True)})
        return out

    # --- AGC ------------------------------------------------------------------------------------------
    def _unit_stats(self, prefix: str, w: np.ndarray, g: np.ndarray) -> dict[str, float]:
        eps = self.agc_eps
        w_star = np.maximum(w, eps)
        ratio = g / w_star
        floored = w < eps
        out = quantile_records(f"{prefix}ratio", ratio)
        out[f"{prefix}units"] = float(w.size)
        out[f"{prefix}floored"] = float(floored.sum())
        out[f"{prefix}frac_floored"] = float(floored.mean())
        if self.agc_clip is not None:
            max_norm = self.agc_clip * w_star
            clipped = ~(g < max_norm)  # what agc.clip_ (and timm) rescale
            scale = np.where(clipped, max_norm / np.maximum(g, GRAD_NORM_FLOOR), 1.0)
            out[f"{prefix}frac_clipped"] = float(clipped.mean())
            out[f"{prefix}min_scale"] = float(scale.min())
        return out

    def _agc_stats(self) -> dict[str, float]:
        if self._agc is None:
            return {}
        names, sizes, wt, gt = self._agc
        self._agc = None
        w = wt.double().cpu().numpy()
        g = gt.double().cpu().numpy()
        out = self._unit_stats("clip/agc/", w, g)
        if self.per_param:
            start = 0
            for name, size in zip(names, sizes, strict=True):
                sl = slice(start, start + size)
                out.update(self._unit_stats(f"clip/agc/{name}/", w[sl], g[sl]))
                start += size
        ratio = g / np.maximum(w, self.agc_eps)
        if np.all(np.isfinite(ratio)):
            self._agc_levels.append(np.quantile(ratio, self.suggest))
            med = np.median(np.stack(self._agc_levels), axis=0)
            out.update({f"clip/suggest/agc/{_level_name(q)}": float(v) for q, v in zip(self.suggest, med, strict=True)})
        return out

    # --- per-sample -----------------------------------------------------------------------------------
    def _per_sample(self, record) -> dict[str, float]:
        out: dict[str, float] = {}
        gram = record.per_sample_gram
        sq = record.per_sample_sq_norms
        if sq is None and gram is not None:
            sq = np.diag(gram)
        if sq is None:
            return out
        norms = np.sqrt(np.maximum(np.asarray(sq, dtype=np.float64), 0.0))
        if np.all(np.isfinite(norms)):
            self._ps_levels.append(np.quantile(norms, self.suggest))
            med = np.median(np.stack(self._ps_levels), axis=0)
            out.update(
                {f"clip/suggest/per_sample/{_level_name(q)}": float(v) for q, v in zip(self.suggest, med, strict=True)}
            )
        if self.per_sample_clip is None:
            return out
        f = clip_factors(norms, self.per_sample_clip)
        out["clip/per_sample/frac_clipped"] = float(np.mean(f < 1.0))
        out.update(quantile_records("clip/per_sample/factor", f))
        out["clip/per_sample/factor/min"] = float(f.min())
        if gram is not None:
            cos, ratio = clipped_mean_cosine(gram, f)
            out["clip/per_sample/cosine"] = cos
            out["clip/per_sample/norm_ratio"] = ratio
        return out

    # --- plain language -------------------------------------------------------------------------------
    def verdicts(self) -> list[str]:
        out = []
        n = len(self._global_clipped)
        if self.max_norm is not None and n >= 10:
            frac = float(np.mean(self._global_clipped))
            med = float(np.median(self._global_norms))
            if frac > 0.9:
                out.append(
                    f"clipping: max_norm={self.max_norm:g} clipped {frac:.0%} of the last {n} steps (median "
                    f"gradient norm {med:.3g}): it rescales almost every step, acting as a fixed step length "
                    "rather than a guard against spikes"
                )
            elif frac == 0.0:
                out.append(
                    f"clipping: max_norm={self.max_norm:g} clipped none of the last {n} steps (median gradient "
                    f"norm {med:.3g})"
                )
        return out
