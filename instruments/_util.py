"""Small helpers shared by the built-in instruments."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

QUANTILES = {"p5": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95}
_LEVELS = list(QUANTILES.values())


def quantile_records(prefix: str, values: np.ndarray) -> dict[str, float]:
    """``{prefix/p5: ..., prefix/p50: ..., prefix/max: ...}``; NaN-safe (NaNs propagate, no crash)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {}
    qs = sorted_quantiles(np.sort(v), _LEVELS).tolist()
    out = {f"{prefix}/{k}": q for k, q in zip(QUANTILES, qs, strict=True)}
    out[f"{prefix}/max"] = float(np.maximum.reduce(v, axis=None))  # (v.max(), v.mean() without their
    out[f"{prefix}/mean"] = float(np.add.reduce(v, axis=None)) / v.size  # Python wrappers: the same numbers)
    return out


def sorted_quantiles(s: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    """numpy's default ("linear") quantiles of data already sorted along axis 0 (NaNs sort last and
    make the result NaN), without ``np.quantile``'s per-call overhead."""
    n = s.shape[0]
    pos = np.asarray(levels, dtype=np.float64) * (n - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    t = (pos - lo).reshape((-1,) + (1,) * (s.ndim - 1))
    out = s[lo] + (s[hi] - s[lo]) * t
    return np.where(np.isnan(s[-1]), np.nan, out)


def uncovered_note(record: Any, subject: str, describes: str) -> str | None:
    """The note of a statistic over per-sample gradients when some parameters with a gradient have none
    (``record.per_sample_uncovered``: their share of sum_p ||p.grad||^2), else None. ``subject`` is
    "the tests are", ``describes`` "they describe" (the sentence's own words)."""
    if not record.per_sample_uncovered:
        return None
    share = sum(record.per_sample_uncovered.values())
    return (
        f"{subject} over the parameters with per-sample statistics only ({share:.1%} of ||p.grad||^2 is in "
        f"parameters left out): {describes} that part of the gradient"
    )


def refuse_state(instrument: str, what: str, fix: str) -> ValueError:
    """The error for a saved state that does not fit this instrument (another model, other settings)."""
    return ValueError(f"{instrument}.load_state_dict: {what}. {fix}")
