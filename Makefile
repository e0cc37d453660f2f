# Two commands matter: `make serve` (the demo app on http://localhost:8080) and `make test` (ruff, then pytest).
# Both create .venv on first use; pip runs again only when a requirements file changes.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q
REQS := requirements.txt requirements-test.txt
STAMP := $(VENV)/.installed-$(shell cat $(REQS) | sha256sum | cut -c1-16)
PORT ?= 8080
# fal's metrics server moves with the app's port (8080 -> 9090, fal's default; 8081 -> 9091), so two servers never collide.
METRICS_PORT ?= $(shell expr $(PORT) + 1010)
PYTEST_ARGS ?=
BENCH_ARGS ?=

# Tests and the demo never reach the network: no Hub calls, no telemetry.
OFFLINE := HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1

.PHONY: serve-module test lint system serve bench bench-startup device-check venv clean

venv: $(STAMP)

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing $(REQS) into $(VENV) ..."
	$(PIP) -r requirements-test.txt
	@rm -f $(VENV)/.installed-*
	@touch $@
	@sync  # write the install out now: the tests' fsyncs would otherwise wait for its writeback

test: lint system
	$(OFFLINE) $(PY) -m pytest -q $(PYTEST_ARGS)

# What the JuiceFS tests need beyond Python packages (nginx-extras, fuse3), installed with apt when
# root; elsewhere those tests skip with the reason in pytest's summary.
system:
	@bash .ci/install-system

# ruff's findings fail the build (rules in pyproject.toml's [tool.ruff]).
lint: $(STAMP)
	$(VENV)/bin/ruff check .

serve: $(STAMP)
	@echo "Serving the demo app on http://localhost:$(PORT), metrics on :$(METRICS_PORT)  (Ctrl-C stops it)"
	@echo "Once 'setup' has finished, open http://localhost:$(PORT)/playground, or try:"
	@echo "  curl -s -X POST http://localhost:$(PORT)/ -H 'Content-Type: application/json' \\"
	@echo "       -d '{\"prompt\": \"a red circle on a blue background\"}'"
	APP_PROFILE=demo APP_DATA_ROOT=$(CURDIR)/.data $(OFFLINE) \
		$(VENV)/bin/fal run --local --exposed-port $(PORT) --exposed-metrics-port $(METRICS_PORT) flashpack-t2i

# The second app: a plain torch module (the demo VAE's decoder) served through the store (module_app.py).
serve-module: $(STAMP)
	@echo "Serving the latent decoder on http://localhost:$(PORT)  (Ctrl-C stops it); once 'setup' has finished, try:"
	@echo "  curl -s -X POST http://localhost:$(PORT)/ -H 'Content-Type: application/json' \\"
	@echo "       -d '{\"latents\": [[[0.5]], [[0.0]], [[-0.5]], [[0.2]]]}'"
	APP_DATA_ROOT=$(CURDIR)/.data $(OFFLINE) \
		$(VENV)/bin/fal run --local --exposed-port $(PORT) --exposed-metrics-port $(METRICS_PORT) latent-decoder

bench: $(STAMP)
	PYTHONPATH=$(CURDIR) $(OFFLINE) $(PY) bench/loader.py $(BENCH_ARGS)

# The warm start end to end (fal run --local to /health 200 and the first image) vs the stock recipes.
bench-startup: $(STAMP)
	PYTHONPATH=$(CURDIR) $(OFFLINE) $(PY) bench/startup.py $(BENCH_ARGS)

# On a GPU machine, one command (under 9 minutes, no network; carry the wheels as bench/device_check.sh
# says): the tests that need CUDA, bench/loader.py and bench/startup.py, then $(OUT)/SUMMARY.md and
# $(OUT)/device_check.json. `make device-check DEVICE=cpu` is a dry run here. No .venv install step:
# the machine cannot pip install; the script uses .venv/bin/python when it exists.
DEVICE ?= cuda
OUT ?= bench/out/device_check
SIZE ?=
device-check:
	DEVICE=$(DEVICE) OUT=$(OUT) SIZE=$(SIZE) bash bench/device_check.sh

clean:
	rm -rf .data bench/out .pytest_cache
