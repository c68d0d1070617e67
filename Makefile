# docker-vrouter. `make demo`, `make test` and `make images` need nothing else on a fresh
# machine of this project's kind (they install what they need: .ci/setup, or the musl
# target and busybox-static for the images).

SHELL := /bin/bash
CARGO ?= cargo
MUSL_TARGET := x86_64-unknown-linux-musl
IMAGE_TAG ?= local
PREFIX ?= vrt
export VROUTER_TEST_PREFIX ?= $(PREFIX)

.PHONY: all setup build musl images demo test unit-test root-test docker-test bench soak chaos bench-acl bench-datapath bench-encryption bench-relay bench-migration bench-scale bench-report fuzz clean-leftovers fmt lint

all: build

setup:
	bash .ci/setup

build:
	$(CARGO) build --release --workspace --bins

# Static binaries for the FROM-scratch images (adds the musl target on first use, as
# .ci/setup does, and musl-tools: boringtun's `ring` compiles C and assembly with
# x86_64-linux-musl-gcc).
musl:
	@rustup target list --installed 2>/dev/null | grep -qx $(MUSL_TARGET) || { echo "adding the $(MUSL_TARGET) target"; rustup target add $(MUSL_TARGET); }
	@command -v x86_64-linux-musl-gcc >/dev/null || { echo "installing musl-tools"; DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq musl-tools >/dev/null; }
	$(CARGO) build --release --target $(MUSL_TARGET) -p vrouter-discovery -p vrouter-router -p vrouter-tests --bins

# The test-service image also carries Debian's busybox-static (installed here when
# missing, as .ci/setup does). Works on a fresh Docker host with rustup: the first step
# deploy/README.md gives.
images: musl
	@[ -x /bin/busybox ] || { echo "installing busybox-static"; DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null; }
	install -D -m 0755 /bin/busybox target/docker-stage/busybox
	DOCKER_BUILDKIT=0 docker build -q -f Dockerfile.discovery -t docker-vrouter/discovery:$(IMAGE_TAG) .
	DOCKER_BUILDKIT=0 docker build -q -f Dockerfile.router -t docker-vrouter/router:$(IMAGE_TAG) .
	DOCKER_BUILDKIT=0 docker build -q -f Dockerfile.testsvc -t docker-vrouter/testsvc:$(IMAGE_TAG) .
	@docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep '^docker-vrouter/.*:$(IMAGE_TAG) '

# End-to-end tests against the real Docker engine (root; builds the images itself).
# The cross-host test runs the musl binaries natively on its simulated host.
docker-test: musl
	VROUTER_BIN_DIR=$(CURDIR)/target/$(MUSL_TARGET)/release $(CARGO) test --release -p vrouter-tests --test docker_e2e -- --test-threads=1

demo: setup build
	bash .ci/cleanup
	$(CARGO) run --release -p vrouter-tests --bin vrt-demo

# Everything: unit tests without root, then the namespace and Docker tests (root).
# Debug builds: quicker to compile on two cores, and the tests find the daemons next to
# themselves in target/debug. Root tests share the host (and Docker) one at a time.
test: setup
	bash .ci/cleanup
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace -- --test-threads=1

# Raw results go to target/bench/*.json (one schema: tests/src/bench.rs); bench-report
# turns them into docs/benchmarks.md and docs/benchmarks.png and keeps a copy of the
# JSON in docs/bench/. Nothing in docs/benchmarks.md is typed by hand.
bench: setup build images
	$(CARGO) build --profile release-sym -p vrouter-discovery --bin vrouter-discovery
	mkdir -p target/bench
	bash .ci/cleanup
	target/release/vrt-bench --out target/bench/datapath.json
	target/release/vrt-enc-bench --discovery-bin target/release-sym/vrouter-discovery --out target/bench/encryption.json
	target/release/vrt-ctl-bench --out target/bench/control.json
	target/release/vrt-acl-bench --out target/bench/acl.json
	target/release/vrt-relay-bench --out target/bench/relay.json
	target/release/vrt-migration-bench --out target/bench/migration.json
	target/release/vrt-gossip-bench --out target/bench/gossip-real.json
	target/release/gossip-sim --n1000 --out target/bench/gossip-sim.json
	target/release/vrt-image-sizes --tag $(IMAGE_TAG) --out target/bench/images.json
	$(MAKE) bench-report

# Fuzzes everything a gossip peer can send for 10 minutes (FUZZ_SECONDS), on stable
# Rust: the release build with panics caught and overflow checks on (profile fuzz).
# Writes target/bench/fuzz.json for bench-report; fails if anything crashed.
FUZZ_SECONDS ?= 600
fuzz:
	$(CARGO) build --profile fuzz -p vrouter-gossip --bin gossip-fuzz
	mkdir -p target/bench
	target/fuzz/gossip-fuzz --seconds $(FUZZ_SECONDS) --out target/bench/fuzz.json > /dev/null

