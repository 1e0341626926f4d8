# appset developer entry points. `make up` brings up a local cluster with appset on it;
# `make test` runs every test (lint, unit, end-to-end on a real local control plane).
SHELL := /bin/bash
.DEFAULT_GOAL := help

.PHONY: help up down test lint unit e2e crds bench control-plane

help:
	@echo "make up      local control plane (built from Go modules, cached) with appset running on it"
	@echo "make down    stop it and remove its state"
	@echo "make test    every test: fmt, clippy, unit tests, CRD freshness, end-to-end"
	@echo "make crds    regenerate charts/appset/files/crds from the Rust types"
	@echo "make bench   the benchmarks (print figures)"

control-plane:
	e2e/cluster/build.sh >/dev/null

up:
	e2e/cluster/up.sh
	e2e/cluster/install.sh

down:
	e2e/cluster/down.sh

crds:
	cargo run -q -p appset-crds --bin crdgen

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

unit:
	cargo test --workspace --exclude appset-e2e

e2e:
	e2e/run.sh

bench:
	e2e/bench.sh

test: lint unit e2e
