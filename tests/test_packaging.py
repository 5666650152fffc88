"""The wheel installs cockpit_lite (with the instruments as cockpit_lite.instruments) and nothing else."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_has_one_top_level_package(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("cockpit_lite-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert z.read(top_level).decode().split() == ["cockpit_lite"]
    roots = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert roots == {"cockpit_lite"}, roots
    for module in ("alpha", "tracin", "clipping", "presets", "_util"):
        assert f"cockpit_lite/instruments/{module}.py" in names
    # every subpackage of the source tree made it into the wheel (pyproject lists them)
    for init in (ROOT / "cockpit_lite").rglob("__init__.py"):
        rel = init.relative_to(ROOT).as_posix()
        if "instruments" not in rel:
            assert rel in names, f"{rel} is missing from the wheel: add its package to pyproject.toml"


def test_the_documented_import():
    from cockpit_lite.instruments import Alpha, TracIn  # noqa: F401

    from cockpit_lite.registry import available_instruments

    assert all(cls.__module__.startswith("cockpit_lite.instruments") for cls in available_instruments().values())
