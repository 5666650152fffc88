"""benchmarks/checkout_metadata.py: the dist-info it writes gives importlib.metadata the same entry points
as the installed package's (setuptools wrote those), so an uninstalled checkout finds its presets."""

from __future__ import annotations

from importlib.metadata import distribution, distributions

import pytest

from tests.bench_util import benchmark_module

GROUPS = ("cockpit_lite.instruments", "cockpit_lite.presets")


@pytest.fixture(scope="module")
def meta():
    yield from benchmark_module("checkout_metadata")


def _points(dist) -> set[tuple[str, str, str]]:
    return {(ep.group, ep.name, ep.value) for ep in dist.entry_points if ep.group in GROUPS}


def test_the_written_entry_points_are_the_installed_packages(meta, tmp_path):
    meta.write(tmp_path)
    (written,) = list(distributions(path=[str(tmp_path)]))
    assert written.metadata["Name"] == "cockpit-lite"
    installed = distribution("cockpit-lite")
    assert written.version == installed.version
    points = _points(written)
    assert ("cockpit_lite.presets", "economy", "cockpit_lite.instruments.presets:economy") in points
    assert points == _points(installed)
