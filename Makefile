# docker-vrouter. `make demo` and `make test` need nothing else on a fresh machine of
# this project's kind (they install what they need through .ci/setup).

SHELL := /bin/bash
CARGO ?= cargo
MUSL_TARGET := x86_64-unknown-linux-musl
IMAGE_TAG ?= local
PREFIX ?= vrt
export VROUTER_TEST_PREFIX ?= $(PREFIX)

.PHONY: all setup build musl images demo test unit-test root-test docker-test bench clean-leftovers fmt lint

all: build

setup:
	bash .ci/setup

build:
	$(CARGO) build --release --workspace --bins

# Static binaries for the FROM-scratch images.
musl:
	$(CARGO) build --release --target $(MUSL_TARGET) -p vrouter-discovery -p vrouter-router -p vrouter-tests --bins

images: musl
	docker build -f Dockerfile.discovery -t docker-vrouter/discovery:$(IMAGE_TAG) .
	docker build -f Dockerfile.router -t docker-vrouter/router:$(IMAGE_TAG) .
	docker build -f Dockerfile.testsvc -t docker-vrouter/testsvc:$(IMAGE_TAG) .
	@docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep '^docker-vrouter/'

demo: setup build
	bash tests/cleanup.sh
	$(CARGO) run --release -p vrouter-tests --bin vrt-demo

# Everything: unit tests without root, then the namespace and Docker tests (root).
test: setup
	bash tests/cleanup.sh
	$(CARGO) build --release --workspace --bins
	$(CARGO) test --release --workspace --lib --bins
	$(CARGO) test --release --workspace --tests -- --test-threads=1

bench: setup build
	$(CARGO) run --release -p vrouter-tests --bin vrt-bench

clean-leftovers:
	bash tests/cleanup.sh

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings
