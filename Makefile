# The README's two set-up commands: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS := constraints.txt
# checkov (tests/deploy) pins packaging<24, which pytest 9 refuses: its own venv.
SCAN_VENV ?= .venv-scan
MODEL_DIR ?= models/default
PORT ?= 8000
LINT_PATHS := pneumoscreen service training export tests bench

.PHONY: run check test lint bench train evaluate export clean scan-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamps record which extras are installed, so a second `make` does not reinstall.
$(VENV)/.serve: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e ".[serve]"
	touch $@

$(VENV)/.all: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e ".[serve,train,dev]"
	touch $@ $(VENV)/.serve

$(SCAN_VENV)/.scan: pyproject.toml constraints-scan.txt
	$(PYTHON) -m venv $(SCAN_VENV)
	$(SCAN_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SCAN_VENV)/bin/pip install --quiet -c constraints-scan.txt ".[scan]"
	touch $@

## scan-venv: checkov in .venv-scan, for the manifest and Dockerfile scan of tests/deploy
scan-venv: $(SCAN_VENV)/.scan

## run: start the API on :8000 with the bundled default model (serving extra only, no TensorFlow)
run: $(VENV)/.serve
	$(BIN)/pneumoscreen serve --model-dir $(MODEL_DIR) --port $(PORT)

## check: ruff's rule set and its formatter (pyproject.toml), then mypy --strict on service/ (`make test` runs it first)
check: $(VENV)/.all
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

## test: install everything, check, and run the whole test suite
test: check $(SCAN_VENV)/.scan
	$(BIN)/python -m pytest

lint: check

## bench: latency and throughput of the service on full-resolution X-rays
bench: $(VENV)/.all
	$(BIN)/python -m bench.service_bench --model-dir $(MODEL_DIR)

DATA ?= ../shared/data/chest_xray
WEIGHTS ?= ../shared/weights/mobilenet_1_0_224_tf_no_top.h5
RUN_DIR ?= runs/mobilenet-224
MODEL_NAME ?= pneumonia-mobilenet-224
MODEL_VERSION ?= 3.0.0
RECIPE := --data $(DATA) --backbone mobilenet --weights $(WEIGHTS) \
	--validation acquisition --epochs-frozen 2 --epochs-finetune 6 --patience 3 \
	--strong-augment --label-smoothing 0.05 --cosine-decay --fine-tune-layers 36

## train / evaluate / export: the documented recipe of the shipped model: two members
## (seeds 42 and 43) of one recipe, joined into one graph by `pneumoscreen ensemble`
train: $(VENV)/.all
	$(BIN)/pneumoscreen train $(RECIPE) --seed 42 --out $(RUN_DIR)-seed42
	$(BIN)/pneumoscreen train $(RECIPE) --seed 43 --out $(RUN_DIR)-seed43
	$(BIN)/pneumoscreen ensemble --run $(RUN_DIR)-seed42 --run $(RUN_DIR)-seed43 \
		--data $(DATA) --out $(RUN_DIR)

evaluate: $(VENV)/.all
	$(BIN)/pneumoscreen evaluate --run $(RUN_DIR) --data $(DATA)

# --force on purpose: `make export` is the recipe that (re)writes the shipped bundle in
# models/default; `pneumoscreen export` alone writes a new <run>/bundle and refuses to
# replace an existing bundle.
export: $(VENV)/.all
	$(BIN)/pneumoscreen export --run $(RUN_DIR) --out $(MODEL_DIR) --data $(DATA) \
		--name $(MODEL_NAME) --version $(MODEL_VERSION) --force

clean:
	rm -rf $(VENV) $(SCAN_VENV) .pytest_cache
