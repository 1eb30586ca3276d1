# Two entry points: `make run` (the default federated job: FedLoRA-Optimizer vs FedIT vs the base model) and
# `make test` (the test suite).
# Both create .venv and install everything on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/default.yaml
ARGS ?=

.PHONY: setup run compare test bench clean

setup:
	@bash scripts/setup-env.sh

# The default job: the method, a baseline and the base model on the same partitions, with the differences.
METHODS ?= fedlora_opt,fedit
run: setup
	$(VENV)/bin/fedlora compare --config $(CONFIG) --methods $(METHODS) $(ARGS)

compare: setup
	$(VENV)/bin/fedlora compare --config $(CONFIG) $(ARGS)

test: setup
	$(PY) -m pytest tests $(ARGS)

# Benchmarks (docs/performance.md): `make bench` runs the CPU ones with their small defaults, one after another
# (about an hour on 2 shared CPU cores); `make bench BENCH=peer ARGS="--plain"` runs one with its own flags.
# gpu_throughput and mfu are for a GPU machine: `make bench BENCH=gpu_throughput ARGS="--device cuda"`.
BENCH ?= overhead peer memory communication lockstep cpu_throughput
bench: setup
	@for b in $(BENCH); do echo "== benchmarks/$$b.py $(ARGS)"; $(PY) benchmarks/$$b.py $(ARGS) || exit 1; done

clean:
	rm -rf runs .pytest_cache
