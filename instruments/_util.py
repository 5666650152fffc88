"""Small helpers shared by the built-in instruments."""

from __future__ import annotations

import numpy as np

QUANTILES = {"p5": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95}


def quantile_records(prefix: str, values: np.ndarray) -> dict[str, float]:
    """``{prefix/p5: ..., prefix/p50: ..., prefix/max: ...}``; NaN-safe (NaNs propagate, no crash)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {}
    qs = np.quantile(v, list(QUANTILES.values()))
    out = {f"{prefix}/{k}": float(q) for k, q in zip(QUANTILES, qs, strict=True)}
    out[f"{prefix}/max"] = float(v.max())
    out[f"{prefix}/mean"] = float(v.mean())
    return out
