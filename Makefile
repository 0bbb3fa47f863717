# Sealed OTA — developer entry points. See README.md.
SHELL := /bin/bash
CARGO ?= cargo
TESTBED := e2e/testbed

.PHONY: test test-servers lint unit e2e e2e-cluster interop testbed testbed-down demo bench bench-large bench-scale crds chart images kind kind-down agent-deb no-std

## make test: formatting, lints, the no_std check (about 2 s warm, 2.5 min cold), unit tests,
## then the e2e tests on a test bed this target brings up and takes down itself (a failure still
## takes it down), then the broker-node-loss tests on a 3-node rmqtt cluster of its own. From the
## start, the servers and tools those stages need are built in the background at nice 19
## (test-servers: cached outside the clone, so only a cold run builds anything; about 12 minutes of
## a cold run's compiling that now takes the cycles the foreground leaves idle).
PREBUILD := $(CURDIR)/target/prebuild
test:
	scripts/background.sh start $(PREBUILD) -- $(MAKE) --no-print-directory test-servers
	$(MAKE) --no-print-directory lint no-std unit e2e e2e-cluster; rc=$$?; \
	  scripts/background.sh stop $(PREBUILD); exit $$rc

## The servers and tools make test's stages build once (each behind its own lock, so a stage that
## needs one before it is built waits for it): the control plane, the OCI registry and oras, the
## default broker, cargo-deb, and rmqttd in the profile make e2e-cluster runs.
test-servers:
	$(TESTBED) build
	scripts/cargo-deb-install.sh >/dev/null
	SEALED_OTA_RMQTT_PROFILE=testbed $(TESTBED) build --broker rmqtt-cluster

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

## Unit tests, no server needed: every crate's lib and bin tests, and the protocol crate's
## integration tests (vectors, rejections, mutations, property tests: pure, sans-IO).
unit:
	$(CARGO) test --workspace --locked --lib --bins
	$(CARGO) test --locked -p sealed-ota-protocol --test '*'

## Integration and e2e tests (every other crate's tests/ directory) against a real test bed, and a
## Docker engine for the image tests (e2e/tests/images.rs): scripts/docker.sh starts Debian's dockerd
## when none answers and stops it afterwards (by pid). The agent's tests drive real RAUC and Mender
## update modules: their Debian packages are installed first.
E2E_CRATES := --workspace --exclude sealed-ota-protocol
DOCKER_STATE := $(CURDIR)/target/docker
e2e:
	$(CARGO) build $(E2E_CRATES) --locked --bins --tests
	scripts/install-agent-test-deps.sh
	$(TESTBED) up
	scripts/docker.sh up $(DOCKER_STATE) || { $(TESTBED) down; exit 1; }
	eval "$$($(TESTBED) env)"; \
	  $(CARGO) test $(E2E_CRATES) --locked --no-fail-fast --test '*'; rc=$$?; \
	  $(TESTBED) down; scripts/docker.sh down $(DOCKER_STATE); exit $$rc

## make e2e-cluster: issue 16's broker-node-loss tests (e2e/tests/product_broker_cluster.rs: a
## broker node SIGKILLed mid-campaign, one left down, one restarted) on a test bed of its own
## (target/e2e-cluster/testbed) whose broker is a 3-node rmqtt Raft cluster. The first run builds
## rmqttd's `testbed` profile (about 7 minutes on 2 cores, cached in ~/.cache/sealed-ota).
CLUSTER_BED := $(CURDIR)/target/e2e-cluster/testbed
e2e-cluster:
	$(CARGO) build $(E2E_CRATES) --locked --bins --tests
	SEALED_OTA_TESTBED_DIR=$(CLUSTER_BED) SEALED_OTA_RMQTT_PROFILE=testbed $(TESTBED) up --broker rmqtt-cluster
	export SEALED_OTA_TESTBED_DIR=$(CLUSTER_BED); eval "$$($(TESTBED) env)"; \
	  $(CARGO) test -p sealed-ota-e2e --locked --test product_broker_cluster -- --include-ignored; rc=$$?; \
	  $(TESTBED) down; exit $$rc

