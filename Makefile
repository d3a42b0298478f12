# Two commands on a fresh machine:
#   make demo   create .venv, install, generate the synthetic twin, train A->B->C->D,
#               evaluate every test glacier and print the summary table; then run every
#               glacier of the bundled real Oetztal region (published D) against WGMS
#   make test   run the test suite in the same environment
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= data/demo
OUT_DIR ?= outputs/demo
# Test worker processes (pytest-xdist): one per core, at most 4 (each holds its own JAX, ~2.5 GB).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ "$$n" -gt 4 ] && n=4; echo $$n)

.PHONY: demo test install clean-demo

# uv installs the same packages as pip in about a quarter of the time (parallel downloads);
# pip does it where uv cannot be installed.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	if $(PY) -m pip install --quiet uv; then \
		$(VENV)/bin/uv pip install --quiet --python $(PY) -e ".[dev,notebooks,oggm]"; \
	else \
		$(PY) -m pip install --quiet --upgrade pip && $(PY) -m pip install --quiet -e ".[dev,notebooks,oggm]"; \
	fi
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m core.apps.demo --data_folder $(DEMO_DIR) --out_dir $(OUT_DIR)

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

clean-demo:
	rm -rf $(DEMO_DIR) $(OUT_DIR)
