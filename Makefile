PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config/proxy.example.yaml
# make run listens on loopback only; `make run HOST=0.0.0.0 PORT=9000` to expose it.
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: run test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	mkdir -p data
	$(BIN)/budget-proxy serve --config $(CONFIG) --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) data .pytest_cache .hypothesis

.PHONY: demo browser

# The proxy in front of the loopback Anthropic simulator, driven by the anthropic SDK (no key, no network).
demo: $(VENV)/.installed-dev
	$(BIN)/python -m tests.demo

# The headless-Chromium dashboard test (needs `chromium`); also refreshes docs/dashboard.png.
browser: $(VENV)/.installed-dev
	BUDGET_PROXY_REQUIRE_BROWSER=1 BUDGET_PROXY_SCREENSHOT=docs/dashboard.png \
		$(BIN)/python -m pytest tests/test_dashboard.py -k browser

.PHONY: bench

# Load benchmark (bench/README.md): installs wrk, nginx and the bench-only tools when missing,
# runs about 6 minutes, prints the results table and rewrites bench/RESULTS.md.
bench: $(VENV)/.installed-run
	bash bench/setup.sh $(BIN)
	$(BIN)/python -m bench.run

.PHONY: bench-scale

# 10,000 concurrent streams, one event a second for 60 s, through one proxy: on the SQLite store, then on
# the local Redis (skipped when none answers), first with an HTTP/1.1 upstream (two descriptors a stream: capped
# by RLIMIT_NOFILE), then HTTP/2 (h2c, up to 1,000 streams a connection); about 5 minutes; rewrites
# bench/RESULTS-scale.md (bench/README.md, "Scale").
bench-scale: $(VENV)/.installed-run
	bash bench/setup.sh $(BIN)
	$(BIN)/python -m bench.run --scale-only --streams 10000 --interval-ms 1000 --events 60 --stores sqlite,redis \
		--protocols h1,h2

.PHONY: bench-workers

# `serve --workers N` on the local Redis at N = 1 and N = 2: JSON and SSE burst at c=16 and c=32, 3 interleaved
# rounds, about 4 minutes; rewrites bench/RESULTS-workers.md (bench/README.md, "Workers").
bench-workers: $(VENV)/.installed-run
	bash bench/setup.sh $(BIN)
	$(BIN)/python -m bench.workers