## make interop: the product e2e groups and the broker probe on each broker in turn (Mosquitto,
## mochi-mqtt, the rmqtt 3-node Raft cluster, with the broker-node-loss tests), each on a test bed
## of its own; writes docs/interop.md and fails on a failure not listed in
## e2e/interop/known-failures.tsv. Not part of `make test` (which runs only the node-loss tests,
## `make e2e-cluster`): the runs take about 10 minutes a broker, and the first one builds rmqtt's
## release profile (about 14 minutes on 2 cores, cached in ~/.cache/sealed-ota).
## INTEROP_BROKERS picks some, e.g. INTEROP_BROKERS=mochi.
INTEROP_BROKERS ?= mosquitto mochi rmqtt-cluster
interop:
	SEALED_OTA_INTEROP_BROKERS="$(INTEROP_BROKERS)" e2e/interop.sh

## make testbed: bring the test bed up and print the exports that point at it.
testbed:
	$(TESTBED) up
	$(TESTBED) env

testbed-down:
	$(TESTBED) down

## make demo: test bed, CRDs, PKI, operator, 20 emulated devices and a real campaign, end to end.
demo:
	e2e/demo.sh

## make bench: the budgets of DESIGN.md section 5, each beside its baseline in one run, on a test
## bed of its own (target/bench/testbed); prints a table and writes target/bench/summary.json.
## BENCH_ARGS passes options, e.g. BENCH_ARGS='--devices 200 --scale-devices 0'.
BENCH_ARGS ?=
BENCH_BED := $(CURDIR)/target/bench/testbed
bench:
	mkdir -p target/bench
	SEALED_OTA_BENCH_RATIOS_ONLY=1 SEALED_OTA_BENCH_JSON=$(CURDIR)/target/bench/protocol.json \
	  $(CARGO) bench --locked -p sealed-ota-protocol --bench protocol
	$(CARGO) build --release --locked --workspace --bins
	test -x target/bench/delta/base || scripts/delta-pair.sh
	strip -o target/bench/delta/target target/release/sealed-ota-agent
	SEALED_OTA_TESTBED_DIR=$(BENCH_BED) $(TESTBED) up
	export SEALED_OTA_TESTBED_DIR=$(BENCH_BED); eval "$$($(TESTBED) env)"; \
	  target/release/sealed-ota-bench --out target/bench --protocol-json target/bench/protocol.json $(BENCH_ARGS); \
	  rc=$$?; $(TESTBED) down; exit $$rc

## make bench-large: issue 17's large-image row, not part of `make bench`: a LARGE_MIB MiB random
## image pushed with oras to the test bed's registry, an OCI campaign to LARGE_DEVICES devices
## (LARGE_IN_FLIGHT at once, each dropping its image once checked), the operator's and
## Mosquitto's memory budgets and the campaign beside a plain relay of the same bytes; writes
## target/bench/large/summary.{json,md} and removes the image, registry blob, cache and fleet.
LARGE_MIB ?= 1024
LARGE_DEVICES ?= 20
LARGE_IN_FLIGHT ?= 4
LARGE_BED := $(CURDIR)/target/bench/large/testbed
bench-large:
	$(CARGO) build --release --locked --workspace --bins
	SEALED_OTA_TESTBED_DIR=$(LARGE_BED) $(TESTBED) up
	export SEALED_OTA_TESTBED_DIR=$(LARGE_BED); eval "$$($(TESTBED) env)"; \
	  target/release/sealed-ota-bench --large-only --large-image-mib $(LARGE_MIB) \
	    --large-devices $(LARGE_DEVICES) --large-in-flight $(LARGE_IN_FLIGHT) --out target/bench/large; \
	  rc=$$?; $(TESTBED) down; exit $$rc

