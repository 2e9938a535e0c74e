# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.12 || ls $$HOME/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -n1 || echo python3)
VENV   := .venv
PY     := $(VENV)/bin/python
# one stamp per install set: `make demo` installs the base package, `make test` the test extra (every extra)
STAMP_ID := $(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)

.PHONY: install install-base demo test lint system-deps bench clean

define pip_install
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel
	# torch first, from the pinned release (CPU is enough; the same wheel drives a CUDA GPU when present)
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e '$(1)'
endef

# the base package: index build (SSCD, PDQ), search, scan, demo
$(VENV)/.base-$(STAMP_ID): pyproject.toml constraints.txt
	$(call pip_install,.)
	@rm -f $(VENV)/.base-*; touch $@

# everything the tests use: all extras (clip, generate, serve, hf) and the test tools
$(VENV)/.installed-$(STAMP_ID): pyproject.toml constraints.txt
	$(call pip_install,.[test])
	@rm -f $(VENV)/.installed-* $(VENV)/.base-*; touch $@ $(VENV)/.base-$(STAMP_ID)  # the test install holds the base

install-base: $(VENV)/.base-$(STAMP_ID)

install: $(VENV)/.installed-$(STAMP_ID)

# Debian packages the tests use: chromium for the end-to-end browser test (Playwright drives it through
# executable_path) and the font families the synthetic-watermark generator draws with (train/held-out split).
DEBS := chromium fonts-dejavu-core fonts-liberation fonts-noto-core fonts-freefont-ttf fonts-urw-base35 \
        fonts-open-sans fonts-roboto-unhinted fonts-lato fonts-crosextra-carlito fonts-noto-color-emoji

system-deps:
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing) >/dev/null; \
	  else echo "missing Debian packages (browser/font tests will skip or use fewer fonts): sudo apt-get install $$missing"; fi; fi

demo: install-base
	$(PY) -m provenance.cli demo

test: install system-deps
	$(PY) -m pytest -q

# ruff (lint and format check) and mypy, configured in pyproject.toml; CI runs this before the tests
lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

bench: install
	$(PY) bench/bench_embed.py

clean:
	rm -rf $(VENV) indexes/sample out
