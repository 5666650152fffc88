"""The ``device`` parametrization of the numerical tests (tests/devices.py, tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from tests.devices import ENV, DeviceRequestError, device_params, requested_devices

CUDA_COUNT = torch.cuda.device_count() if torch.cuda.is_available() else 0


def test_default_is_cpu_plus_cuda_where_present():
    assert requested_devices(None, 0) == ["cpu"]
    assert requested_devices("  ", 0) == ["cpu"]
    assert requested_devices(None, 1) == ["cpu", "cuda"]
    assert requested_devices(None, 4) == ["cpu", "cuda"]


def test_environment_override():
    assert requested_devices("cuda", 1) == ["cuda"]
    assert requested_devices(" cpu , cuda:1 ", 2) == ["cpu", "cuda:1"]
    assert requested_devices("cpu", 0) == ["cpu"]


@pytest.mark.parametrize(
    ("spec", "count", "said"),
    [
        ("cuda", 0, "torch.cuda.is_available() is False"),
        ("cpu,cuda", 0, "torch.cuda.is_available() is False"),
        ("cuda:2", 2, "this machine has 2 CUDA device(s)"),
        ("cpu,cpu", 0, "names a device twice"),
        ("meta", 1, "'cpu' and 'cuda' devices only"),
        ("gpu", 1, "is not a device"),
    ],
)
def test_a_device_that_is_not_there_is_refused(spec, count, said):
    with pytest.raises(DeviceRequestError) as e:
        requested_devices(spec, count)
    assert said in str(e.value) and ENV in str(e.value)


def test_cuda_params_carry_the_cuda_mark():
    params = device_params(["cpu", "cuda", "cuda:1"])
    assert [p.id for p in params] == ["cpu", "cuda", "cuda:1"]
    assert [p.values for p in params] == [("cpu",), ("cuda",), ("cuda:1",)]
    assert [[m.name for m in p.marks] for p in params] == [[], ["cuda"], ["cuda"]]


_CONFTEST = "from tests.conftest import pytest_configure, pytest_generate_tests  # noqa: F401\n"
_INI = "[pytest]\nmarkers =\n    cuda: CUDA runs\n"
_TESTS = """
import pytest

def test_takes_device(device):
    assert isinstance(device, str)

@pytest.mark.parametrize("n", [1, 2])
def test_parametrized_too(device, n):
    pass

@pytest.mark.parametrize("device", ["chosen"])
def test_chooses_its_own(device):
    assert device == "chosen"

def test_no_device():
    pass
"""


def _ran(reprec) -> list[str]:
    """The tests that ran (each passed), by name and parameter id."""
    reports = [r for r in reprec.getreports("pytest_runtest_logreport") if r.when == "call"]
    assert all(r.passed for r in reports), [r.nodeid for r in reports if not r.passed]
    return sorted(r.nodeid.split("::")[1] for r in reports)


def test_collection_on_this_machine(pytester, monkeypatch):
    """Default run: every device present, no skips; ``-m cuda`` selects exactly the CUDA runs."""
    monkeypatch.delenv(ENV, raising=False)
    pytester.makeconftest(_CONFTEST)
    pytester.makeini(_INI)
    pytester.makepyfile(test_it=_TESTS)
    devices = ["cpu"] + (["cuda"] if CUDA_COUNT else [])
    result = pytester.inline_run("-p", "no:cacheprovider", "-p", "no:xdist")
    want = sorted(
        [f"test_takes_device[{d}]" for d in devices]
        + [f"test_parametrized_too[{d}-{n}]" for d in devices for n in (1, 2)]
        + ["test_chooses_its_own[chosen]", "test_no_device"]
    )
    assert _ran(result) == want
    on_cuda = pytester.inline_run("-p", "no:cacheprovider", "-p", "no:xdist", "-m", "cuda")
    assert _ran(on_cuda) == [i for i in want if "[cuda" in i]
    assert on_cuda.ret == (pytest.ExitCode.OK if CUDA_COUNT else pytest.ExitCode.NO_TESTS_COLLECTED)


def test_asking_for_an_absent_cuda_device_fails_collection(pytester, monkeypatch):
    """``cuda:<count>`` is absent on every machine: a usage error naming the variable, not a skip."""
    monkeypatch.setenv(ENV, f"cpu,cuda:{CUDA_COUNT}")
    pytester.makeconftest(_CONFTEST)
    pytester.makeini(_INI)
    pytester.makepyfile(test_it=_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:xdist")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    said = "torch.cuda.is_available() is False" if CUDA_COUNT == 0 else f"has {CUDA_COUNT} CUDA device(s)"
    result.stderr.fnmatch_lines([f"*{ENV}=*cuda:{CUDA_COUNT}*{said}*"])
