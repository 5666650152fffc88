"""benchmarks/profile_step.py: a short CPU profile gives each arm's per-step figures, and the device-side
helpers (which no CPU run reaches) count kernels, not the labels around them, and charge each kernel to the
innermost cockpit region that launched it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from tests.bench_util import benchmark_module


@pytest.fixture(scope="module")
def prof():
    yield from benchmark_module("profile_step")


def test_a_short_cpu_profile_of_plain_and_tracked_steps(prof):
    plain = prof.profile_config("mlp", "sgd", "plain", steps=2, warmup=1, device="cpu", trace=None)
    tracked = prof.profile_config("mlp", "sgd", "economy-alpha", steps=2, warmup=1, device="cpu", trace=None)
    for s in (plain, tracked):
        assert s["wall_ms"] > 0 and s["host_ops_ms"] > 0
        assert s["device_ms"] == 0 and s["launches"] == 0 and not s["regions"]  # (no device on the CPU)
    names = {e.key for e in tracked["events"]}
    assert any(n.startswith(prof.PREFIX) for n in names) and not any(
        n.startswith(prof.PREFIX) for n in {e.key for e in plain["events"]}
    )


def _event(name, parent=None, kernels=()):
    return SimpleNamespace(name=name, cpu_parent=parent, kernels=[SimpleNamespace(duration=d) for d in kernels])


def test_kernels_are_charged_to_the_innermost_cockpit_region(prof):
    engine = _event("cockpit_lite/engine")
    inner = _event("cockpit_lite/grad_norms", parent=_event("aten::something", parent=engine))
    events = [
        engine,
        _event("aten::mm", parent=engine, kernels=(3.0, 1.0)),
        _event("aten::add", parent=_event("aten::foo", parent=inner), kernels=(2.0,)),
        _event("aten::conv", parent=_event("Optimizer.step#SGD.step"), kernels=(5.0,)),
        _event("aten::relu", kernels=(0.5,)),
        _event("aten::view"),
    ]
    got = prof._by_region(SimpleNamespace(events=lambda: events))
    assert got == {"cockpit_lite/engine": 4.0, "cockpit_lite/grad_norms": 2.0, "training": 5.5}


def test_device_time_counts_kernels_and_copies_not_labels(prof):
    def ev(key, device_type, us):
        return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=us)

    kernels = [ev("void gemm_kernel", DeviceType.CUDA, 3.0), ev("Memcpy DtoH", DeviceType.CUDA, 1.0)]
    labels = [ev("cockpit_lite/engine", DeviceType.CUDA, 40.0), ev("Optimizer.step#SGD.step", DeviceType.CUDA, 9.0)]
    assert [prof._kernel(e) for e in kernels + labels] == [True, True, False, False]
    assert prof._kernel(ev("aten::mm", DeviceType.CPU, 3.0)) is False
