"""register_handler: custom layers served by a one-method LayerHandler or a full Handler (the code of
docs/recipes/layer_handler.md, executed), checked against the float64 loop by the exactness harness,
against the torch.func fallback, and in TracIn cross products; registration errors and replacement."""

from __future__ import annotations

import copy
import pathlib
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import cockpit_lite
from cockpit_lite import Cockpit, LayerHandler, register_handler
from cockpit_lite.errors import CockpitWarning
from cockpit_lite.persample import Handler, ViewGroup, layers
from cockpit_lite.persample.cross import ViewCollector, cross
from tests.harness import assert_matches_loop
from tests.reference import Probe, per_sample_grads_loop

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "recipes" / "layer_handler.md"


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    """Every test starts from the built-in handlers; its registrations are undone afterwards."""
    monkeypatch.setattr(layers, "HANDLERS", dict(layers.HANDLERS))


@pytest.fixture
def doc(monkeypatch, tmp_path):
    """The namespace left by running every python block of the recipe, in order (it registers its
    handlers, attaches cockpits and trains a few steps)."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "layer_handler_recipe"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recipe runs without a single warning
        exec(compile("\n".join(blocks), str(DOC), "exec"), ns)
    return ns


def test_the_public_names():
    from cockpit_lite import persample

    assert cockpit_lite.register_handler is persample.register_handler is layers.register_handler
    assert cockpit_lite.LayerHandler is persample.LayerHandler
    assert {"register_handler", "LayerHandler"} <= set(cockpit_lite.__all__)
    assert {"register_handler", "Handler", "LayerHandler", "FactorView", "MaterialisedView", "ViewGroup"} <= set(
        persample.__all__
    )


def test_recipe_runs_and_registers_its_handlers(doc):
    assert layers.HANDLERS[doc["Scale"]] is doc["ScaleHandler"]
    assert layers.HANDLERS[doc["LoRALinear"]] is doc["LoRAHandler"]
    step, norms = doc["cockpit"].history["persample/grad_norm/0.A"][-1]
    assert step == 0 and len(norms) == 8 and np.all(np.isfinite(norms))


class _ScaleNet(nn.Module):
    """Scale on (B, d) and, a second time in the step, on (B, T, d)."""

    def __init__(self, scale_cls):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.scale = scale_cls(6)
        self.head = nn.Linear(6, 3)
        with torch.no_grad():
            self.scale.weight.uniform_(0.5, 1.5)
            self.scale.bias.normal_()

    def forward(self, x):  # x: (B, T, 4)
        h = torch.tanh(self.lin(x))
        return self.head(torch.tanh(self.scale(h[:, 0])) + torch.tanh(self.scale(h)).mean(1))


class _LoRANet(nn.Module):
    def __init__(self, lora_cls):
        super().__init__()
        self.adapter = lora_cls(nn.Linear(4, 6), rank=2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # (B, T, 4): the adapter at T positions
        return self.head(torch.tanh(self.adapter(x)).mean(1))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_method_handler_matches_the_loop(doc, reduction):
    torch.manual_seed(0)
    model = _ScaleNet(doc["Scale"])
    x, y = torch.randn(6, 5, 4), torch.randint(0, 3, (6,))
    assert layers.handler_for(model.scale) is doc["ScaleHandler"]
    checked = assert_matches_loop(model, x, y, nn.CrossEntropyLoss(reduction=reduction))
    assert not checked.warnings


@pytest.mark.parametrize("frozen", [None, "A", "B"])
def test_factor_form_handler_matches_the_loop(doc, frozen):
    """The adapter's two FactorViews in a ViewGroup; either matrix frozen (then not in the view)."""
    torch.manual_seed(0)
    model = _LoRANet(doc["LoRALinear"])
    if frozen is not None:
        getattr(model.adapter, frozen).requires_grad_(False)
    x, y = torch.randn(6, 5, 4), torch.randint(0, 3, (6,))
    checked = assert_matches_loop(model, x, y, nn.CrossEntropyLoss())
    assert not checked.warnings
    expected = {"adapter.A", "adapter.B", "head.weight", "head.bias"} - {f"adapter.{frozen}"}
    assert set(checked.record.per_sample_sq_norms_by_param) == expected


@pytest.mark.parametrize("net,layer", [(_ScaleNet, "Scale"), (_LoRANet, "LoRALinear")])
def test_without_registration_the_torch_func_fallback_gives_the_same_numbers(doc, net, layer):
    torch.manual_seed(0)
    model = net(doc[layer])
    x, y = torch.randn(6, 5, 4), torch.randint(0, 3, (6,))
    registered = assert_matches_loop(model, x, y, nn.CrossEntropyLoss()).record
    del layers.HANDLERS[doc[layer]]
    custom = next(m for m in model.modules() if type(m) is doc[layer])
    assert layers.handler_for(custom) is layers.FuncHandler
    fallback = assert_matches_loop(model, x, y, nn.CrossEntropyLoss()).record
    for n, sq in registered.per_sample_sq_norms_by_param.items():
        np.testing.assert_allclose(fallback.per_sample_sq_norms_by_param[n], sq, rtol=1e-5, err_msg=n)
    np.testing.assert_allclose(fallback.per_sample_dot_mean, registered.per_sample_dot_mean, rtol=1e-5, atol=1e-7)
    for key, proj in registered.projections.items():
        np.testing.assert_allclose(fallback.projections[key], proj, rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("net,layer", [(_ScaleNet, "Scale"), (_LoRANet, "LoRALinear")])
def test_tracin_cross_products_of_custom_layers(doc, net, layer, monkeypatch):
    """g_i . h_k between a training batch and probes, from the custom views (the adapter's ViewGroup
    part by part, from its factors: its g_i are never formed), against the float64 loop."""

    def never(self):
        raise AssertionError("the adapter's per-sample gradients were formed")

    monkeypatch.setattr(ViewGroup, "grads", never)
    torch.manual_seed(0)
    model = net(doc[layer])
    loss_fn = nn.CrossEntropyLoss()
    (xb, yb), (xp, yp) = [(torch.randn(b, 4, 4), torch.randint(0, 3, (b,))) for b in (5, 3)]
    collect = ViewCollector(model)
    left, _ = collect(xb, yb, loss_fn)
    right, _ = collect(xp, yp, loss_fn)
    gb, gp = per_sample_grads_loop(model, loss_fn, xb, yb), per_sample_grads_loop(model, loss_fn, xp, yp)
    assert any(isinstance(v, ViewGroup) for v in left.values()) == (layer == "LoRALinear")
    seen = set()
    for key, view in left.items():
        for n, c in cross(view, right[key]).items():
            want = gb[n].reshape(5, -1) @ gp[n].reshape(3, -1).T
            np.testing.assert_allclose(c.double().numpy(), want, rtol=1e-5, atol=1e-7, err_msg=n)
            seen.add(n)
    assert seen == set(gb)


def test_registration_for_a_module_served_whole_is_honoured():
    """RNNs and MultiheadAttention (whose children's hooks never fire) take a registered handler too."""
    calls = []

    class CountingHandler(layers.FuncHandler):
        def view(self, captures, grads, batch, inv_scale):
            calls.append(type(self.module).__name__)
            return super().view(captures, grads, batch, inv_scale)

    assert register_handler(nn.LSTM, CountingHandler) is None
    from tests.test_persample import _Recurrent

    torch.manual_seed(0)
    assert_matches_loop(
        _Recurrent(nn.LSTM), torch.randn(6, 5, 4), torch.randint(0, 3, (6,)), nn.CrossEntropyLoss(), totals=False
    )
    assert calls == ["LSTM"]


def test_registering_replaces_and_returns_the_previous_handler():
    """A handler for nn.Linear replaces the built-in one for cockpits attached afterwards."""
    built = []

    class MyLinear(LayerHandler):
        def per_sample_grads(self, inputs, output_grad):
            built.append(1)
            (x,) = inputs
            return {"weight": torch.einsum("bo,bi->boi", output_grad, x), "bias": output_grad}

    assert register_handler(nn.Linear, MyLinear) is layers.LinearHandler
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    assert_matches_loop(model, torch.randn(6, 4), torch.randint(0, 3, (6,)), nn.CrossEntropyLoss(), totals=False)
    assert len(built) == 2
    assert register_handler(nn.Linear, layers.LinearHandler) is MyLinear
    assert layers.handler_for(model[0]) is layers.LinearHandler


def test_a_linear_handler_subclass_with_its_own_view_serves_single_calls():
    """The engine's short path for a single Linear call (``Handler.single_view``) gives way to a subclass
    of LinearHandler that overrides ``view``: its view serves every call, and the numbers match the loop."""
    seen = []

    class Logged(layers.LinearHandler):
        def view(self, captures, grads, batch, inv_scale):
            seen.append(len(captures))
            return super().view(captures, grads, batch, inv_scale)

    previous = register_handler(nn.Linear, Logged)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        assert_matches_loop(model, torch.randn(6, 4), torch.randint(0, 3, (6,)), nn.CrossEntropyLoss())
    finally:
        register_handler(nn.Linear, previous)
    assert seen and set(seen) == {1}


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.w


class _Complete(LayerHandler):
    def per_sample_grads(self, inputs, output_grad):
        return {"w": output_grad * inputs[0]}


class _FullWithoutView(Handler):
    pass


@pytest.mark.parametrize(
    "module_class,handler_class,message",
    [
        (int, _Complete, "module_class must be a torch.nn.Module subclass"),
        (_Custom(), _Complete, "module_class must be a torch.nn.Module subclass"),
        (nn.Module, _Complete, "would serve every module"),
        (_Custom, object, "handler_class must be a subclass of"),
        (_Custom, _Complete(_Custom(), {}), "handler_class must be a subclass of"),
        (_Custom, lambda m, n: None, "handler_class must be a subclass of"),
        (_Custom, LayerHandler, "does not implement per_sample_grads"),
        (_Custom, _FullWithoutView, "does not implement view"),
    ],
)
def test_registration_errors_are_clear(module_class, handler_class, message):
    before = dict(layers.HANDLERS)
    with pytest.raises(TypeError, match=message):
        register_handler(module_class, handler_class)
    assert layers.HANDLERS == before


def _step(model, x, y):
    probe, opt, loss_fn = (
        Probe(flags={cockpit_lite.Need.PER_SAMPLE_SQ_NORMS, cockpit_lite.Need.PER_SAMPLE_SQ_NORMS_BY_PARAM}),
        None,
        nn.CrossEntropyLoss(),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Cockpit(model, opt, loss_fn, instruments=[probe]):
        loss_fn(model(x), y).backward()
        opt.step()
    return probe.records[0]


@pytest.mark.parametrize(
    "returned,message",
    [
        (lambda x, e: {"w": e[:1] * x[:1]}, r"returned 'w' of shape \(1, 3\); expected \(6, 3\)"),
        (lambda x, e: {"v": e * x}, r"returned 'v', which is no parameter of _Custom \(its parameters: \['w'\]\)"),
        (lambda x, e: {}, r"returned no gradient for the trainable parameter\(s\) \['w'\]"),
        (lambda x, e: e * x, "must return a dict"),
    ],
)
def test_a_handler_returning_wrong_gradients_is_reported(returned, message):
    """The layer is left out, the rest is computed; persample/coverage says how much is covered."""

    class Wrong(LayerHandler):
        def per_sample_grads(self, inputs, output_grad):
            return returned(inputs[0], output_grad)

    register_handler(_Custom, Wrong)
    model = nn.Sequential(nn.Linear(2, 3), _Custom(), nn.Linear(3, 3))
    with pytest.warns(CockpitWarning, match=message):
        rec = _step(model, torch.randn(6, 2), torch.randint(0, 3, (6,)))
    # the layer is left out and said to be: the other layers' statistics are kept, never the wrong ones
    assert set(rec.per_sample_uncovered) == {"1.w"}
    assert rec.per_sample_sq_norms_by_param.keys() >= {"0.weight", "2.weight"}
    assert "1.w" not in rec.per_sample_sq_norms_by_param and rec.loss is not None


class _Gate(nn.Module):
    """Keyword arguments and two outputs, one of which may get no gradient."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.b = nn.Parameter(torch.zeros(4))

    def forward(self, x, *, shift):
        return x * self.w + shift, x + self.b


class _GateHandler(LayerHandler):
    def per_sample_grads(self, inputs, output_grad, *, shift):
        (x,) = inputs
        e_scaled, e_shifted = output_grad
        zero = torch.zeros_like(x)
        return {
            "w": (zero if e_scaled is None else e_scaled * x),
            "b": (zero if e_shifted is None else e_shifted),
        }


class _GateNet(nn.Module):
    def __init__(self, use_second=True):
        super().__init__()
        self.lin, self.gate, self.head = nn.Linear(3, 4), _Gate(), nn.Linear(4, 3)
        self.use_second = use_second

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        a, b = self.gate(h, shift=x[:, :1])
        return self.head(torch.tanh(a) + (torch.tanh(b) if self.use_second else 0))


@pytest.mark.parametrize("use_second", [True, False])
def test_keyword_arguments_and_several_outputs(use_second):
    register_handler(_Gate, _GateHandler)
    torch.manual_seed(0)
    model = _GateNet(use_second)
    if not use_second:
        model.gate.b.requires_grad_(False)  # it gets no gradient at all
    checked = assert_matches_loop(model, torch.randn(6, 3), torch.randint(0, 3, (6,)), nn.CrossEntropyLoss())
    assert not checked.warnings


class _TwiceAndTokens(nn.Module):
    """Plain (B, i) Linear calls (one layer called twice) beside a Linear on (B, T, d) tokens."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 40)  # g_i . gbar by the batch weight gradient (B (i + o) > i o at B = 8)
        self.mid = nn.Linear(40, 30)  # by the factors' Grams
        self.tok = nn.Linear(5, 4)  # (B, T, 5) tokens: the general path
        self.out = nn.Linear(30 + 4, 3)

    def forward(self, x, t):
        h = torch.tanh(self.mid(torch.tanh(self.inp(x))))
        h = torch.tanh(self.mid(h[:, :40].repeat(1, 2)[:, :40]) + h)  # the second call of mid
        return self.out(torch.cat([h, self.tok(t).mean(1)], 1))


def test_plain_linear_calls_take_the_short_capture_with_the_general_paths_numbers(device, monkeypatch):
    """The engine's short capture for a plain (B, i) -> (B, o) call of an nn.Linear (``_capture_linear``)
    serves those calls only (not the (B, T, d) one), gives the float64 loop's numbers, and the same numbers,
    bit for bit, as the general path of ``_capture_call`` that it bypasses."""
    from cockpit_lite.persample.engine import PerSampleEngine

    torch.manual_seed(0)
    model = _TwiceAndTokens()
    inputs = (torch.randn(8, 6), torch.randn(8, 7, 5))
    targets = torch.randint(0, 3, (8,))
    short = PerSampleEngine._capture_linear
    taken = []

    def counted(self, module, handler, x, out):
        taken.append((x.shape[1], out.shape[1]))
        return short(self, module, handler, x, out)

    monkeypatch.setattr(PerSampleEngine, "_capture_linear", counted)
    # (a step after the first: the first looks through every call for parameters used outside it)
    fast = assert_matches_loop(copy.deepcopy(model), inputs, targets, nn.CrossEntropyLoss(), device=device, warmup=1)
    # inp, mid twice, out (each checked step); tok's (B, T, 5) call is no plain one
    assert sorted(set(taken)) == [(6, 40), (34, 3), (40, 30)] and taken.count((40, 30)) == 2 * taken.count((6, 40))

    monkeypatch.setattr(PerSampleEngine, "_plain_linear", lambda self, handler, args, output: False)
    taken.clear()
    general = assert_matches_loop(
        copy.deepcopy(model), inputs, targets, nn.CrossEntropyLoss(), device=device, warmup=1
    )
    assert not taken
    for field in ("per_sample_sq_norms", "per_sample_dot_mean"):
        np.testing.assert_array_equal(getattr(fast.record, field), getattr(general.record, field), err_msg=field)
    for name, row in fast.record.per_sample_sq_norms_by_param.items():
        np.testing.assert_array_equal(row, general.record.per_sample_sq_norms_by_param[name], err_msg=name)
    for key, row in fast.record.projections.items():
        np.testing.assert_array_equal(row, general.record.projections[key], err_msg=key)


class _Positions(nn.Module):
    """Linear calls at several positions: with a bias (addmm under a view), without (mm under a view), and on a
    non-contiguous input (the bias added after the product: no node to read the weight gradient from)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 12)
        self.nob = nn.Linear(12, 9, bias=False)
        self.swap = nn.Linear(9, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):  # x: (B, T, 5)
        h = torch.tanh(self.nob(torch.tanh(self.inp(x))))  # (B, T, 9)
        h = h.transpose(0, 1).contiguous().transpose(0, 1)  # (B, T, 9), not contiguous
        return self.out(torch.tanh(self.swap(h)).mean(1))


def test_linear_calls_at_several_positions_take_the_batch_weight_gradient_from_autograd(device, monkeypatch):
    """g_i . gbar of a (B, T, i) -> (B, T, o) call takes gbar from its own product node (addmm or mm under the
    view that unflattens its rows), whose output gradient is the call's, flattened; a call whose product has
    no such node is served as before. All agree with the float64 loop, as with no node taken at all."""
    from cockpit_lite.persample.views import FactorView

    with_parts = {}
    original = FactorView.dot_mean

    def spy(self):
        with_parts[self.w] = self.batch_grad_parts is not None
        return original(self)

    monkeypatch.setattr(FactorView, "dot_mean", spy)
    torch.manual_seed(0)
    model = _Positions()
    x, y = torch.randn(6, 4, 5), torch.randint(0, 3, (6,))
    assert_matches_loop(copy.deepcopy(model), x, y, nn.CrossEntropyLoss(), device=device, warmup=1)
    assert with_parts == {"inp.weight": True, "nob.weight": True, "swap.weight": False, "out.weight": True}
    with_parts.clear()
    monkeypatch.setattr(layers.LinearHandler, "weight_grad_node", lambda self, outputs: None)
    assert_matches_loop(copy.deepcopy(model), x, y, nn.CrossEntropyLoss(), device=device, warmup=1)
    assert not any(with_parts.values())
