# The README's two commands: `make reproduce` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PROFILE ?= cpu
# smoke runs never write over the committed report/ (docs/design.md §8)
ifeq ($(PROFILE),cpu)
OUT ?= report
else
OUT ?= build/$(PROFILE)/report
endif
STAMP  := $(VENV)/.igrpn-installed
# OpenMP threads that spin while waiting slow small operations 10-100x on a busy 2-core machine
# (benchmarks/NOTES.md); passive waiting costs nothing measurable elsewhere.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install reproduce test bench clean-build

install: $(STAMP)

# torch is pinned: the CPU build 2.13.0 (an unpinned torch pulls a multi-GB CUDA build).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]" "torch==2.13.0"
	touch $(STAMP)

reproduce: $(STAMP)
	$(PY) -m igrpn.reproduce --profile $(PROFILE) --out $(OUT) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The benchmark suite (report/benchmarks.csv|md); MONAI's RetinaNet peer row needs the `bench` extra.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]" "torch==2.13.0"
	$(PY) -m benchmarks.bench --out-dir $(OUT)

clean-build:
	rm -rf build
