"""benchmarks/gpu.sh's dry run on the CPU (GPU_DEVICE=cpu, the tests left out): every part it runs reaches
its output, the overhead rows and the profile among them, and it exits 0; a model it cannot build makes
it exit non-zero. (On a GPU the same script runs the CUDA tests first: docs/performance.md, "GPU".)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    settings = {
        "GPU_DEVICE": "cpu",
        "GPU_TESTS": "0",
        "GPU_MODELS": "mlp",
        "GPU_CONFIGS": "economy-alpha",
        "GPU_REPS": "1",
        "GPU_STEPS": "1",
        "GPU_BUDGET": "0",
        "GPU_IDLE_MODELS": "tiny",
        "GPU_IDLE_STEPS": "3",
        "PYTHON": sys.executable,
        "OUT": str(tmp_path),
        **env,
    }
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh")],
        env={**os.environ, **settings},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_the_dry_run_goes_through_every_part(tmp_path):
    done = _dry_run(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = (tmp_path / "gpu.txt").read_text()
    for header in ("=== device", "=== overhead on cpu", "=== where a step's time goes on cpu", "=== untracked steps"):
        assert header in out
    assert "=== tests" not in out  # (GPU_TESTS=0)
    rows = [line.split() for line in out.splitlines() if line.startswith("mlp ")]
    assert [r[2] for r in rows if len(r) > 2][:2] == ["plain", "economy-alpha"]
    assert "economy-alpha: the most own host time" in out and "tiny: plain step" in out
    assert (tmp_path / "overhead_gpu.json").exists()


@pytest.mark.slow
def test_a_part_that_fails_makes_the_script_fail(tmp_path):
    done = _dry_run(tmp_path, GPU_MODELS="no-such-model", GPU_PROFILE="0", GPU_IDLE="0")
    assert done.returncode != 0
