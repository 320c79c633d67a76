# Two commands on a fresh clone: `make train` and `make test`. Both create the
# project virtual environment (.venv) on first use.
#
# torch: if the Python that builds the venv already imports torch (a GPU box with
# its own CUDA build), the venv sees it through --system-site-packages and keeps
# it. Otherwise TORCH_SPEC is installed first; the default pin resolves to the
# CPU wheel on this project's machines, so no CUDA packages are pulled.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train smoke test test-fast lint ui clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "using the torch that $(PYTHON) already has"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(BIN)/pip install -q "$(TORCH_SPEC)"; \
	fi
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

train: install
	$(BIN)/nsa-lab train experiments/default.yaml

smoke: install
	$(BIN)/nsa-lab train experiments/smoke.yaml

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

ui: install
	$(BIN)/nsa-lab ui

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
