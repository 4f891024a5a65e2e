# Two commands do all the set-up: `make demo` (the main job,
# `keras-adaptive-lora transfer`; extra options via `make demo ARGS="--quick"`)
# and `make test` (the whole suite under torch, tensorflow and jax). Both create
# `.venv` and install into it on first use; later runs skip the install.
#
# torch: `constraints.txt` pins torch==2.13.0. From PyPI on Linux x86_64 that is
# the CUDA build (with about 16 nvidia-*/triton packages, several GB). For the
# CPU build, install it first from PyTorch's CPU index:
#   make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV ?= .venv
BACKENDS ?= torch tensorflow jax
TORCH_INDEX_URL ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
TORCH_PIN := $(shell grep -E '^torch==' constraints.txt)

.PHONY: demo test install-dev

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo-installed: pyproject.toml constraints.txt Makefile | $(PY)
	$(PIP) -e ".[tensorflow,plot,data]"
	touch $@

$(VENV)/.dev-installed: pyproject.toml constraints.txt Makefile | $(PY)
	$(if $(TORCH_INDEX_URL),$(PIP) --index-url $(TORCH_INDEX_URL) "$(TORCH_PIN)")
	$(PIP) -e ".[dev]"
	touch $@

install-dev: $(VENV)/.dev-installed

demo: $(VENV)/.demo-installed
	$(VENV)/bin/keras-adaptive-lora transfer $(ARGS)

test: $(VENV)/.dev-installed
	@failed=""; start=$$(date +%s); \
	for backend in $(BACKENDS); do \
		echo "=== KERAS_BACKEND=$$backend ==="; \
		t0=$$(date +%s); \
		KERAS_BACKEND=$$backend $(PY) -m pytest -q -n 2 --dist loadfile tests || failed="$$failed $$backend"; \
		echo "=== $$backend: $$(( $$(date +%s) - t0 ))s"; \
	done; \
	echo "make test: $$(( $$(date +%s) - start ))s on $$(nproc) CPUs, load average $$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"; \
	if [ -n "$$failed" ]; then echo "FAILED on:$$failed"; exit 1; fi; \
	echo "all backends passed: $(BACKENDS)"