# The access-control figures alone (a few minutes), into the same JSON and report; the
# page keeps the other benches' figures of the last full run (docs/bench/*.json).
bench-acl: setup build
	mkdir -p target/bench
	bash .ci/cleanup
	target/release/vrt-acl-bench --out target/bench/acl.json
	for f in docs/bench/*.json; do [ -e target/bench/$$(basename $$f) ] || cp $$f target/bench/; done
	$(MAKE) bench-report

# The datapath figures alone (vrt-bench, about 11 minutes), into the same JSON and report;
# the page keeps the other benches' figures of the last full run (docs/bench/*.json).
bench-datapath: setup build
	mkdir -p target/bench
	bash .ci/cleanup
	target/release/vrt-bench --out target/bench/datapath.json
	for f in docs/bench/*.json; do [ -e target/bench/$$(basename $$f) ] || cp $$f target/bench/; done
	$(MAKE) bench-report

# The encryption figures alone (vrt-enc-bench, about 6 minutes: the plain and the
# encrypted overlay side by side, and where the userspace WireGuard spends its CPU; its
# discovery comes from the release-sym profile so that perf can name functions), into
# the same JSON and report; the page keeps the other benches' figures of the last full
# run (docs/bench/*.json).
bench-encryption: setup build
	$(CARGO) build --profile release-sym -p vrouter-discovery --bin vrouter-discovery
	mkdir -p target/bench
	bash .ci/cleanup
	target/release/vrt-enc-bench --discovery-bin target/release-sym/vrouter-discovery --out target/bench/encryption.json
	for f in docs/bench/*.json; do [ -e target/bench/$$(basename $$f) ] || cp $$f target/bench/; done
	$(MAKE) bench-report

# The relay figures alone (vrt-relay-bench, about 5 minutes: relayed against direct
# traffic, relay failover and the return to the direct path, on four simulated hosts),
# into the same JSON and report; the page keeps the other benches' figures of the last
# full run (docs/bench/*.json).
bench-relay: setup build
	mkdir -p target/bench
	bash .ci/cleanup
	target/release/vrt-relay-bench --out target/bench/relay.json
	for f in docs/bench/*.json; do [ -e target/bench/$$(basename $$f) ] || cp $$f target/bench/; done
	$(MAKE) bench-report

# An hour of churn (SOAK_SECONDS, default 3600; not in `make bench`, not in CI): five
# simulated gossip hosts, stacks coming and going, hosts cut off and healed, discovery
# and router restarts, every pair of live stacks pinged continuously, RSS, descriptors
# and kernel objects sampled (tests/src/soak.rs). Writes target/bench/soak.json and
# soak-series.json; bench-report then draws docs/soak.png and adds the soak section to
# docs/benchmarks.md (run even when the verdict fails; the target fails after it).
SOAK_SECONDS ?= 3600
SOAK_SEED ?= 1
soak: setup build
	mkdir -p target/bench
	bash .ci/cleanup
	status=0; target/release/vrt-soak --seconds $(SOAK_SECONDS) --seed $(SOAK_SEED) --out target/bench/soak.json --series target/bench/soak-series.json || status=$$?; \
	for f in docs/bench/*.json; do [ -e target/bench/$$(basename $$f) ] || cp $$f target/bench/; done; \
	/usr/bin/python3 tests/bench-report.py --in target/bench --md docs/benchmarks.md --png docs/benchmarks.png --raw-dir docs/bench --soak-png docs/soak.png && exit $$status

# The migration figures alone (vrt-migration-bench, about 2 minutes: a stack moved
# between simulated gossip hosts, gracefully and with its old host cut off, then the
# stale copy's return), into the same JSON and report; the page keeps the other
# benches' figures of the last full run (docs/bench/*.json).
bench-migration: setup build
	mkdir -p target/bench
	bash .ci/cleanup
	target/release/vrt-migration-bench --out target/bench/migration.json
	for f in docs/bench/*.json; do [ -e target/bench/$$(basename $$f) ] || cp $$f target/bench/; done
	$(MAKE) bench-report

# Scale (about 40 minutes; not in `make bench`): vrt-scale-bench (100 stacks on one host
# plus a second host with real routers; 20 hosts x 5 stacks with gossip) writes
# target/bench/scale.json, gossip-sim --scale (meshes of 100..400 nodes whose records are
# those of 100-stack hosts, the trend to 10,000) target/bench/gossip-scale.json; the
# page keeps the other benches' figures of the last full run (docs/bench/*.json).
SCALE_SIM ?= 100x100,200x100,300x100,400x100
bench-scale: setup build
	mkdir -p target/bench
	bash .ci/cleanup
	target/release/vrt-scale-bench --out target/bench/scale.json
	target/release/gossip-sim --scale $(SCALE_SIM) --out target/bench/gossip-scale.json > /dev/null
	for f in docs/bench/*.json; do [ -e target/bench/$$(basename $$f) ] || cp $$f target/bench/; done
	$(MAKE) bench-report

# Crash at any point (issue 18, vrt-chaos, about 15 minutes): 100 random kill -9 of
# discovery and 100 of routers on a 3-host mesh, then every crash point once; each must
# converge to the kernel state the test topology implies, with no torn state file.
# Into the same JSON and report (not part of `make bench`).
CHAOS_ARGS ?=
chaos: setup build
	mkdir -p target/bench
	bash .ci/cleanup
	target/release/vrt-chaos --out target/bench/chaos.json $(CHAOS_ARGS)
	for f in docs/bench/*.json; do [ -e target/bench/$$(basename $$f) ] || cp $$f target/bench/; done
	$(MAKE) bench-report

# Regenerates docs/benchmarks.md and docs/benchmarks.png from target/bench/*.json
# (needs python3-matplotlib, which .ci/setup installs).
bench-report:
	/usr/bin/python3 tests/bench-report.py --in target/bench --md docs/benchmarks.md --png docs/benchmarks.png --raw-dir docs/bench

clean-leftovers:
	bash .ci/cleanup

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings
