"""One test per private PyTorch call in cockpit_lite/compat.py: when torch moves one, this says which."""

from __future__ import annotations

import ast
import tokenize
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cockpit_lite import compat

ROOT = Path(__file__).resolve().parents[1]


def test_tree_flatten_and_map():
    leaves, _ = compat.tree_flatten((torch.ones(1), {"a": torch.zeros(2)}, [3]))
    assert len(leaves) == 3
    out = compat.tree_map(lambda t: t * 2 if torch.is_tensor(t) else t, {"a": torch.ones(1), "b": 1})
    assert out["a"].item() == 2.0 and out["b"] == 1


def test_tree_leaves_fast_path_agrees_with_pytree():
    """The fast path of tree_leaves (tensors, flat tuples/lists, (args, {})) returns pytree's leaves in
    pytree's order, and everything else goes to pytree."""
    from collections import namedtuple

    from torch.utils import _pytree

    t = [torch.full((1,), float(k)) for k in range(4)]
    nt = namedtuple("NT", "x y")
    trees = [
        t[0], (t[0], t[1]), [t[0]], ((t[0], t[1]), {}), ((t[0],), {"k": t[1]}), (t[0], None, 3), (t[0], [t[1], 2]),
        (nt(t[0], t[1]), {}), {"a": t[0], "b": (t[1], t[2])}, (t[0], (t[1], (t[2], t[3]))), (), 5, None,
        (torch.nn.Parameter(t[3]),),
    ]  # fmt: skip
    for tree in trees:
        got, want = compat.tree_leaves(tree), _pytree.tree_leaves(tree)
        assert len(got) == len(want) and all(a is b for a, b in zip(got, want, strict=True)), tree


def test_norm_base_classes():
    assert isinstance(nn.BatchNorm2d(3), compat.BatchNormBase) and isinstance(nn.SyncBatchNorm(3), compat.BatchNormBase)
    assert isinstance(nn.InstanceNorm1d(3), compat.InstanceNormBase)


def test_foreach_norm_and_copy():
    ts = [torch.randn(3, 4), torch.randn(5)]
    got = compat.foreach_norm(ts)
    assert all(torch.allclose(g, t.norm()) for g, t in zip(got, ts, strict=True))
    dst = [torch.empty_like(t) for t in ts]
    compat.foreach_copy_(dst, ts)
    assert all(torch.equal(d, t) for d, t in zip(dst, ts, strict=True))


