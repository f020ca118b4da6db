# Two commands set up a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs what it needs (stamp files skip repeat installs).
# `make test-fast` is the inner loop: every test not marked slow (under two minutes on 2 cores).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# On this project's machines these releases lie on local disk; override elsewhere if needed.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: demo test test-fast venv install-demo install-dev browser clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.torch: | $(PY)
	$(PY) -m pip install -q $(TORCH_SPEC)
	touch $@

$(VENV)/.demo: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -e '.[all]'
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -e '.[dev]'
	# clip-retrieval for its ClipClient only: its own requirements pin numpy<2 and a Flask back end
	$(PY) -m pip install -q --no-deps 'clip-retrieval>=2.44,<3'
	touch $@ $(VENV)/.demo

install-demo: $(VENV)/.demo
install-dev: $(VENV)/.dev

# Headless Chromium from Debian's packages for the web-page test (no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "warning: could not install chromium; the browser test will be skipped"; \
	  else echo "warning: chromium not installed; the browser test will be skipped"; fi; }

demo: install-demo
	$(VENV)/bin/clipforge demo --out demo_out

test: install-dev browser
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install-dev browser
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_out build dist src/*.egg-info
