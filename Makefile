# Kiln: two commands for a newcomer.
#   make demo   install everything, start Kiln (bundled NATS + SQLite), train a small YOLO for 20 epochs, follow it live (mAP50 rises past 0.5)
#   make test   install everything, run the whole test suite (needs PostgreSQL on 127.0.0.1:5432)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: bootstrap demo up test docs bench
bootstrap:
	bash scripts/bootstrap.sh

demo: bootstrap
	$(VENV)/bin/kiln demo --data-dir var/demo

up: bootstrap
	$(VENV)/bin/kiln up

test: bootstrap
	bash scripts/install-system.sh
	$(VENV)/bin/pytest

docs: bootstrap
	$(PY) -m kiln_contracts.docs docs
