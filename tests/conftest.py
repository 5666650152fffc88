"""Test-wide settings: one torch thread per test process (pytest-xdist runs two on two cores), and the
``device`` argument of the numerical tests, parametrized over the devices present (tests/devices.py):
CPU always, CUDA where a device is present (mark ``cuda``), ``COCKPIT_TEST_DEVICES`` to override."""

import pytest
import torch

from tests.devices import (
    DeviceRequestError,
    already_parametrized,
    device_params,
    devices_from_environment,
    exact_float32_on_cuda,
)

pytest_plugins = ["pytester"]

torch.set_num_threads(1)

_DEVICES = pytest.StashKey[list]()


def pytest_configure(config: pytest.Config) -> None:
    try:
        config.stash[_DEVICES] = devices_from_environment()
    except DeviceRequestError as e:
        raise pytest.UsageError(str(e)) from None
    if any(d.startswith("cuda") for d in config.stash[_DEVICES]):
        exact_float32_on_cuda()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "device" in metafunc.fixturenames and not already_parametrized(metafunc, "device"):
        metafunc.parametrize("device", device_params(metafunc.config.stash[_DEVICES]))
