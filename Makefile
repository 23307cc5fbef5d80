# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create (or refresh) the project virtual environment in $(VENV) first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# On a small, busy CPU host torch's OpenMP threads spin-wait and make small ops
# ~1000x slower; passive waiting costs nothing on a real device.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test test-vendor test-sglang-low test-fast mutants bench device-check clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/frameworks.txt requirements/no-deps.txt requirements/constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements/frameworks.txt -c requirements/constraints.txt
	$(PIP) install -q --no-deps -r requirements/no-deps.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: install
	$(PY) -m maca_infer.demo

# Everything, the slow end-to-end tests included (what CI runs): the main lane, and
# every lane of tools/lane.py (vendor, sglang-low). tools/test_all.py builds the lanes'
# venvs and runs their server-free stages beside the main lane's pytest, then their
# server stages; logs in build/lanes/.
test: install
	$(PYTHON) tools/test_all.py --main-python $(PY) -- $(PYTEST_ARGS)

# The vendor lane (tools/lane.py): MetaX's versions (torch 2.10.0, triton 3.6.0,
# transformers 4.46.3, diffusers 0.31.0; LMDeploy on transformers 4.56.0) in
# .venv-maca, frameworks installed by `maca-infer setup`. LANE_ARGS="-x" go to pytest.
LANE_ARGS ?=
test-vendor:
	$(PYTHON) tools/lane.py vendor -- $(LANE_ARGS)

# The SGLang low-end lane (tools/lane.py): SGLang 0.5.17, the floor of its range, on
# torch 2.11.0 in .venv-sglang-low; the platform, backend parity, one server (part of
# `make test`).
test-sglang-low:
	$(PYTHON) tools/lane.py sglang-low -- $(LANE_ARGS)

# Without the end-to-end servers: the quick loop while developing.
test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Mutation testing: each bug planted by tools/mutants.py, one at a time in a
# scratch copy, must fail its fast tests (table of killed/survived; exit 1 if any
# survives). MUTANTS_ARGS="--only NAME,..." for a few, "--list" to see them.
MUTANTS_ARGS ?=
mutants: install
	$(PY) tools/mutants.py $(MUTANTS_ARGS)

bench: install
	$(PY) -m maca_infer.bench

# Device acceptance (tools/device_check.py): on a MACA or CUDA card, compiled kernels vs references,
# per-kernel shared memory/registers/spills and tiers, bench ops vs floors, LMDeploy/SGLang greedy
# parity with HF; one Markdown report. Exits 2 at once without a device.
# DEVICE_CHECK_ARGS="--steps ops,resources --budget-s 300 --out report.md"
DEVICE_CHECK_ARGS ?=
device-check: install
	$(PY) tools/device_check.py $(DEVICE_CHECK_ARGS)

clean:
	rm -rf $(VENV) .venv-maca .venv-sglang-low build *.egg-info
