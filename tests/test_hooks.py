"""cockpit_lite.hooks.on_gradient: the gradient of a forward tensor, as Tensor.register_hook sees it."""

from __future__ import annotations

import torch

from cockpit_lite.hooks import on_gradient


def _both(make):
    """The gradients ``on_gradient`` and ``Tensor.register_hook`` see on the tensors ``make`` returns
    (built twice from the same inputs; ``make(hook)`` hooks them and returns the loss)."""
    seen = {"pre": [], "tensor": []}
    make(lambda t: on_gradient(t, lambda g: seen["pre"].append(g.clone()))).backward()
    make(lambda t: t.register_hook(lambda g: seen["tensor"].append(g.clone()))).backward()
    return seen["pre"], seen["tensor"]


def test_on_gradient_sees_the_gradient_register_hook_sees():
    torch.manual_seed(0)
    lin, x = torch.nn.Linear(4, 3), torch.randn(5, 4)
    w = torch.randn(3)

    def plain(hook):
        y = lin(x)
        hook(y)
        return (torch.tanh(y) * w).sum()

    def in_place(hook):  # a ReLU(inplace=True) after the hook: the gradient of y before it
        y = lin(x)
        hook(y)
        torch.relu_(y)
        return (y * w).sum()

    def multi_output(hook):  # outputs 1 and 2 of one node; output 0 unused (no gradient: no call)
        parts = lin(x).unbind(1)
        hook(parts[1])
        hook(parts[2])
        return (parts[1] * 2.0 + parts[2] ** 2).sum()

    def leaf(hook):  # no node made it: register_hook
        y = x.clone().requires_grad_()
        hook(y)
        return (y**2).sum()

    for make in (plain, in_place, multi_output, leaf):
        pre, tensor = _both(make)
        assert len(pre) == len(tensor) > 0, make.__name__
        for a, b in zip(pre, tensor, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the in-place case's gradient is that of y before the ReLU: w where y > 0, else 0
    pre, _ = _both(in_place)
    with torch.no_grad():
        torch.testing.assert_close(pre[0], w * (lin(x) > 0))


def test_on_gradient_sees_what_flows_after_the_tensors_own_hooks():
    lin, x = torch.nn.Linear(4, 3), torch.randn(5, 4)
    seen = []
    y = lin(x)
    on_gradient(y, seen.append)
    y.register_hook(lambda g: g * 2)  # a user's rescaling hook, registered after ours
    y.sum().backward()
    torch.testing.assert_close(seen[0], torch.full((5, 3), 2.0))
    assert lin.weight.grad is not None and torch.allclose(lin.weight.grad, 2 * x.sum(0).expand(3, 4))


def test_a_model_with_a_cockpit_attached_pickles_and_its_copy_trains_alone():
    import io

    from cockpit_lite.instruments import Loss
    from torch import nn

    from cockpit_lite import Cockpit

    model, x, y = nn.Linear(3, 2), torch.randn(4, 3), torch.randn(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Cockpit(model, opt, nn.MSELoss(), instruments=[Loss()], sinks=[]) as ck:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        copy = torch.load(buf, weights_only=False)
        copy_opt = torch.optim.SGD(copy.parameters(), lr=0.1)
        copy_opt.zero_grad()
        nn.MSELoss()(copy(x), y).backward()
        copy_opt.step()  # the copy's hooks were dropped when pickled: the cockpit saw nothing
        assert "loss" not in ck.history
        opt.zero_grad()
        nn.MSELoss()(model(x), y).backward()
        opt.step()
        assert len(ck.history["loss"]) == 1
    torch.testing.assert_close(copy.weight, model.weight)  # the same start, the same step
