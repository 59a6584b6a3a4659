# Two commands: `make run` (the main job on its default) and `make test`.
# Each creates .venv, installs torch==2.13.0 only if torch is missing, then the package, then
# moshi 0.2.13 with --no-deps (it pins torch<2.10; its real needs are in pyproject.toml).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	@$(BIN)/pip install -q -e ".[test]"
	@$(BIN)/python -c "import moshi" 2>/dev/null || $(BIN)/pip install -q --no-deps moshi==0.2.13
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/moshi-ttt study --preset cpu

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/bench.py --preset tiny --device cpu

clean:
	rm -rf $(VENV) runs
