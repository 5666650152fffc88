"""UpdateSize and Distance: how far the parameters move per step and from where they started."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from cockpit_lite.instruments._util import refuse_state
from cockpit_lite.instruments.gradnorm import GRAD_AND_UPDATE

from cockpit_lite import Instrument, Need, host
from cockpit_lite.compat import foreach_difference, same_place, without_grad
from cockpit_lite.panels import LinePanel
from cockpit_lite.step import StepRecord


def _records(tag_fn, base: str, norms: Mapping[str, float], per_param: bool) -> dict[str, float]:
    tag = tag_fn(base)
    out = {tag: StepRecord.global_norm(norms)}
    if per_param:
        out.update({f"{tag}/{n}": v for n, v in norms.items()})
    return out


class UpdateSize(Instrument):
    """||theta_{t+1} - theta_t|| per tensor and globally, stored under step t (Cockpit's UpdateSize).

    Uses the actual update, so it covers every optimizer, clipping and weight decay.
    Tags: ``update_size``, ``update_size/<parameter name>``. Cost: a parameter snapshot (D floats).
    """

    TAGS = {"update_size": "||theta_{t+1} - theta_t||", "update_size/.+": "per parameter tensor"}
    PANELS = (GRAD_AND_UPDATE,)
    CHARTS = {"Step size": {"gradient norm and update size": ["Multiline", ["^grad_norm$", "^update_size$"]]}}
    SUMMARY = (("update_size", "update size"),)
    ORDER = 21.0

    NEEDS = frozenset({Need.UPDATE})

    def __init__(self, per_param: bool = True, **kw):
        super().__init__(**kw)
        self.per_param = per_param

    def compute(self, record):
        if record.update is None:
            return {}
        return _records(self.tag, "update_size", record.update_norms, self.per_param)


class Distance(Instrument):
    """||theta_t - theta_0|| per tensor and globally, theta_t the parameters before step t
    (Cockpit's Distance). Tags: ``distance``, ``distance/<parameter name>``.
    Cost: keeps theta_0 and a difference buffer (2 D floats).
    """

    READS_VALUES_IN_HOOKS = False  # (its hook reads parameters and fields filled at once: no flush for it)

    TAGS = {"distance": "||theta_t - theta_0||", "distance/.+": "per parameter tensor"}
    PANELS = (
        LinePanel(
            "Distance from the initial parameters",
            ["distance"],
            ylabel="||θ(t) − θ(0)||",
            labels=["all parameters"],
            log=False,
            missing="not tracked: add the Distance instrument (tag `distance`)",
            key="distance",
        ),
    )
    CHARTS = {"Step size": {"distance from the initial parameters": ["Multiline", ["^distance$"]]}}
    SUMMARY = (("distance", "distance from start"),)
    ORDER = 30.0

    def __init__(self, per_param: bool = True, **kw):
        super().__init__(**kw)
        self.per_param = per_param
        self._theta0: dict[str, torch.Tensor] = {}
        self._diff: dict[str, torch.Tensor] | None = None
        self._norms: Mapping[str, float] | None = None
        self._params: dict[str, torch.Tensor] | None = None
        self._loaded = False

    def on_attach(self, model, optimizer):
        current = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if self._loaded:  # a state loaded before attaching: keep its theta_0
            self._theta0 = self._placed(self._theta0, current)
        else:
            self._theta0 = {n: p.detach().clone() for n, p in current.items()}
        self._params = current

    # --- state (resuming a run) -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``theta0``: {parameter name: theta_0} (D floats, on the parameters' device)."""
        return {"theta0": dict(self._theta0)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore theta_0, moved to the parameters' device; refused if it does not fit the model."""
        theta0 = {str(n): t.detach().clone() for n, t in state["theta0"].items()}
        self._theta0 = self._placed(theta0, self._params) if self._params is not None else theta0
        self._diff = None
        self._loaded = True

    @staticmethod
    def _placed(theta0: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if theta0.keys() != params.keys() or any(theta0[n].shape != p.shape for n, p in params.items()):
            raise refuse_state(
                "Distance",
                f"the saved theta_0 holds parameters {sorted(theta0)}, the model trains {sorted(params)} "
                "(or they differ in shape)",
                "Load the state saved from this model, or leave 'distance' out of the state to measure the "
                "distance from the parameters at resumption.",
            )
        return Distance._moved(theta0, params)

    @staticmethod
    def _moved(theta0: dict[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """theta_0 on the device and in the dtype of the parameters of the same names."""
        return {n: t.to(params[n]) if n in params else t for n, t in theta0.items()}

    @without_grad
    def on_before_step(self, record):
        names = [n for n in record.params if n in self._theta0]
        if len(names) < len(record.params):
            # a tensor that starts training (unfrozen mid-run): measured from its value now, where it started
            self._theta0.update({n: p.detach().clone() for n, p in record.params.items() if n not in self._theta0})
            names, self._diff = list(record.params), None
        t0 = self._theta0[names[0]] if names else None
        if t0 is not None and not same_place(t0, record.params[names[0]]):
            # the model moved (model.to("cuda") after the cockpit was built): theta_0 follows it
            self._theta0 = self._moved(self._theta0, record.params)
            self._diff = None
        if self._diff is None or len(self._diff) != len(names):
            # one buffer for theta_t - theta_0, allocated once (no page faults per step); again for other tensors
            self._diff = {n: torch.empty_like(self._theta0[n]) for n in names}
        diff = [self._diff[n] for n in names]
        foreach_difference(diff, [record.params[n] for n in names], [self._theta0[n] for n in names])
        # (FSDP2: from the shards; otherwise the values come with the step's other numbers, one transfer)
        self._norms = host.norms(record.host, names, diff)

    def compute(self, record):
        if self._norms is None:
            return {}
        norms, self._norms = self._norms, None
        return _records(self.tag, "distance", norms, self.per_param)
