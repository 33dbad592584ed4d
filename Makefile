# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-gpu demo test lint bench clean

setup:
	@bash scripts/setup_venv.sh

# A CUDA machine that already has torch: keep it (HETCOMP_WHEELHOUSE=DIR for an offline machine).
setup-gpu:
	@bash scripts/setup_gpu.sh

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check hetcomp tests examples bench

bench: setup
	$(PY) bench/hessian.py

clean:
	rm -rf build .pytest_cache
