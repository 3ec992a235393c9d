# Quick start: `make demo` (set up, extract from the embedded model, print statistics)
#              `make test` (set up, run the test suite)
VENV := .venv/bin
SETUP_STAMP := .venv/.setup-done

$(SETUP_STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(SETUP_STAMP)

.PHONY: setup demo test
setup: $(SETUP_STAMP)

demo: $(SETUP_STAMP)
	$(VENV)/attn-harness extract --model tiny-random --out reports/demo.nc
	$(VENV)/attn-harness stats reports/demo.nc --layer 3

test: $(SETUP_STAMP)
	$(VENV)/python -m pytest -q tests specs