def test_foreach_differences_are_torch_subs_bit_for_bit(monkeypatch):
    """out = a - b and buf = a - buf by fused calls (parameters among the operands), the same bits as one
    torch.sub per tensor; on the CPU by default, and for a subclass (FSDP2's DTensor), the loop of torch.sub."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 3, 2), ()]
    a = [nn.Parameter(torch.randn(s, generator=gen) * 10 ** torch.randint(-3, 4, (), generator=gen)) for s in shapes]
    b = [torch.randn(s, generator=gen) for s in shapes]
    fused = []
    for name in ("_foreach_sub_", "_foreach_neg_"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *args, real=real, name=name: fused.append(name) or real(*args))
    with torch.no_grad():  # (as the providers call them)
        for how in (True, None):  # fused, and by the device (on the CPU one torch.sub per tensor)
            fused.clear()
            out, bufs = [torch.empty(s) for s in shapes], [t.clone() for t in b]
            compat.foreach_difference(out, a, b, fused=how)
            compat.foreach_difference_from_(bufs, a, fused=how)
            for x, y, o, buf in zip(a, b, out, bufs, strict=True):
                assert torch.equal(o, torch.sub(x, y)) and torch.equal(buf, torch.sub(x, y))
            assert fused == (["_foreach_sub_", "_foreach_sub_", "_foreach_neg_"] if how else [])

        class Sub(torch.Tensor):
            pass

        fused.clear()
        compat.foreach_difference(out, [x.detach().as_subclass(Sub) for x in a], b, fused=True)
        assert not fused and all(torch.equal(o, torch.sub(x, y)) for x, y, o in zip(a, b, out, strict=True))


def test_queue_backward_callback_runs_after_the_whole_backward():
    w = torch.randn(3, requires_grad=True)
    seen = []
    y = (w * 2).sum()
    y.register_hook(lambda g: compat.queue_backward_callback(lambda: seen.append(w.grad.clone())))
    y.backward()
    assert len(seen) == 1 and torch.equal(seen[0], torch.full((3,), 2.0))


def test_saved_attribute():
    p, x = torch.randn(3, requires_grad=True), torch.randn(4, 3)
    assert compat.saved_attribute(torch.add(x, p, alpha=0.5).grad_fn, "alpha") == 0.5
    assert torch.equal(compat.saved_attribute((p * x).grad_fn, "other"), x)
    assert tuple(compat.saved_attribute(p.expand(2, 3).unsqueeze(0).permute(2, 0, 1).grad_fn, "dims")) == (2, 0, 1)
    sliced = torch.randn(2, 5, requires_grad=True)[:, 1:4].grad_fn
    assert [compat.saved_attribute(sliced, k) for k in ("dim", "start", "end", "step")] == [1, 1, 4, 1]


def test_profiler_enabled():
    assert compat.profiler_enabled() is False
    with torch.profiler.profile():
        assert compat.profiler_enabled() is True


def test_compiled_inner():
    net = nn.Linear(2, 2)
    assert compat.compiled_inner(torch.compile(net, backend="eager")) is net
    assert compat.compiled_inner(net) is None


def test_conv_forward_and_padding():
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")
    x, w = torch.randn(2, 2, 5, 5), torch.randn(3, 2, 3, 3)
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), w)
    torch.testing.assert_close(compat.conv_forward(conv, x, w), expected)
    torch.testing.assert_close(compat.pad_like_conv(conv, x), F.pad(x, (1, 1, 1, 1), mode="reflect"))
    assert tuple(compat.conv_reversed_padding(conv)) == (1, 1, 1, 1)


def test_conv_weight_grad_matches_autograd():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, bias=False)
    x = torch.randn(3, 4, 9, 9)
    out = conv(x)
    g = torch.randn_like(out)
    (expected,) = torch.autograd.grad(out, conv.weight, g)
    got = compat.conv_weight_grad(g, x, conv.weight.shape, (2, 2), (1, 1), (1, 1), 2)
    torch.testing.assert_close(got, expected)


def test_dynamo_hook_guards_set_and_restore():
    config = torch._dynamo.config
    before = config.skip_nnmodule_hook_guards
    with compat.dynamo_hook_guards():
        assert config.skip_nnmodule_hook_guards is False
    assert config.skip_nnmodule_hook_guards == before


def test_dataloader_iterator_and_index_sampler():
    loader = DataLoader(TensorDataset(torch.arange(6.0)), batch_size=2, num_workers=1, persistent_workers=True)
    assert compat.dataloader_iterator(loader) is None
    list(loader)
    it = compat.dataloader_iterator(loader)
    assert it is not None and hasattr(it, "_index_sampler")
    compat.set_index_sampler(it, [[5, 4]])
    assert it._index_sampler == [[5, 4]]


def test_unguarded_attention_forward_shows_its_inner_ops_to_a_mode():
    """A TorchFunctionMode sees F.multi_head_attention_forward as one call; the unguarded copy, run
    with the mode pushed again, shows its F.linear calls, and computes the same numbers."""
    from torch.overrides import TorchFunctionMode

    class Seen(TorchFunctionMode):
        def __init__(self, unguard):
            super().__init__()
            self.unguard, self.funcs = unguard, []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.funcs.append(func)
            if self.unguard and func is F.multi_head_attention_forward:
                with self:
                    return compat.unguarded(func)(*args, **(kwargs or {}))
            return func(*args, **(kwargs or {}))

    m = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(3, 5, 8)
    want = m(x, x, x)[0]
    for unguard in (False, True):
        mode = Seen(unguard)
        with mode:
            got = m.forward(x, x, x)[0]
        assert torch.equal(got, want)
        assert (mode.funcs.count(F.linear) == 2) is unguard  # the packed in-projection and the out-projection
    assert compat.unguarded(F.multi_head_attention_forward) is compat.unguarded(F.multi_head_attention_forward)


def test_tensor_version_follows_in_place_changes_of_detached_aliases():
    t = torch.randn(3, requires_grad=True) * 2
    alias = t.detach()
    v = compat.tensor_version(alias)
    t.mul_(2)
    assert compat.tensor_version(alias) == v + 1


def test_sdpa_backends_in_priority_order():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    before = compat.sdpa_backends()
    assert SDPBackend.MATH in before
    with sdpa_kernel([SDPBackend.MATH, SDPBackend.FLASH_ATTENTION], set_priority=True):
        assert compat.sdpa_backends() == [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]
        with sdpa_kernel(before, set_priority=True):
            assert compat.sdpa_backends() == before
    assert compat.sdpa_backends() == before


def test_no_private_torch_call_outside_compat():
    """Private torch names (torch._x, module._x of torch objects) appear only in compat.py."""
    private = ("torch._", "._execution_engine", "._conv_forward", "._reversed_padding", "._orig_mod", "._iterator",
               "._index_sampler", "_BatchNorm", "_InstanceNorm", "_pytree", "_foreach_", "._saved_")  # fmt: skip
    for path in list((ROOT / "cockpit_lite").rglob("*.py")) + list((ROOT / "instruments").rglob("*.py")):
        if path.name == "compat.py":
            continue
        with open(path, "rb") as f:  # code only: strings (docstrings) and comments may name them
            code = "".join(
                t.string for t in tokenize.tokenize(f.readline) if t.type not in (tokenize.STRING, tokenize.COMMENT)
            )
        for name in private:
            assert name not in code, f"{path.relative_to(ROOT)} uses {name}: route it through cockpit_lite/compat.py"


def test_every_warning_the_package_issues_is_a_cockpit_warning():
    """warnings.warn(...) in the package always names CockpitWarning (users filter one class)."""
    for path in list((ROOT / "cockpit_lite").rglob("*.py")) + list((ROOT / "instruments").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "warnings.warn":
                category = (
                    node.args[1]
                    if len(node.args) > 1
                    else next((k.value for k in node.keywords if k.arg == "category"), None)
                )
                assert category is not None and ast.unparse(category) == "CockpitWarning", (
                    f"{path.relative_to(ROOT)}:{node.lineno} warns without CockpitWarning"
                )


def test_backward_watch_sees_roots_and_grad_scaler_outputs_and_restores():
    backward, scale = torch.autograd.backward, torch.amp.GradScaler.scale
    seen = []
    watch = compat.BackwardWatch(lambda tensors, grads: seen.append(tensors))
    w = torch.randn(3, requires_grad=True)
    loss = (w * 2).sum()
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    scaled = scaler.scale(loss)
    assert compat.grad_scaler_factor(scaled) == 256.0
    assert compat.grad_scaler_factor(loss * torch.tensor(256.0)) is None  # a user's factor is part of the loss
    scaled.backward()
    assert len(seen) == 1 and seen[0] is scaled
    watch.remove()
    assert torch.autograd.backward is backward and torch.amp.GradScaler.scale is scale


def test_nll_terms_reads_the_saved_inputs_of_a_cross_entropy():
    from cockpit_lite.losses import nll_losses

    logits = torch.randn(4, 5, 3, requires_grad=True)
    target = torch.randint(0, 5, (4, 3))
    target[0, 1] = -100
    weight = torch.rand(5)
    loss = F.cross_entropy(logits, target, weight=weight) / 2  # through a scalar factor
    terms = compat.nll_terms(loss.grad_fn)
    assert terms is not None and terms[3] == -100 and terms[4] == 1
    per = nll_losses(terms, 4)
    # the per-example shares: example i alone, with the batch's normaliser (sum of counted weights)
    elem = F.cross_entropy(logits, target, weight=weight, reduction="none").detach()
    counted = (weight[target.clamp(min=0)] * (target != -100)).sum()
    torch.testing.assert_close(per, 4 * elem.sum(1) / counted)
    torch.testing.assert_close(per.mean(), 2 * loss.detach())
    every = F.cross_entropy(logits, torch.full_like(target, -100))  # nothing counted: 0/0
    assert torch.isnan(nll_losses(compat.nll_terms(every.grad_fn), 4)).all()
    assert compat.nll_terms((logits.sum()).grad_fn) is None
    assert compat.nll_terms(F.cross_entropy(logits, target, label_smoothing=0.1).grad_fn) is None


def test_without_grad_switches_grad_mode_off_inside_and_restores_it():
    """compat.without_grad (``torch._C._set_grad_enabled``): off inside, back on after a return or an
    exception, left off when it was off."""
    seen = []

    @compat.without_grad
    def f(fail=False):
        seen.append(torch.is_grad_enabled())
        if fail:
            raise ValueError("boom")
        return (torch.ones(2, requires_grad=True) * 2).requires_grad

    assert f() is False and seen == [False] and torch.is_grad_enabled()
    try:
        f(fail=True)
    except ValueError:
        pass
    assert torch.is_grad_enabled()
    with torch.no_grad():
        f()
        assert not torch.is_grad_enabled()
    assert seen == [False, False, False]


def test_nll_total_weight_is_the_normaliser_of_a_mean_cross_entropy():
    logits, y = torch.randn(6, 3, requires_grad=True), torch.tensor([0, 1, 2, -100, 1, 0])
    assert float(compat.nll_total_weight(nn.CrossEntropyLoss()(logits, y))) == 5.0  # ignore_index not counted
    weight = torch.tensor([1.0, 2.0, 0.5])
    assert float(compat.nll_total_weight(nn.CrossEntropyLoss(weight=weight)(logits, y))) == 6.5  # 1+2+.5+2+1
    x4, y4 = torch.randn(2, 3, 4, 5, requires_grad=True), torch.randint(0, 3, (2, 4, 5))
    assert float(compat.nll_total_weight(nn.CrossEntropyLoss()(x4, y4))) == 40.0  # NllLoss2d: every position
    assert compat.nll_total_weight(nn.CrossEntropyLoss(label_smoothing=0.1)(logits, y)) is None  # not an NLL node
    assert compat.nll_total_weight(logits.sum()) is None
