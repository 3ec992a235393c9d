# Quick start: `make demo` (set up, run the attention specs on the embedded model, write the report)
#              `make test` (set up, run the test suite)
VENV := .venv/bin
SETUP_STAMP := .venv/.setup-done

$(SETUP_STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(SETUP_STAMP)

.PHONY: setup demo test lint
setup: $(SETUP_STAMP)

demo: $(SETUP_STAMP)
	$(VENV)/python -m pytest specs/

test: $(SETUP_STAMP)
	$(VENV)/python -m pytest -q -n 2 tests specs

lint: $(SETUP_STAMP)
	$(VENV)/ruff check .
