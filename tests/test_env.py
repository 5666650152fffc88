"""The test environment: every package of the ``dev`` extra imports, torch is the CPU build, and
torchvision is absent.

torchvision is a declared dependency of backpack-for-pytorch and timm, but the build pip resolves
beside torch 2.13.0+cpu does not load (``operator torchvision::nms does not exist``), and transformers
imports it when it is installed, which breaks its model classes. The Makefile uninstalls it after
installing the ``dev`` extra (docs/install.md). Neither BackPACK nor the tests need it; the tests use
timm's ``adaptive_clip_grad`` from its source file, without importing timm (which imports torchvision).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest
import tomllib
import torch

ROOT = Path(__file__).resolve().parents[1]

#: distribution name -> the module the tests import
MODULES = {
    "pytest": "pytest",
    "pytest-xdist": "xdist",
    "ruff": "ruff",
    "scikit-learn": "sklearn",
    "backpack-for-pytorch": "backpack",
    "captum": "captum",
    "tbparse": "tbparse",
    "transformers": "transformers",
    "accelerate": "accelerate",
    "lightning": "lightning",
    "opacus": "opacus",
    "peft": "peft",
}


def _dev_extra() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [re.split(r"[<>=!~ \[;]", req, maxsplit=1)[0] for req in project["optional-dependencies"]["dev"]]


def test_every_dev_package_is_known_here():
    assert set(_dev_extra()) == set(MODULES) | {"timm"}


@pytest.mark.parametrize("dist", sorted(MODULES))
def test_dev_package_imports(dist):
    importlib.import_module(MODULES[dist])


def test_timm_agc_source_loads_without_importing_timm():
    from tests.test_clipping import _timm_adaptive_clip_grad

    assert callable(_timm_adaptive_clip_grad())


def test_transformers_models_import():
    from transformers import BertForMaskedLM, GPT2LMHeadModel, ViTForImageClassification  # noqa: F401
    from transformers.pytorch_utils import Conv1D  # noqa: F401


def test_torchvision_is_absent():
    assert importlib.util.find_spec("torchvision") is None, (
        "torchvision is installed: it does not load beside torch 2.13.0+cpu and breaks transformers' model "
        "imports; `pip uninstall torchvision` (the Makefile does so after installing the dev extra)"
    )


def test_torch_is_the_cpu_build():
    assert torch.__version__.startswith("2.13.0") and torch.version.cuda is None
