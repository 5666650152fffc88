"""The step record: everything the core computed for one optimizer step, handed to instruments."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from cockpit_lite.compat import foreach_norm


@dataclass
class StepRecord:
    """What happened in optimizer step ``step`` (0-based count of ``optimizer.step()`` calls).

    Per-sample gradients g_i are the gradients of the per-sample losses l_i, whatever the reduction:
    for ``reduction="mean"`` the mini-batch gradient is ``p.grad = (1/B) sum_i g_i``, for ``"sum"`` it is
    ``sum_i g_i``. Fields stay ``None`` when no instrument asked for them or they could not be
    computed; ``notes`` then says why.
    """

    step: int
    batch_size: int | None = None
    reduction: str | None = None
    loss: float | None = None
    per_sample_loss: np.ndarray | None = None
    lrs: list[float] = field(default_factory=list)
    #: live parameters by name (read them, never write them)
    params: dict[str, torch.nn.Parameter] = field(default_factory=dict)
    grad_norms: dict[str, float] | None = None
    #: ||p.grad|| right after backward, divided by ``backward_scale``
    backward_grad_norms: dict[str, float] | None = None
    #: the factor backward started from: 1 for ``loss.backward()``, the loss scale under AMP's GradScaler
    #: (``p.grad`` read in ``on_after_backward`` is that many times the gradient of the loss module)
    backward_scale: float | None = None
    #: d = theta_{t+1} - theta_t by name. The tensors are buffers the core reuses at the next tracked
    #: step: read them in ``compute``; copy what must outlive the step.
    update: dict[str, torch.Tensor] | None = None
    per_sample_sq_norms: np.ndarray | None = None
    per_sample_sq_norms_by_param: dict[str, np.ndarray] | None = None
    per_sample_dot_mean: np.ndarray | None = None  #: g_i . gbar, gbar = mean_j g_j
    mean_grad_sq_norm: float | None = None  #: ||gbar||^2 (with per_sample_dot_mean)
    per_sample_gram: np.ndarray | None = None
    per_sample_gram_by_param: dict[str, np.ndarray] | None = None
    per_sample_grads: dict[str, torch.Tensor] | None = None
    projections: dict[str, np.ndarray] = field(default_factory=dict)
    indices: np.ndarray | None = None  #: dataset indices of the batch (``cockpit.track(loader)``)
    dataset_size: int | None = None  #: len of the tracked loader's dataset (``cockpit.track(loader)``)
    #: per-layer per-sample gradient views (``Need.PER_SAMPLE_CROSS``), between backward and the step
    views: list | None = None
    loss_fn: torch.nn.Module | None = None  #: the loss module the cockpit watches
    logdir: str | None = None  #: the run's log directory, if any
    notes: list[str] = field(default_factory=list)
    _update_norms: dict[str, float] | None = field(default=None, repr=False)

    @staticmethod
    def global_norm(norms: dict[str, float] | None) -> float | None:
        if norms is None:
            return None
        return float(np.sqrt(sum(v * v for v in norms.values())))

    @property
    def grad_norm(self) -> float | None:
        return self.global_norm(self.grad_norms)

    @property
    def update_norms(self) -> dict[str, float] | None:
        """||d|| per tensor, computed once per step for every instrument that asks."""
        if self.update is None:
            return None
        if self._update_norms is None:
            names = list(self.update)
            norms = (
                torch.stack(foreach_norm([self.update[n] for n in names])).double().cpu().tolist()
                if names
                else []
            )
            self._update_norms = dict(zip(names, norms, strict=True))
        return self._update_norms
