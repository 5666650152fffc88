"""The devices the numerical tests run on: a test that takes a ``device`` argument runs once per device.

CPU always; CUDA too where ``torch.cuda.is_available()``. ``COCKPIT_TEST_DEVICES`` (comma-separated,
e.g. ``cpu,cuda`` or ``cuda`` or ``cuda:1``) overrides the list; asking for a CUDA device that is not
there is a usage error at collection, never a skip. Every CUDA parametrization carries the ``cuda``
mark, so ``pytest -m cuda`` selects exactly the CUDA runs (``benchmarks/gpu.sh``).

On CUDA the tests compare float32 work against float64 references at float32 tolerances, so TF32
(cuDNN convolutions use it by default, matmuls where ``allow_tf32`` is set) is turned off for the
session: a TF32 product carries a 10-bit mantissa, an error of about 1e-3, not a float32 one; and
cuDNN picks deterministic algorithms (:func:`exact_float32_on_cuda`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytest
import torch

ENV = "COCKPIT_TEST_DEVICES"


class DeviceRequestError(ValueError):
    """A device asked for in ``COCKPIT_TEST_DEVICES`` that this machine does not have."""


def requested_devices(spec: str | None, cuda_count: int) -> list[str]:
    """The devices to run on: ``spec`` (the environment variable; None or blank: the default), checked
    against the ``cuda_count`` CUDA devices present. Default: ``["cpu"]`` plus ``"cuda"`` if any."""
    if spec is None or not spec.strip():
        return ["cpu"] + (["cuda"] if cuda_count > 0 else [])
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    for d in devices:
        try:
            dev = torch.device(d)
        except RuntimeError as e:
            raise DeviceRequestError(f"{ENV}={spec!r}: {d!r} is not a device ({e})") from None
        if dev.type not in ("cpu", "cuda"):
            raise DeviceRequestError(f"{ENV}={spec!r}: {d!r}: the tests run on 'cpu' and 'cuda' devices only")
        if dev.type == "cuda" and cuda_count == 0:
            raise DeviceRequestError(
                f"{ENV}={spec!r} asks for {d!r}, but torch.cuda.is_available() is False on this machine "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}): run on a machine with a "
                f"CUDA device, or unset {ENV} to run on the CPU"
            )
        if dev.type == "cuda" and dev.index is not None and dev.index >= cuda_count:
            raise DeviceRequestError(f"{ENV}={spec!r} asks for {d!r}, but this machine has {cuda_count} CUDA device(s)")
    if len(set(devices)) != len(devices):
        raise DeviceRequestError(f"{ENV}={spec!r} names a device twice")
    return devices


def device_params(devices: Sequence[str]) -> list:
    """One ``pytest.param`` per device, id the device's name; the CUDA ones carry the ``cuda`` mark."""
    return [pytest.param(d, id=d, marks=[pytest.mark.cuda] if torch.device(d).type == "cuda" else []) for d in devices]


def already_parametrized(metafunc: pytest.Metafunc, argname: str) -> bool:
    """Whether the test parametrizes ``argname`` itself (then it chose its devices)."""
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        if argname in names:
            return True
    return False


def exact_float32_on_cuda() -> None:
    """TF32 off for convolutions and matmuls (module docstring), and deterministic cuDNN algorithms:
    the tests that compare training with and without the cockpit bit for bit need the same kernels to
    give the same bits twice."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def devices_from_environment() -> list[str]:
    """:func:`requested_devices` for this process's environment and CUDA devices."""
    return requested_devices(os.environ.get(ENV), torch.cuda.device_count() if torch.cuda.is_available() else 0)
