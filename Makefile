# Two commands on a fresh machine (README):  make run   |   make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 9090
LS_VENV ?= .venv-ls
export LS_VENV

.PHONY: run test install install-dev weights onnx bench clean-venv

## run: install what serving needs, fetch and verify MobileSAM, serve it on http://$(HOST):$(PORT) with gunicorn
run: install weights
	$(BIN)/gunicorn -c gunicorn.conf.py --bind $(HOST):$(PORT) _wsgi:app

## test: install the serving and test dependencies, Label Studio (own venv) and Chromium, then run every test
test: install-dev weights
	scripts/install_label_studio.sh
	scripts/install_browser.sh
	$(BIN)/python -m pytest

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamps: reinstall only when a requirements file changed.
$(VENV)/.installed: $(BIN)/python requirements.txt requirements-base.txt requirements-sam2.txt
	$(BIN)/python -m pip install --progress-bar off -r requirements.txt
	SAM2_BUILD_CUDA=0 $(BIN)/python -m pip install --progress-bar off --no-build-isolation --no-deps -r requirements-sam2.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(BIN)/python -m pip install --progress-bar off -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

weights: $(BIN)/python
	$(BIN)/python -m tools.weights mobile_sam

## onnx: export MobileSAM's encoder and decoder (and int8 variants) to models/ for RUN_ONNX_SAM=true
onnx: install-dev weights
	$(BIN)/python onnx_converter.py --model-type vit_t --checkpoint models/mobile_sam.pt --out-dir models --quantize

## bench: latency, memory and RLE numbers on real weights and images; writes artifacts/bench.json; then SAM 2.1's
## embedding / click times and memory per size (tools/bench_sam2.py, random-init weights)
bench: install-dev weights
	$(BIN)/python -m tools.bench
	$(BIN)/python -m tools.bench_sam2
