# Two entry points: `make run` (the default federated job) and `make test` (the test suite).
# Both create .venv and install everything on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/default.yaml
ARGS ?=

.PHONY: setup run compare test bench clean

setup:
	@bash scripts/setup-env.sh

run: setup
	$(VENV)/bin/fedlora run --config $(CONFIG) $(ARGS)

compare: setup
	$(VENV)/bin/fedlora compare --config $(CONFIG) $(ARGS)

test: setup
	$(PY) -m pytest tests $(ARGS)

clean:
	rm -rf runs .pytest_cache
