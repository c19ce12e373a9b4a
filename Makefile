# subject-ffhq — see README.md. Every target that runs code installs first (into .venv).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# make dataset
SOURCE ?= out/demo-source
OUT ?= out/dataset
PROFILE ?= paper
SHARD_SIZE ?=
RAY_ADDRESS ?=
CONFIG ?=
# make train
SHARDS ?= out/demo/shards/*.tar
TRAIN_OUT ?= out/train
STEPS ?= 1000
WORKERS ?= 1
GPU ?= 0
TRAIN_ARGS ?=
# make report
RUN ?= manifests/demo

# make evaluate
CHECKPOINT ?= out/train
SUBJECTS ?= out/eval-subjects
PROMPTS ?=
EVAL_OUT ?= out/evaluation
EVAL_ARGS ?=
IDENTITIES ?=
# facenet-pytorch pins old torch/numpy in its metadata: installed without its dependencies (it needs
# only torch, torchvision, numpy and Pillow, which the lock file already has).
FACENET := facenet-pytorch==2.6.0

# Compiled modules (.pyc): the install compiles the packages once (~1 min on 2 CPUs), and Python may
# cache the project's own. A machine that sets PYTHONDONTWRITEBYTECODE would otherwise recompile torch
# and transformers from source in every process (every Ray worker and actor, every CLI call): ~10 s each.
export PYTHONDONTWRITEBYTECODE :=

TINY := out/tiny-models
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SUBJECT_FFHQ_TINY_MODELS=$(CURDIR)/$(TINY)
QUIET := RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false

.PHONY: install test test-scale demo dataset train evaluate report identities lint bench clean export-fc gpu-carry gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock.txt
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install -q uv
	@start=$$(date +%s); \
	UV="$$(command -v uv || echo "$(PYTHON) -m uv")"; \
	rm -rf $(VENV) && $$UV venv -q --python $(PYTHON) $(VENV) && \
	VIRTUAL_ENV=$(CURDIR)/$(VENV) $$UV pip install -q --compile-bytecode -r requirements.lock.txt && \
	VIRTUAL_ENV=$(CURDIR)/$(VENV) $$UV pip install -q --compile-bytecode --no-deps $(FACENET) && \
	VIRTUAL_ENV=$(CURDIR)/$(VENV) $$UV pip install -q --no-deps -e . && \
	echo "installed .venv in $$(( $$(date +%s) - start )) s, $$(du -sh $(VENV) | cut -f1)"
	@touch $(STAMP)

# make test: the suite but for the `scale` tests, on TEST_WORKERS pytest workers, one test file per
# worker at a time, the end-to-end Ray builds first (tests/conftest.py): ~3 min on 2 CPUs.
# make test-scale: those (soak, node loss, Ray Train worker loss, 70k-item planning, paper-size models;
# one at a time, each with the machine to itself). CI runs both.
TEST_WORKERS ?= 2
test: install
	$(OFFLINE) $(QUIET) $(BIN)/pytest -q -p no:cacheprovider -m "not scale" --durations=10 \
		-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-scale: install
	$(OFFLINE) $(QUIET) $(BIN)/pytest -q -p no:cacheprovider -m scale --durations=10

demo: install
	$(OFFLINE) $(QUIET) $(BIN)/subject-ffhq sample-data out/demo-source
	$(OFFLINE) $(QUIET) $(BIN)/subject-ffhq tiny-models $(TINY)
	$(OFFLINE) $(QUIET) env -u RAY_ADDRESS $(BIN)/subject-ffhq build --source out/demo-source --out out/demo \
		--profile tiny --shard-size 4 --run-name demo
	$(OFFLINE) $(QUIET) $(BIN)/subject-ffhq export out/demo/shards out/demo-exports/fastcomposer --profile tiny \
		--overwrite --drop-merged-persons --drop-faceless-persons --min-face-size 24
	$(OFFLINE) $(QUIET) $(BIN)/subject-ffhq export out/demo/shards out/demo-exports/seg-conditioning --profile tiny \
		--overwrite --format seg-conditioning
	$(OFFLINE) $(QUIET) $(BIN)/subject-ffhq export out/demo/shards out/demo-exports/subject-crops --profile tiny \
		--overwrite --format subject-crops
	$(OFFLINE) $(QUIET) env -u RAY_ADDRESS $(BIN)/subject-ffhq identities manifests/demo
	$(OFFLINE) $(QUIET) $(BIN)/subject-ffhq report manifests/demo

dataset: install
	$(if $(filter tiny,$(PROFILE)),$(OFFLINE)) $(QUIET) $(BIN)/subject-ffhq build --source $(SOURCE) --out $(OUT) \
		--profile $(PROFILE) $(if $(SHARD_SIZE),--shard-size $(SHARD_SIZE)) $(if $(CONFIG),--config $(CONFIG)) \
		$(if $(RAY_ADDRESS),--ray-address $(RAY_ADDRESS))

# OUT given on the command line wins (make train OUT=out/train); TRAIN_OUT is the default.
train: install
	$(if $(filter tiny,$(PROFILE)),$(OFFLINE)) $(QUIET) $(BIN)/subject-ffhq train --shards '$(SHARDS)' \
		--profile $(PROFILE) $(if $(CONFIG),--config $(CONFIG)) --out $(if $(filter command line,$(origin OUT)),$(OUT),$(TRAIN_OUT)) \
		--steps $(STEPS) --workers $(WORKERS) $(if $(filter 1 yes true,$(GPU)),--gpu) $(TRAIN_ARGS)

# PROFILE=tiny evaluates with the tiny face/CLIP models (offline); SHARDS adds the leak check on the
# shards, IDENTITIES=manifests/<run> the leak check through that run's identity index.
evaluate: install
	$(if $(filter tiny,$(PROFILE)),$(OFFLINE)) $(QUIET) $(BIN)/subject-ffhq evaluate --checkpoint $(CHECKPOINT) \
		--subjects $(SUBJECTS) --out $(EVAL_OUT) --profile $(PROFILE) $(if $(PROMPTS),--prompts $(PROMPTS)) \
		$(if $(filter command line,$(origin SHARDS)),--shards '$(SHARDS)') \
		$(if $(IDENTITIES),--identities $(IDENTITIES)) \
		$(if $(RAY_ADDRESS),--ray-address $(RAY_ADDRESS)) $(EVAL_ARGS)

report: install
	$(BIN)/subject-ffhq report $(RUN)

# the run's faces clustered into identities: RUN/identities.parquet, RUN/split.parquet (identity-safe);
# RAY_ADDRESS=ADDR runs the step as one task on that cluster (RUN as its nodes see it)
identities: install
	$(BIN)/subject-ffhq identities $(RUN) $(if $(RAY_ADDRESS),--ray-address $(RAY_ADDRESS))

lint: install
	$(BIN)/ruff check cli datagen ray_jobs training fixtures tests bench

bench: install
	$(OFFLINE) $(QUIET) bash -c 'for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done'

# The GPU check (bench/gpu_check.sh) on a machine with only torch, transformers, sentence-transformers, timm,
# safetensors, pillow and pyarrow: gpu-carry copies the small pure-Python packages it also needs into
# out/gpu-carry (carry that folder); gpu-check runs it (on the GPU machine: bash bench/gpu_check.sh).
GPU_CARRY := open_clip diffusers webdataset braceexpand ftfy wcwidth
gpu-carry: install
	rm -rf out/gpu-carry && mkdir -p out/gpu-carry
	SITE=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	for p in $(GPU_CARRY); do cp -r "$$SITE/$$p" out/gpu-carry/; done; find out/gpu-carry -name __pycache__ -prune -exec rm -rf {} +; du -sh out/gpu-carry

gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf out manifests/*/ .pytest_cache

# FastComposer's own on-disk layout, from the shards that SHARDS names (quality filters via EXPORT_ARGS;
# the object types from PROFILE + CONFIG, subjects.object_types)
FC_OUT ?= out/fastcomposer
EXPORT_ARGS ?=
export-fc: install
	$(BIN)/subject-ffhq export --format fastcomposer $(dir $(firstword $(wildcard $(SHARDS)))) $(FC_OUT) \
		--profile $(PROFILE) $(if $(CONFIG),--config $(CONFIG)) $(EXPORT_ARGS)