## make bench-scale: issue 16's scale run, not part of `make bench` (100,000 devices: about 10 min
## to enrol and connect, 15 min to install with SCALE_ARGS="--max-in-flight 20000", then the Device
## writes; on this 23 GB machine the apiserver ran out of memory during them, docs/scale.md):
## sharded campaigns (2 operator replicas, 4 shards, 16 KiB image) at each of
## SCALE_DEVICES devices through an rmqtt cluster of SCALE_NODES nodes, the fleet split over
## emulator processes (a process may hold 20,000 open files here, so no node or emulator holds more
## than about 14,000 devices), on a test bed of its own (target/bench/scale/testbed). Writes
## target/bench/scale/{scale.json,scale.md,completed.svg,cpu.svg,memory.svg}: per run wall time,
## devices a minute, CPU seconds and peak RSS per process (memory sampled every second; a run a
## test-bed process died in is written up to then), apiserver writes, etcd growth, devices lost;
## rmqtt's queue limits raised (with its defaults it drops what thousands of devices send at once);
## the cost model fitted to the runs with its prediction for 1,000,000 devices (docs/scale.md).
SCALE_DEVICES ?= 10000,30000,100000
SCALE_NODES ?= 7
SCALE_BROKER ?= rmqtt-cluster
SCALE_ARGS ?=
SCALE_BED := $(CURDIR)/target/bench/scale/testbed
bench-scale:
	$(CARGO) build --release --locked --workspace --bins
	SEALED_OTA_TESTBED_DIR=$(SCALE_BED) SEALED_OTA_RMQTT_NODES=$(SCALE_NODES) \
	  SEALED_OTA_RMQTT_MAX_INFLIGHT=4096 SEALED_OTA_RMQTT_MAX_MQUEUE_LEN=1000000 \
	  $(TESTBED) up --broker $(SCALE_BROKER)
	export SEALED_OTA_TESTBED_DIR=$(SCALE_BED); eval "$$($(TESTBED) env)"; \
	  target/release/sealed-ota-scale-bench --devices $(SCALE_DEVICES) --out target/bench/scale $(SCALE_ARGS); \
	  rc=$$?; $(TESTBED) down; exit $$rc

## make crds: regenerate crds/ (and the chart's copy) and docs/reasons.md from the Rust types.
crds:
	$(CARGO) run --locked -q -p sealed-ota-operator -- crdgen --out crds
	cp crds/*.yaml charts/sealed-ota/files/crds/
	$(CARGO) run --locked -q -p sealed-ota-operator -- reasons > docs/reasons.md

## make no-std: the device side of the protocol and the minimq example build for a
## microcontroller (no_std + alloc, thumbv7em-none-eabihf; NO_STD_TARGET picks another). Adds the
## target with rustup when missing and fails, saying so, when it cannot.
no-std:
	CARGO="$(CARGO)" scripts/no-std-check.sh

## make chart: lint the Helm chart and run the GitOps health-check tests (no test bed needed).
chart:
	$$(scripts/helm-install.sh) lint charts/sealed-ota --strict --set broker.url=mqtts://broker:8883 --set broker.tls.secretName=broker-tls
	$(CARGO) test --locked -p sealed-ota-e2e --test chart_gitops

## make images: the operator, device-emulator and Mosquitto images, built here without a registry
## (release binaries on a runtime base made from Debian's packages; see scripts/images.sh). With a
## registry, `docker build -f docker/operator.Dockerfile .` builds the distroless variant.
images:
	scripts/docker.sh up $(DOCKER_STATE)
	scripts/images.sh build --profile release && scripts/images.sh mosquitto; rc=$$?; \
	  scripts/docker.sh down $(DOCKER_STATE); exit $$rc

## make kind: the whole product as pods on a kind cluster built here (node image, images, chart with
## 2 replicas, Mosquitto, devices, a campaign and a rotation, the in-cluster checks, the e2e suite).
## The cluster stays up afterwards (for inspection); make kind-down removes everything it made.
kind:
	e2e/kind/kind.sh all
kind-down:
	e2e/kind/kind.sh down

## make agent-deb: the device agent's Debian package (release build, stripped) in target/debian, with
## cargo-deb from scripts/cargo-deb-install.sh (a pinned copy in ~/.cache/sealed-ota/tools).
agent-deb:
	CARGO_DEB="$$(scripts/cargo-deb-install.sh)" && \
	  "$$CARGO_DEB" -p sealed-ota-agent --locked --strip -o target/debian
