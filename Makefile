# Every target creates .venv on first use and installs what it needs into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
BASE   := $(VENV)/.base
DEMO   := $(VENV)/.demo
DEV    := $(VENV)/.dev

.PHONY: venv demo test test-quick bench docs clean

# the virtual environment with torch: the local CPU build of torch 2.13.0 when this machine has
# one (it never pins users' torch: the package itself asks for torch>=2.2)
$(BASE):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0 2>/dev/null || echo "torch 2.13.0 CPU build not available locally; using the resolver's torch"
	touch $(BASE)

$(DEMO): $(BASE) pyproject.toml
	$(PIP) install -q -e ".[demo]"
	touch $(DEMO)

$(DEV): $(BASE) pyproject.toml
	$(PIP) install -q -e ".[dev]"
	touch $(DEV) $(DEMO)

venv: $(DEV)

demo: $(DEMO)
	$(PY) examples/quickstart.py

# the browser tests (tests/test_report_*.py) open the HTML report in headless Chromium: installed here
# when missing and this is a Debian machine where we are root (CI), so that they run rather than skip
test: $(DEV)
	command -v chromium >/dev/null || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	$(PY) -m pytest -n 2 --dist loadfile -q

test-quick: $(DEV)
	$(PY) -m pytest -n 2 --dist loadfile -q -m "not slow"

bench: $(DEV)
	$(PIP) install -q -r benchmarks/requirements.txt
	$(PIP) install -q --no-deps kronfluence==1.0.1
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# influence at the size people train (issue 20): GPT-2 small (real vocabulary), plain vs each callback
# at its defaults, each run in its own process (docs/benchmarks.md); BENCH_SCALE_ARGS="--model pythia-410m"
.PHONY: bench-scale
bench-scale: $(DEV)
	$(PY) benchmarks/bench_scale.py $(BENCH_SCALE_ARGS)

# the evaluation matrix of issue 21 (docs/benchmarks_matrix.md); retrained ground truths are cached
# under benchmarks/out/matrix, so a rerun only rescores
.PHONY: bench-matrix
bench-matrix: $(DEV)
	nice -n 10 $(PY) benchmarks/bench_matrix.py $(BENCH_MATRIX_ARGS)

# what 16-bit factor storage does to scores, LDS and AP (issue 20; docs/benchmarks_factor_precision.md); cached under
# benchmarks/out/factor_precision
.PHONY: bench-factor-precision
bench-factor-precision: $(DEV)
	nice -n 10 $(PY) benchmarks/bench_factor_precision.py $(BENCH_FACTOR_PRECISION_ARGS)

docs: $(DEV)
	$(VENV)/bin/mkdocs build --strict -d site

clean:
	rm -rf $(VENV) build *.egg-info
