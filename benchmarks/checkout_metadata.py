"""Entry points for a checkout that is not installed: ``python benchmarks/checkout_metadata.py DIR`` writes
``DIR/cockpit_lite-<version>.dist-info`` (METADATA and entry_points.txt, the installed package's format)
from pyproject.toml, so that with DIR on PYTHONPATH the registry finds the presets and instruments
(cockpit_lite/registry.py) without ``pip install``. benchmarks/gpu.sh uses it on a machine where nothing
can be installed."""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def write(folder: str | Path, pyproject: str | Path = ROOT / "pyproject.toml") -> Path:
    """The dist-info folder written under ``folder`` for ``pyproject``'s project."""
    project = tomllib.loads(Path(pyproject).read_text())["project"]
    info = Path(folder) / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = project.get("entry-points", {})
    text = "\n".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for group, eps in groups.items())
    (info / "entry_points.txt").write_text(text)
    return info


if __name__ == "__main__":
    print(write(sys.argv[1]))
