"""Sharpness: the largest eigenvalue of the loss Hessian on the step's batch, next to the stability limit
of the optimizer (edge of stability: Cohen et al. 2021, 2022; REFERENCE.md section 8).

At a measured step t (every ``every``-th step, default 100), at theta_t and on batch t, before the
optimizer step:

- SGD (learning rate eta, heavy-ball momentum beta, dampening tau): lambda_max(H) next to the limit
  (2 + 2 beta) / ((1 - tau) eta), which is 2 / eta for plain gradient descent; with Nesterov momentum
  (2 + 2 beta) / ((1 + 2 beta) eta) (Cohen et al. 2021, appendix).
- Adam / AdamW (beta1, beta2, eps): the preconditioned sharpness lambda_max(P_t^-1 H) next to
  (2 + 2 beta1) / ((1 - beta1) eta), 38 / eta for beta1 = 0.9 (Cohen et al. 2022), with
  P_t = (1 - beta1^t) diag(sqrt(v_hat_t) + eps), v_hat_t = v_t / (1 - beta2^t) and
  v_t = beta2 v_{t-1} + (1 - beta2) g_t^2 the second moment the coming step will use (t counts Adam's
  steps from 1; g_t = p.grad as the optimizer gets it, plus wd * theta for Adam's coupled weight decay;
  AMSGrad uses max(v_max, v_t)).
- Parameter groups with different learning rates eta_g: the operator is D^1/2 A D^1/2 with
  D = diag(eta_g / eta) and eta the largest group learning rate (A = H, or P^-1/2 H P^-1/2), and the
  limit is taken at eta. Groups with eta_g = 0 drop out.
- Another optimizer: lambda_max(H) without a limit (NaN), and a note.

lambda_max is the largest algebraic eigenvalue of the symmetric operator A = S H S (S = D^1/2 or
(D P^-1)^1/2, whose eigenvalues are those of D P^-1 H). Power iteration on Hessian-vector products
(``torch.autograd.grad`` of g . v, g from ``create_graph=True``) converges to the eigenvalue of largest
magnitude; if that one is negative, a second run on A - mu I (mu the negative one) finds the
largest algebraic one. Each run: at most ``iterations`` products, stopped when the Rayleigh quotient
changes by less than ``tol`` relative; the start vector is drawn from a ``torch.Generator`` seeded
with ``seed + step`` (the global random stream is untouched).

The loss is recomputed at theta_t by the ``"replay"`` need (cockpit_lite/providers/replay.py): the
training run is bit-identical with and without this instrument.

Verdict: with r = lambda_max / limit at each measurement, "at the edge of stability since step s" once
r >= ``edge`` (0.9) at ``patience`` (3) consecutive measurements (s the first of them); "approaching"
while fewer; else "below" (r >= 0.5) or "well below" (r < 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from cockpit_lite import Instrument, StepRecord
from cockpit_lite.compat import cut_second_derivative
from cockpit_lite.panels import LinePanel
from cockpit_lite.pause import paused
from cockpit_lite.providers.replay import REPLAY, ReplayMismatch

#: below this ratio lambda_max / limit the verdict says "well below"
WELL_BELOW = 0.5


def top_eigenvalue(
    matvec: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    start: list[torch.Tensor],
    iterations: int = 20,
    tol: float = 1e-3,
    shift: float = 0.0,
) -> tuple[float, int, bool]:
    """Power iteration on the symmetric operator ``v -> matvec(v) - shift v`` (vectors as lists of
    tensors). Returns (Rayleigh quotient of the operator, products used, converged): the eigenvalue of
    largest magnitude once converged; stops when |q_k - q_{k-1}| <= tol |q_k|."""
    v = _normalized(start)
    q_prev, used = math.nan, 0
    for _ in range(iterations):
        w = matvec(v)
        used += 1
        if shift:
            w = [a - shift * b for a, b in zip(w, v, strict=True)]
        q = float(sum((a * b).sum() for a, b in zip(w, v, strict=True)))
        norm = _norm(w)
        if not math.isfinite(q) or norm == 0.0:
            return q, used, norm == 0.0
        if math.isfinite(q_prev) and abs(q - q_prev) <= tol * abs(q):
            return q, used, True
        q_prev, v = q, [a / norm for a in w]
    return q_prev, used, False


def _norm(v: list[torch.Tensor]) -> float:
    return math.sqrt(float(sum((a.double() ** 2).sum() for a in v)))


def _normalized(v: list[torch.Tensor]) -> list[torch.Tensor]:
    n = _norm(v)
    return [a / n for a in v]


def largest_eigenvalue(
    matvec: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    start: list[torch.Tensor],
    iterations: int = 20,
    tol: float = 1e-3,
) -> tuple[float, int, bool]:
    """The largest algebraic eigenvalue of a symmetric operator: power iteration, then, if the
    dominant eigenvalue mu is negative, power iteration on A - mu I (whose spectrum is >= 0 and whose
    top eigenvalue is lambda_max - mu). Returns (lambda_max, products used in all, converged)."""
    mu, used, ok = top_eigenvalue(matvec, start, iterations, tol)
    if not (math.isfinite(mu) and mu < 0):
        return mu, used, ok
    nu, more, ok2 = top_eigenvalue(matvec, start, iterations, tol, shift=mu)
    return nu + mu, used + more, ok and ok2


def stability_limit(optimizer: torch.optim.Optimizer) -> tuple[str, float, float | None, str | None]:
    """(kind, reference learning rate eta, limit, note): kind "sgd", "adam" or "other"; eta the largest
    group learning rate; the limit as in the module docstring (None for "other")."""
    groups = [g for g in optimizer.param_groups if float(g.get("lr", 0.0)) > 0]
    if not groups:
        return "other", 0.0, None, "every parameter group has learning rate 0"
    top = max(groups, key=lambda g: float(g["lr"]))
    lr = float(top["lr"])
    if isinstance(optimizer, torch.optim.SGD):
        beta = float(top.get("momentum", 0.0))
        tau = float(top.get("dampening", 0.0)) if beta else 0.0  # dampening acts on the momentum buffer only
        if top.get("nesterov", False):
            return "sgd", lr, (2 + 2 * beta) / ((1 + 2 * beta) * lr), None
        return "sgd", lr, (2 + 2 * beta) / ((1 - tau) * lr) if tau < 1 else math.inf, None
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        beta1 = float(top["betas"][0])
        return "adam", lr, (2 + 2 * beta1) / ((1 - beta1) * lr), None
    return "other", lr, None, f"no stability limit is known for {type(optimizer).__name__}: lambda_max(H) alone"


def adam_preconditioner(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter, group: Mapping) -> torch.Tensor:
    """P_t = (1 - beta1^t) (sqrt(v_hat_t) + eps) for ``param`` (elementwise), with the second moment
    the coming Adam step will use (module docstring)."""
    beta1, beta2 = (float(b) for b in group["betas"])
    eps = float(group["eps"])
    state = optimizer.state.get(param, {})
    t = float(state["step"]) + 1 if "step" in state else 1.0
    g = param.grad.detach()
    wd = float(group.get("weight_decay", 0.0))
    decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
    if wd and not decoupled:
        g = g + wd * param.detach()
    v_prev = state.get("exp_avg_sq")
    v = (1 - beta2) * g * g if v_prev is None else beta2 * v_prev + (1 - beta2) * g * g
    if group.get("amsgrad", False) and state.get("max_exp_avg_sq") is not None:
        v = torch.maximum(state["max_exp_avg_sq"], v)
    v_hat = v / (1 - beta2**t)
    return (1 - beta1**t) * (v_hat.sqrt() + eps)


class Sharpness(Instrument):
    """lambda_max of the loss Hessian (preconditioned for Adam) next to the optimizer's stability limit.

    Args:
        every: measure every ``every``-th step (default 100; each measurement costs up to
            ``iterations`` Hessian-vector products, about 2 x iterations backward passes).
        iterations: the most Hessian-vector products per power-iteration run (default 20).
        tol: stop when the Rayleigh quotient changes by at most ``tol`` relative (default 1e-3).
        seed: the start vector of step t is drawn from ``torch.Generator().manual_seed(seed + t)``.
        edge: the ratio lambda_max / limit from which a measurement counts as at the edge (0.9).
        patience: consecutive measurements at the edge before the verdict says so (3).
    """

    READS_VALUES_IN_HOOKS = False  # (its hook reads parameters and fields filled at once: no flush for it)

    NEEDS = frozenset({REPLAY})
    TAGS = {
        "sharpness/lambda_max": "largest eigenvalue of the Hessian (of P^-1 H for Adam) on the step's batch",
        "sharpness/limit": "the stability limit: (2 + 2 beta)/eta for SGD, (2 + 2 beta1)/((1 - beta1) eta) for Adam",
        "sharpness/ratio": "lambda_max / limit (1 = at the edge of stability)",
        "sharpness/iterations": "Hessian-vector products used",
        "sharpness/converged": "1 if the power iteration met its tolerance, else 0",
        "verdict/sharpness": "the edge-of-stability verdict (text)",
    }
    PANELS = (
        LinePanel(
            "Sharpness and the stability limit",
            ["sharpness/lambda_max", "sharpness/limit"],
            ylabel="eigenvalue",
            labels=["lambda_max", "stability limit (2/lr for GD, 38/lr for Adam)"],
            log=True,
        ),
    )
    CHARTS = {
        "Stability": {
            "sharpness: lambda_max and the limit": ["Multiline", ["^sharpness/lambda_max$", "^sharpness/limit$"]],
            "sharpness: lambda_max / limit": ["Multiline", ["^sharpness/ratio$"]],
        }
    }
    SUMMARY = (
        ("sharpness/lambda_max", "lambda_max of the Hessian (preconditioned for Adam)"),
        ("sharpness/ratio", "lambda_max / stability limit"),
    )
    ORDER = 75.0
    PLACEHOLDER = False  # shown only in runs that have it

    def __init__(
        self,
        every: int = 100,
        iterations: int = 20,
        tol: float = 1e-3,
        seed: int = 0,
        edge: float = 0.9,
        patience: int = 3,
        **kw: Any,
    ):
        super().__init__(every=every, **kw)
        if iterations < 1 or patience < 1 or not tol >= 0 or not edge > 0:
            raise ValueError("Sharpness: iterations and patience must be >= 1, tol >= 0 and edge > 0")
        self.iterations, self.tol, self.seed, self.edge, self.patience = iterations, tol, seed, edge, patience
        self.optimizer: torch.optim.Optimizer | None = None
        self._result: dict[str, Any] | None = None
        self._streak_start: int | None = None  # first step of the current run of measurements at the edge
        self._streak = 0
        self._last: tuple[int, float, float] | None = None  # (step, lambda_max, limit)
        self._named: dict[str, torch.nn.Parameter] = {}

    def on_attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._named = dict(model.named_parameters())

    # --- measurement ------------------------------------------------------------------------------------
    def on_before_step(self, record: StepRecord) -> None:
        self._result = None
        replay = record.get(REPLAY)
        if replay is None:
            return  # the provider's note says why
        assert self.optimizer is not None
        kind, lr, limit, why = stability_limit(self.optimizer)
        if why:
            self.note(why)
        params, scales = self._scales(kind, lr)
        if not params:
            self.note("no parameter with a learning rate > 0 and a gradient")
            return
        try:
            lam, used, ok = self._measure(replay, params, scales, record.step)
        except ReplayMismatch as e:
            self.note(str(e))
            return
        except RuntimeError as e:  # an op of the model without a second derivative (a custom Function's)
            self.note(
                f"Hessian-vector products failed ({e}): an op of the model has no second derivative (a custom "
                "autograd Function marked once_differentiable, for one); lambda_max is left out"
            )
            return
        self._result = {"lambda_max": lam, "limit": math.nan if limit is None else limit, "iterations": used, "ok": ok}

    def _measure(self, replay: Any, params: list, scales: list, step: int) -> tuple[float, int, bool]:
        """(lambda_max, products used, converged) on the recomputed loss's gradient."""
        with paused():
            _, grads = replay.gradient(params)
        if cut_second_derivative(grads):  # products through that op would silently miss what lies before it
            raise RuntimeError("the gradient's graph passes an op marked once_differentiable")
        # a parameter whose gradient does not depend on theta has zero rows and columns in H: left out
        pairs = [(p, g, s) for p, g, s in zip(params, grads, scales, strict=True) if g is not None and g.requires_grad]
        return self._power_iteration(pairs, step) if pairs else (0.0, 0, True)

    def _power_iteration(self, pairs: list[tuple], step: int) -> tuple[float, int, bool]:
        """lambda_max of A = S H S by :func:`largest_eigenvalue`; ``pairs``: (parameter, its gradient with
        a graph, its S)."""
        params, grads, scales = zip(*pairs, strict=True)

        def matvec(v: list[torch.Tensor]) -> list[torch.Tensor]:
            with paused():
                hv = torch.autograd.grad(
                    grads,
                    params,
                    grad_outputs=[s * x for s, x in zip(scales, v, strict=True)],
                    retain_graph=True,
                    allow_unused=True,
                )
            if any(h is None for h in hv):
                # a gradient with a graph that reaches no parameter: an op's backward ran without one (a custom
                # Function marked once_differentiable, or one that detaches): H v would be silently partial
                cut = [n for n, h in zip(self._names(params), hv, strict=True) if h is None]
                raise RuntimeError(f"the Hessian-vector product does not reach {', '.join(cut[:5])}")
            return [s * h.detach() for s, h in zip(scales, hv, strict=True)]

        gen = torch.Generator().manual_seed(self.seed + step)
        start = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype) for p in params]
        return largest_eigenvalue(matvec, start, self.iterations, self.tol)

    def _names(self, params: Sequence[torch.nn.Parameter]) -> list[str]:
        """The parameters' names in the model (their positions where no name is known)."""
        names = {id(p): n for n, p in self._named.items()}
        return [names.get(id(p), f"parameter {k}") for k, p in enumerate(params)]

    def _scales(self, kind: str, lr: float) -> tuple[list[torch.nn.Parameter], list[torch.Tensor | float]]:
        """The parameters measured and S (per element) with A = S H S."""
        assert self.optimizer is not None
        params, scales = [], []
        for group in self.optimizer.param_groups:
            ratio = float(group.get("lr", 0.0)) / lr if lr > 0 else 1.0
            if ratio <= 0:
                continue
            for p in group["params"]:
                if not p.requires_grad or p.grad is None:
                    continue
                params.append(p)
                if kind == "adam":
                    scales.append((ratio / adam_preconditioner(self.optimizer, p, group)).sqrt())
                else:
                    scales.append(math.sqrt(ratio))
        return params, scales

    def compute(self, record: StepRecord) -> dict[Any, Any]:
        result, self._result = self._result, None
        if result is None:
            return {}
        lam, limit = result["lambda_max"], result["limit"]
        out: dict[Any, Any] = {
            self.tag("sharpness/lambda_max"): lam,
            self.tag("sharpness/limit"): limit,
            self.tag("sharpness/iterations"): float(result["iterations"]),
            self.tag("sharpness/converged"): float(result["ok"]),
        }
        if not result["ok"]:
            self.note(f"the power iteration did not converge to {self.tol:g} in {self.iterations} products")
        if math.isfinite(limit) and math.isfinite(lam):
            ratio = lam / limit
            out[self.tag("sharpness/ratio")] = ratio
            if ratio >= self.edge:
                self._streak_start = record.step if self._streak == 0 else self._streak_start
                self._streak += 1
            else:
                self._streak, self._streak_start = 0, None
            self._last = (record.step, lam, limit)
            out[self.tag("verdict/sharpness")] = self._verdict()
        return out

    # --- verdict ----------------------------------------------------------------------------------------
    def _verdict(self) -> str:
        assert self._last is not None
        step, lam, limit = self._last
        ratio = lam / limit
        where = f"lambda_max {lam:.4g} = {ratio:.2f} x the limit {limit:.4g} at step {step}"
        if self._streak >= self.patience:
            return (
                f"at the edge of stability since step {self._streak_start} ({where}; >= {self.edge:g} x the limit at "
                f"{self._streak} consecutive measurements): the learning rate sets the sharpness"
            )
        if self._streak > 0:
            return f"approaching the edge of stability ({where}; {self._streak} of {self.patience} measurements)"
        if ratio < WELL_BELOW:
            return f"well below the stability limit ({where})"
        return f"below the stability limit ({where})"

    def verdicts(self) -> list[str]:
        """The edge-of-stability verdict after the last measurement with a limit."""
        return [] if self._last is None else [f"sharpness: {self._verdict()}"]

    # --- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``last`` (step, lambda_max, limit of the last measurement with a limit, or None), ``streak``
        (consecutive measurements at the edge) and ``streak_start`` (the first of them)."""
        return {
            "last": None if self._last is None else [int(self._last[0]), float(self._last[1]), float(self._last[2])],
            "streak": int(self._streak),
            "streak_start": self._streak_start,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        last: Sequence | None = state["last"]
        self._last = None if last is None else (int(last[0]), float(last[1]), float(last[2]))
        self._streak = int(state["streak"])
        self._streak_start = None if state["streak_start"] is None else int(state["streak_start"])
