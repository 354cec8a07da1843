# Two entry points: `make demo` (set up, then run the main job) and `make test` (set up, then run the tests).
# TORCH_SPEC picks the torch build installed first; the default is the CPU wheel this workplace keeps on disk,
# so set-up never pulls a multi-GB CUDA build. Elsewhere: `make test TORCH_SPEC="torch>=2.4"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test bench lint clean wheel-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,demo]"

demo: setup
	$(BIN)/python examples/mislabel_digits.py

test: setup
	$(BIN)/ruff check tracin_func tests benchmarks examples
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/run_all.py

# Build the sdist and wheel, install the wheel into a fresh venv and smoke-test it outside the checkout.
wheel-check:
	PYTHON="$(PYTHON)" TORCH_SPEC="$(TORCH_SPEC)" .ci/wheel_check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
