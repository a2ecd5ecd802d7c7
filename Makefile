# The README's two commands: `make up` and `make test`. Each creates the virtualenv and installs on first use.
VENV   ?= .venv
PORT   ?= 8000
REDIS_PORT ?= 16379
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# aiperf gets a venv of its own: it pins rich~=14.1, pillow~=12.3, orjson~=3.11 and huggingface-hub<2, which in
# .venv would downgrade those and transformers (the correctness tests' reference) under everything else. The
# tests only run its CLI, so nothing is lost by the separation.
AIPERF_VERSION := 0.13.0
AIPERF_VENV    := .venv-aiperf
AIPERF_STAMP   := $(AIPERF_VENV)/.installed-$(AIPERF_VERSION)

.PHONY: up test lint redis-server

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

$(AIPERF_STAMP):
	test -x $(AIPERF_VENV)/bin/python || python3 -m venv $(AIPERF_VENV)
	$(AIPERF_VENV)/bin/pip install -q 'aiperf==$(AIPERF_VERSION)'
	rm -f $(AIPERF_VENV)/.installed-* && touch $@

# Tests run against Debian's redis-server (a real Redis) as well as the embedded valkey default.
redis-server:
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q redis-server; }

up: $(STAMP)
	$(VENV)/bin/warmserve up --port $(PORT) --redis-port $(REDIS_PORT)

test: $(STAMP) $(AIPERF_STAMP) redis-server
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
