"""Layers whose tensors are computed by ``torch.nn.utils.parametrize`` (``parametrizations.weight_norm``,
``orthogonal``, ``spectral_norm``, or a parametrization of the user's), or by the older
``torch.nn.utils.weight_norm`` (a forward pre-hook that sets ``weight`` from ``weight_g`` and ``weight_v``) or
the older ``torch.nn.utils.spectral_norm`` (a forward pre-hook that sets ``weight`` = ``weight_orig`` / sigma,
sigma = u^T W_orig v with the u and v its power iteration left in the ``weight_u`` and ``weight_v`` buffers,
taken as constants, as its own forward does: Miyato et al. 2018, "Spectral Normalization for GANs").

A parametrized layer computes the tensor it uses, W = f(o_1, ..., o_k), from the parameters the optimizer
trains (the originals: ``parametrizations.weight.original0``, ...) at every call. Example i's loss l_i
depends on the originals only through W, so by the chain rule its gradient with respect to them is the
vector-Jacobian product of f at the current originals with its gradient with respect to W:

    g_i(o_j) = (dW/do_j)^T g_i(W)

g_i(W) comes from the handler of the layer's own class (the factor forms of Linear and Conv), formed as
B x |W| numbers, and one ``torch.func.vmap`` of f's ``vjp`` maps the B of them at once. f is evaluated in
eval mode (``spectral_norm``'s power iteration ran in the forward, whose u and v it then used: another
iteration would give another W and change the buffers), on the originals before the optimizer steps.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from cockpit_lite.compat import weight_norm
from cockpit_lite.persample.layers import FuncHandler, Handler, LayerLeftOut
from cockpit_lite.persample.views import MaterialisedView, View

#: g_i(W) is formed for the B examples: beyond this many bytes a parametrized layer is left out
FORMED_BYTES = 1 << 29


def parametrized_names(module: nn.Module, names: Mapping[str, str]) -> dict[str, list[tuple[str, str]]]:
    """{parametrized tensor (``"weight"``): [(original's local name, full name)]} of ``names`` (the module's
    local names to full names): ``parametrizations.weight.original0`` (local name ``original0``, in its
    ParametrizationList), or the older weight_norm's ``weight_g`` and ``weight_v`` (local names as they are)."""
    out: dict[str, list[tuple[str, str]]] = {}
    for local, full in names.items():
        parts = local.split(".")
        if len(parts) == 3 and parts[0] == "parametrizations":
            out.setdefault(parts[1], []).append((parts[2], full))
    for hook in _old_weight_norms(module):
        for suffix in ("_g", "_v"):
            if hook.name + suffix in names:
                out.setdefault(hook.name, []).append((hook.name + suffix, names[hook.name + suffix]))
    for hook in _old_spectral_norms(module):
        if hook.name + "_orig" in names:
            out.setdefault(hook.name, []).append((hook.name + "_orig", names[hook.name + "_orig"]))
    return out


#: the older forward pre-hooks that compute a layer's weight from its parameters before each call (they set
#: ``hook.name`` on the module): ``torch.nn.utils.weight_norm``'s and ``spectral_norm``'s
WEIGHT_HOOKS = (WeightNorm, SpectralNorm)


def _old_hooks(module: nn.Module, kind: type) -> list[Any]:
    """The forward pre-hooks of class ``kind`` on ``module``."""
    return [h for h in module._forward_pre_hooks.values() if isinstance(h, kind)]


def _old_weight_norms(module: nn.Module) -> list[Any]:
    return _old_hooks(module, WeightNorm)


def _old_spectral_norms(module: nn.Module) -> list[Any]:
    return _old_hooks(module, SpectralNorm)


def _old_spectral_buffers(module: nn.Module) -> list[torch.Tensor]:
    """The u and v of the older spectral_norm's hooks on ``module``."""
    return [getattr(module, h.name + suffix) for h in _old_spectral_norms(module) for suffix in ("_u", "_v")]


def _compute(module: nn.Module, tensor: str) -> tuple[dict[str, torch.Tensor], Any]:
    """The originals of ``tensor`` by local name, and f: {local name: tensor} -> the tensor the layer uses."""
    from torch.func import functional_call

    for hook in _old_weight_norms(module):
        if hook.name == tensor:
            g, v = f"{tensor}_g", f"{tensor}_v"
            return (
                {g: getattr(module, g).detach(), v: getattr(module, v).detach()},
                lambda o, g=g, v=v, dim=hook.dim: weight_norm(o[v], o[g], dim),
            )
    for hook in _old_spectral_norms(module):
        if hook.name == tensor:
            orig = f"{tensor}_orig"
            u, v = getattr(module, f"{tensor}_u").detach(), getattr(module, f"{tensor}_v").detach()

            def spectral(o, orig=orig, u=u, v=v, matrix=hook.reshape_weight_to_matrix):
                return o[orig] / torch.dot(u, torch.mv(matrix(o[orig]), v))

            return {orig: getattr(module, orig).detach()}, spectral
    plist = module.parametrizations[tensor]
    return {n: p.detach() for n, p in plist.named_parameters()}, lambda o: functional_call(plist, o, ())


class ParametrizedHandler(Handler):
    """Serves a parametrized layer through the handler of its own class (module docstring).

    ``names`` maps the layer's local names, its own parameters (``"bias"``) and the originals of its
    parametrized tensors (``"parametrizations.weight.original0"``), to full names. The inner handler is
    given the parametrized tensors under names of their own (``"<layer>.weight"``, no parameter's name),
    and its per-sample gradients of them become those of the originals in :meth:`view`.
    """

    def __init__(self, module: nn.Module, names: dict[str, str], inner_class: type):
        self.module, self.names = module, names
        # (a module without a layer rule: its torch.func replay takes the originals by their own names, the
        # layer's forward computing W from them: no chain rule, no parametrized tensors to map)
        replayed = issubclass(inner_class, FuncHandler)
        self.tensors = {} if replayed else parametrized_names(module, names)
        #: the inner handler's name of each parametrized tensor ("conv.weight": the layer's name from an
        #: original's full name)
        self.stand_in = {}
        for tensor, pairs in self.tensors.items():
            local, full = pairs[0]
            tail = f"parametrizations.{tensor}.{local}" if local.startswith("original") else local
            self.stand_in[tensor] = full[: -len(tail)] + tensor if full.endswith(tail) else f"{full}:{tensor}"
        originals = {full for pairs in self.tensors.values() for _, full in pairs}
        inner_names = {local: full for local, full in names.items() if full not in originals}
        inner_names.update(self.stand_in)
        self.inner = inner_class(module, inner_names)

    @property
    def refused(self) -> str | None:  # type: ignore[override]
        """The inner handler's refusal (set at attach, or by a failed check of its replay later)."""
        return self.inner.refused

    # --- what the engine asks at each call: the inner handler's answers ---------------------------------
    # (each with the parametrizations in eval mode: the inner handler may read the layer's weight, which
    # computes W again, and spectral_norm's power iteration must run in the user's forward alone)
    def check(self) -> None:
        with _eval(self.module):
            self.inner.check()

    def capture(self, args: tuple, kwargs: dict, output: Any) -> object:
        with _eval(self.module):
            return self.inner.capture(args, kwargs, output), self._versions()

    def _versions(self) -> list[int]:
        """The versions of the parametrizations' buffers (spectral_norm's u and v, updated in place by each
        train-mode evaluation of W): the W of a call is replayed only while they are those of its forward."""
        plists = getattr(self.module, "parametrizations", None)
        buffers = list(plists.buffers()) if plists is not None else _old_spectral_buffers(self.module)
        return [b._version for b in buffers]

    def _unchanged(self, captures: list) -> list:
        """The inner handler's captures, once the buffers are checked to be those each call's W used."""
        if any(versions != self._versions() for _, versions in captures):
            raise LayerLeftOut(
                f"the parametrization of this {_layer(self.module)} updated its buffers "
                "(spectral_norm's power iteration) after a call whose W the step used, before that call's "
                "backward: that W cannot be recomputed, so per-sample statistics leave its parameters out "
                "on this step (a call's forward followed by its backward is served)"
            )
        return [inner for inner, _ in captures]

    def ambiguous(self, args: tuple, kwargs: dict, output: Any, batch: int) -> bool:
        with _eval(self.module):
            return self.inner.ambiguous(args, kwargs, output, batch)

    def pre_forward(self, args: tuple, kwargs: dict) -> None:
        with _eval(self.module):
            self.inner.pre_forward(args, kwargs)

    def take_checks(self) -> list:
        return self.inner.take_checks()

    def weight_grad_node(self, outputs: list[torch.Tensor]) -> None:
        return None  # (the batch gradient of W is of no use: the originals' g_i are formed)

    def weight_grad(self, grad_inputs: Sequence[torch.Tensor | None]) -> None:
        return None

    # --- the step's per-sample gradients ---------------------------------------------------------------
    def single_view(self, capture: object, grad: torch.Tensor, batch: int, inv_scale: float) -> View | None:
        (inner,) = self._unchanged([capture])
        with _eval(self.module):
            view = self.inner.single_view(inner, grad, batch, inv_scale)
            return None if view is None else self._originals(view, batch)

    def view(self, captures: list, grads: list, batch: int, inv_scale: float) -> View:
        axes = self.__dict__.get("sample_axes")
        if axes is not None:  # (set by the engine around this call)
            self.inner.sample_axes = axes
        try:
            inner = self._unchanged(captures)
            with _eval(self.module):
                return self._originals(self.inner.view(inner, grads, batch, inv_scale), batch)
        finally:
            self.inner.__dict__.pop("sample_axes", None)

    def _originals(self, inner: View, batch: int) -> MaterialisedView:
        """The inner view's per-sample gradients, those of each parametrized tensor mapped to its originals."""
        grads = dict(inner.grads())
        out = {n: g for n, g in grads.items() if n not in self.stand_in.values()}
        for tensor, originals in self.tensors.items():
            g_w = grads.pop(self.stand_in[tensor])
            size = g_w.numel() * g_w.element_size()
            if size > FORMED_BYTES:
                layer = _layer(self.module)
                raise LayerLeftOut(
                    f"the per-sample gradients of a parametrized {layer}'s {tensor} are formed to reach its originals: "
                    f"{size / 2**20:.1f} MiB at this batch size, more than the {FORMED_BYTES / 2**20:.1f} MiB allowed; "
                    "use a smaller batch to get them"
                )
            per = _vjp_originals(
                *_compute(self.module, tensor), g_w.reshape(batch, *getattr(self.module, tensor).shape)
            )
            wanted = dict(originals)
            out.update({wanted[local]: g for local, g in per.items() if local in wanted})
        return MaterialisedView(out)


def _layer(module: nn.Module) -> str:
    """The layer's class name (parametrize subclasses the layer's class; the older hooks leave it as it is)."""
    return type(module).__bases__[0].__name__ if parametrize.is_parametrized(module) else type(module).__name__


@contextlib.contextmanager
def _eval(module: nn.Module) -> Iterator[None]:
    """The parametrizations of ``module`` in eval mode for the block (their modes restored after), and the
    older spectral_norm's hooks without their power iteration (a replay of the layer then computes W from
    the u and v its forward used, and leaves them as they are; the replay puts back the tensor the hook
    set: ``FuncHandler.view``)."""
    plists = getattr(module, "parametrizations", None)
    modes = [(m, m.training) for m in plists.modules()] if plists is not None else []
    hooks = [(h, h.n_power_iterations) for h in _old_spectral_norms(module)]
    for m, _ in modes:
        m.training = False
    for h, _ in hooks:
        h.n_power_iterations = 0
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for h, n in hooks:
            h.n_power_iterations = n


def _vjp_originals(originals: dict[str, torch.Tensor], f: Any, g_w: torch.Tensor) -> dict[str, torch.Tensor]:
    """{original's local name: (B, *its shape)}: the vjp of W = f(originals) (a ParametrizationList in the
    mode it is in: eval, see :func:`_eval`) at the current originals with each of the B cotangents ``g_w``
    (B, *W.shape)."""
    from torch.func import vjp, vmap

    local = list(originals)
    w, pullback = vjp(lambda *o: f(dict(zip(local, o, strict=True))), *originals.values())
    with warnings.catch_warnings():  # (weight_norm's backward has no batching rule: vmap loops in C++)
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        per = vmap(pullback)(g_w.to(w.dtype))
    return dict(zip(local, per, strict=True))


def old_weight_norm(module: nn.Module) -> bool:
    """Whether the older ``torch.nn.utils.weight_norm`` sets a tensor of ``module`` before each call."""
    return bool(_old_weight_norms(module))


def serves(module: nn.Module, inner_class: type) -> bool:
    """Whether ``module`` is parametrized (``torch.nn.utils.parametrize``) or has the older weight_norm or
    spectral_norm, served through ``inner_class``: its layer rule and the chain rule, or, for a module
    without one, its torch.func replay, which runs the pre-hook on the replayed originals (the older
    weight_norm's as it is; the older spectral_norm's through this handler: without its power iteration,
    at the u and v of the call, see :func:`_eval`)."""
    if parametrize.is_parametrized(module) or _old_spectral_norms(module):
        return True
    return old_weight_norm(module) and not issubclass(inner_class, FuncHandler)
