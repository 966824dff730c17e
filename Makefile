# Model serving pipeline: train -> export -> verify -> archive -> serve -> call -> load-test.
# Artifacts are file targets, so `make serve` rebuilds only what is missing or stale.
# Every model target takes MODEL=<name> from the registry (models/registry.py).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
# Keep every intermediate artifact of the pattern-rule chain (checkpoint, exports, stamps).
.SECONDARY:

MODEL ?= digits
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed
RUN_DIR ?= run
INFERENCE_PORT ?= 8080
MANAGEMENT_PORT ?= 8081
METRICS_PORT ?= 8082
GRPC_PORTS ?= 7070 7071
USERS ?= 8
DURATION ?= 30s
# QUICK=1: the bench in under a minute (fewer concurrency levels, shorter steps).
QUICK ?=
PYTEST_ARGS ?=
# Models `make serve` builds and serves: those the registry marks serve_by_default.
SERVE_MODELS ?= $(shell $(PYTHON) -m models.registry list --default)
# Training recipe for a missing checkpoint: `full` (the registry's recipe), except under `make test`, which
# trains the registry's quick recipe when no checkpoint exists yet (a full one already there is used as is).
TRAIN_RECIPE ?= full

MODEL_SRC := $(wildcard models/*.py)
HANDLER_SRC := $(wildcard handlers/*.py)
MARS = $(foreach m,$(SERVE_MODELS),model_store/$(m).mar)

.PHONY: help prereqs full-recipe venv train export verify archive serve stop token ready rotate-token predict loadtest bench sweep soak test clean

help: ## show this help
	@echo "Usage: make <target> [MODEL=name]   (MODEL defaults to $(MODEL))"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-10s %s\n", $$1, $$2}'

prereqs: ## check the tools the venv cannot install: Python 3.11 and Java 17
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found. Install Python 3.11 (python3.11 and python3.11-venv) or pass PYTHON=/path/to/python3.11" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { echo "error: $(PYTHON) is not Python 3.11; the pinned torch wheels are built for 3.11" >&2; exit 1; }
	@command -v java >/dev/null || { echo "error: java not found. TorchServe's frontend needs a Java 17 runtime (e.g. apt-get install openjdk-17-jre-headless)" >&2; exit 1; }
	@java -version 2>&1 | grep -Eq 'version "17[."]' || { echo "error: TorchServe 0.12 needs Java 17; found: $$(java -version 2>&1 | head -1)" >&2; exit 1; }

$(VENV_STAMP): requirements.txt | prereqs
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV_STAMP) ## create .venv and install the pinned dependencies

checkpoints/%/model.pt: $(MODEL_SRC) | $(VENV_STAMP)
	$(PY) -m models.train --model $* --out checkpoints/$* --recipe $(TRAIN_RECIPE)

# A checkpoint from the quick recipe (left by `make test`) is never served: the targets that serve, export or
# measure a model remove it first, with everything built from it, so the chain retrains with the full recipe.
# (Removing the checkpoint alone is not enough: under .SECONDARY a missing intermediate file is not rebuilt
# while the archive built from it still exists.)
full-recipe: ## (used by the targets below) replace quick-recipe test checkpoints by full ones
	@for m in $(sort $(SERVE_MODELS) $(MODEL)); do \
		if grep -qs '"recipe": "quick"' checkpoints/$$m/model.json; then \
			echo "$$m: checkpoints/$$m was trained with the quick test recipe; retraining with the full recipe"; \
			rm -rf checkpoints/$$m artifacts/$$m model_store/$$m.mar model_store/$$m.mar.sha256; fi; done

artifacts/%/manifest.json: checkpoints/%/model.pt export/export.py export/manifest.py
	$(PY) -m export.export --model $* --checkpoint checkpoints/$* --out artifacts/$*

artifacts/%/verified.json: artifacts/%/manifest.json export/verify.py handlers/runtime.py
	$(PY) -m export.verify --model $* --checkpoint checkpoints/$* --artifacts artifacts/$*

model_store/%.mar: artifacts/%/verified.json serve_config/%.yaml export/archive.py $(HANDLER_SRC) $(MODEL_SRC)
	$(PY) -m export.archive --model $* --artifacts artifacts/$* --out model_store

train: full-recipe checkpoints/$(MODEL)/model.pt ## train MODEL and write its self-describing checkpoint
export: full-recipe artifacts/$(MODEL)/manifest.json ## export MODEL to TorchScript (trace, script) and ONNX
verify: full-recipe artifacts/$(MODEL)/verified.json ## check MODEL's exports against eager (fresh process each)
archive: full-recipe model_store/$(MODEL).mar ## pack MODEL into model_store/MODEL.mar

serve: full-recipe $(MARS) | $(VENV_STAMP) ## set up, build the default models and serve them in the background
	$(PY) -m serve_config.server start --run-dir $(RUN_DIR) --models $(SERVE_MODELS) \
		--inference-port $(INFERENCE_PORT) --management-port $(MANAGEMENT_PORT) --metrics-port $(METRICS_PORT) \
		--grpc-ports $(GRPC_PORTS)

stop: ## stop the TorchServe that `make serve` started (by its PID)
	@$(PY) -m serve_config.server stop --run-dir $(RUN_DIR)

token: ## print the current inference key (make -s token)
	@$(PY) -m serve_config.server token --run-dir $(RUN_DIR)

ready: ## readiness probe of the running server: exit 0 when /ping is Healthy and every model has a READY worker
	@$(PY) -m serve_config.server ready --run-dir $(RUN_DIR)

rotate-token: ## replace the running server's inference key (KIND=management for the management key)
	@$(PY) -m serve_config.server rotate-token --run-dir $(RUN_DIR) --kind $(or $(KIND),inference)

predict: ## send MODEL's sample input to the running server and print the answer
	@$(PY) -m loadtest.predict --model $(MODEL) --run-dir $(RUN_DIR) --url http://127.0.0.1:$(INFERENCE_PORT)

loadtest: ## Locust against the running server: make loadtest MODEL=digits USERS=8 DURATION=30s
	$(PY) -m loadtest.run --model $(MODEL) --users $(USERS) --duration $(DURATION) --run-dir $(RUN_DIR) \
		--url http://127.0.0.1:$(INFERENCE_PORT) --out results/loadtest

bench: full-recipe model_store/$(MODEL).mar | $(VENV_STAMP) ## compute limit, server ceiling, served and stock peer in one run (QUICK=1: <1 min)
	$(PY) -m loadtest.bench --model $(MODEL) $(if $(QUICK),--quick) --out results/bench

sweep: full-recipe model_store/$(MODEL).mar | $(VENV_STAMP) ## sweep batch size, delay, workers x threads and backend for MODEL
	$(PY) -m loadtest.sweep --model $(MODEL) --out results/sweep

soak: full-recipe model_store/$(MODEL).mar | $(VENV_STAMP) ## ~70 % of capacity for SOAK_S seconds (default 600): failures and RSS growth
	$(PY) -m loadtest.soak --model $(MODEL) --seconds $(or $(SOAK_S),600) --out results/soak

test: TRAIN_RECIPE = quick
test: $(MARS) | $(VENV_STAMP) ## set up, build the default models and run every test tier
	$(PY) -m pytest tests $(PYTEST_ARGS)

clean: ## remove generated artifacts (keeps .venv)
	rm -rf checkpoints artifacts model_store build results
