# One-word targets. `make demo` and `make test` are the README's quick start.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo dev test lint bench bench-dagster bench-replications bench-snapshot snapshot-long fuzz faults install \
	system-deps clean

# Everything a fresh machine needs: PostgreSQL 15 + wal2json (Debian) and the Python packages.
# The native accelerators (Cython, setup.py) are compiled by the same install; here a failed compile is an
# error (PG2K_REQUIRE_NATIVE=1), where a plain `pip install` would fall back to the pure-Python path.
NATIVE := $(shell find pg2kinesis_dagster -name '_*.pyx' -o -name '_*.pxd')
$(STAMP): pyproject.toml setup.py $(NATIVE)
	./scripts/install-system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	PG2K_REQUIRE_NATIVE=1 $(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

system-deps:
	./scripts/install-system-deps

demo: $(STAMP)
	$(PY) -m pg2kinesis_dagster.devstack.demo

dev: $(STAMP)
	$(PY) -m pg2kinesis_dagster.devstack.demo --dev

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# BASELINE=<commit> adds a "before" column: pg2k of that commit, side by side in the same run.
bench: $(STAMP)
	$(PY) benchmarks/bench_compare.py $(if $(BASELINE),--baseline $(BASELINE))
	$(PY) benchmarks/bench_drain.py --changes 200000
	$(PY) benchmarks/bench_decoder.py

# The Dagster path under a real dagster-daemon next to pg2k (about 15 minutes); BENCH_ARGS picks scenarios.
bench-dagster: $(STAMP)
	$(PY) benchmarks/bench_dagster.py $(BENCH_ARGS)

# The snapshot rate side by side with COPY ... TO STDOUT of the same table (README: "Snapshots and backfills").
bench-snapshot: $(STAMP)
	$(PY) benchmarks/bench_snapshot.py --rows 100000 --repeat 3

# The snapshot done-when tests at 100,000 rows per table (the default suite runs 2,000).
snapshot-long: $(STAMP)
	PG2K_SNAPSHOT_ROWS=100000 $(PY) -m pytest tests/test_snapshot.py -q -p no:randomly -k "concurrent or killed" \
		--timeout=3600 --durations=0

# Four replications in one code location under one dagster-daemon, against one alone (a few minutes).
bench-replications: $(STAMP)
	$(PY) benchmarks/bench_replications.py $(BENCH_ARGS)

faults: $(STAMP)
	PG2K_FAULTS_PROFILE=long $(PY) -m pytest tests/faults -q -s -p no:warnings --timeout=3600

fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q -p no:warnings tests/test_decoder_properties.py \
		tests/test_decoder_live_properties.py tests/test_typed_json.py --hypothesis-show-statistics

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info
