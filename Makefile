# Two commands do all the set-up: `make demo` (the main job; extra options via
# `make demo ARGS="--shots 5"`) and `make test`
# (the whole suite under torch, tensorflow and jax). Both create `.venv` and
# install into it on first use; later runs skip the install.
PYTHON ?= python3
VENV ?= .venv
BACKENDS ?= torch tensorflow jax
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: demo test install-dev

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo-installed: pyproject.toml constraints.txt Makefile | $(PY)
	$(PIP) -e ".[tensorflow,plot,data]"
	touch $@

$(VENV)/.dev-installed: pyproject.toml constraints.txt Makefile | $(PY)
	$(PIP) -e ".[dev]"
	touch $@

install-dev: $(VENV)/.dev-installed

demo: $(VENV)/.demo-installed
	$(VENV)/bin/keras-adaptive-lora transfer $(ARGS)

test: $(VENV)/.dev-installed
	@failed=""; \
	for backend in $(BACKENDS); do \
		echo "=== KERAS_BACKEND=$$backend ==="; \
		KERAS_BACKEND=$$backend $(PY) -m pytest -q -n 2 --dist loadfile tests || failed="$$failed $$backend"; \
	done; \
	if [ -n "$$failed" ]; then echo "FAILED on:$$failed"; exit 1; fi; \
	echo "all backends passed: $(BACKENDS)"
