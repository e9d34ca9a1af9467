# Two entry points: `make demo` (install + FedDAT on the embedded Domain benchmark) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test clean

$(BIN)/feddat: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(BIN)/feddat

demo: install
	$(BIN)/feddat run --benchmark domain --method feddat --out runs/demo --force

# two workers: the tests are single-threaded, so a 2-core machine runs two at once (pytest-xdist)
test: install
	$(BIN)/python -m pytest -q -n 2

clean:
	rm -rf runs .pytest_cache
