# Two commands do everything: `make demo` and `make test`. The environment is created on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the local CPU wheel, never a CUDA build (see docs/install.md)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	# torchvision (declared by backpack and timm) does not load beside the CPU torch and breaks transformers
	$(PY) -m pip uninstall -q -y torchvision
	touch $(STAMP)

demo: $(STAMP)
	$(PY) demos/lr_debugging.py
	$(PY) demos/make_readme_images.py --logdir runs/readme --out runs/readme
	$(PY) demos/stability.py --logdir runs/stability --out runs/stability/dashboard.png

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
