"""When to do an expensive periodic job (rendering the dashboard) without slowing training down."""

from __future__ import annotations

import time


class Throttle:
    """Due when at least ``every_steps`` tracked steps AND ``every_s`` seconds have passed since the
    last run, and the last run's cost is at most ``max_share`` of the time since it (so a job that
    takes 0.8 s with ``max_share=0.02`` runs at most every 40 s, whatever the other settings).

    The clock starts when the throttle is created: the first run is due ``every_s`` seconds later.
    """

    def __init__(self, every_steps: int = 1, every_s: float = 0.0, max_share: float | None = 0.02):
        if every_steps < 1:
            raise ValueError(f"every_steps={every_steps} must be >= 1")
        if every_s < 0:
            raise ValueError(f"every_s={every_s} must be >= 0")
        if max_share is not None and not 0 < max_share <= 1:
            raise ValueError(f"max_share={max_share} must be in (0, 1] (a fraction of the training time) or None")
        self.every_steps, self.every_s, self.max_share = every_steps, every_s, max_share
        self.steps = 0
        self.last_t = time.perf_counter()
        self.last_cost = 0.0

    def tick(self) -> bool:
        """Count one tracked step; True when the job is due now."""
        self.steps += 1
        if self.steps < self.every_steps:
            return False
        waited = time.perf_counter() - self.last_t
        if waited < self.every_s:
            return False
        return self.max_share is None or self.last_cost <= self.max_share * waited

    def done(self, cost_s: float) -> None:
        """The job ran and took ``cost_s`` seconds."""
        self.steps = 0
        self.last_t = time.perf_counter()
        self.last_cost = cost_s
