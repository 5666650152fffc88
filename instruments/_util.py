"""Small helpers shared by the built-in instruments."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

QUANTILES = {"p5": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95}
_LEVELS = list(QUANTILES.values())


@functools.cache
def _interpolation(n: int) -> tuple[tuple[int, int, float], ...]:
    """(lo, hi, t) of each of ``QUANTILES``' levels for n sorted values: numpy's "linear" method, as
    :func:`sorted_quantiles` computes them."""
    pos = np.asarray(_LEVELS, dtype=np.float64) * (n - 1)
    lo = np.floor(pos).astype(np.intp)
    return tuple(zip(lo.tolist(), np.minimum(lo + 1, n - 1).tolist(), (pos - lo).tolist(), strict=True))


def quantile_records(prefix: str, values: np.ndarray) -> dict[str, float]:
    """``{prefix/p5: ..., prefix/p50: ..., prefix/max: ..., prefix/mean: ...}`` of a 1-D array: numpy's
    default ("linear") quantiles, max and mean; NaN-safe (NaNs propagate, no crash). Written on the
    sorted values as Python floats: the same IEEE double operations as :func:`sorted_quantiles`, without
    a dozen numpy calls."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return {}
    s = np.sort(v).tolist()  # NaNs sort last
    nan = s[-1] != s[-1]
    out = {
        f"{prefix}/{k}": math.nan if nan else s[lo] + (s[hi] - s[lo]) * t
        for k, (lo, hi, t) in zip(QUANTILES, _interpolation(len(s)), strict=True)
    }
    out[f"{prefix}/max"] = s[-1]
    out[f"{prefix}/mean"] = float(np.add.reduce(v)) / v.size  # (v.mean() without its Python wrapper)
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
