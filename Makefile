# Two commands on a fresh machine (README):  make run   |   make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 9090
LS_VENV ?= .venv-ls
export LS_VENV
# make run serves ONNX Runtime (about 2x faster per click than torch on a CPU, a quarter of the memory; README,
# "Speed and memory"), exporting MobileSAM on the first run and after a change of the export code;
# RUN_ONNX_SAM=false make run serves torch.
RUN_ONNX_SAM ?= true
ONNX_MODELS := models/vit_t.encoder.onnx models/vit_t.decoder.onnx

.PHONY: run test install install-dev weights onnx bench clean-venv
.DELETE_ON_ERROR:

## run: install what serving needs, fetch and verify MobileSAM (exported to ONNX when needed), serve it on http://$(HOST):$(PORT)
run: install weights $(if $(filter true 1 yes,$(RUN_ONNX_SAM)),$(ONNX_MODELS))
	RUN_ONNX_SAM=$(RUN_ONNX_SAM) $(BIN)/gunicorn -c gunicorn.conf.py --bind $(HOST):$(PORT) _wsgi:app

# the float32 export with its parity check against torch (about 2 minutes on 2 cores), again after a change of the
# export code (a newer opset, a faster graph); `make onnx` adds int8. A pattern rule, so that one run makes both
# files (also under make -j); after a failed check make deletes the file it was making (.DELETE_ON_ERROR), so the
# next run exports again instead of serving what failed.
models/%.encoder.onnx models/%.decoder.onnx: onnx_converter.py advanced_sam.py | install weights
	$(BIN)/python onnx_converter.py --model-type $* --checkpoint models/mobile_sam.pt --out-dir models

## test: install the serving and test dependencies, Label Studio (own venv), Chromium and redis-server, then run every test
test: install-dev weights
	scripts/install_label_studio.sh
	scripts/install_browser.sh
	scripts/install_redis.sh
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
	scripts/install_redis.sh
	$(BIN)/python -m tools.bench
	$(BIN)/python -m tools.memory_bench
	$(BIN)/python -m tools.bench.shared_state
	$(BIN)/python -m tools.bench.project_job
	$(BIN)/python -m tools.bench_sam2
