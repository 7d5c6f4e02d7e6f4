# Every entry point of longctx. `make test` and `make serve` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
MODEL_DIR ?= models/small
PORT ?= 8000
PYTEST_ARGS ?=
# Test processes (pytest-xdist): 2 took the suite from 16 to 11 minutes on the 2-core machine
# (session 16). PYTEST_WORKERS=0 runs it in this process, one test after another.
PYTEST_WORKERS ?= 2

.PHONY: setup test serve model bench-cpu bench-autoscale docs clean

setup: $(STAMP)

# torch first, pinned: every later requirement (`torch>=2.4`) is then already satisfied and pip
# never reaches for a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e ".[serve,ops,test]"
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) || echo "warning: redis-server not installed; Redis tests will skip"
	@command -v prometheus >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null) || echo "warning: prometheus not installed; the dashboard query tests will skip"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

$(MODEL_DIR)/config.json: | setup
	$(BIN)/longctx make-model $(MODEL_DIR) --preset small

model: $(MODEL_DIR)/config.json

serve: setup model
	$(BIN)/longctx serve --model $(MODEL_DIR) --port $(PORT)

bench-cpu: setup
	$(BIN)/python bench/engine_cpu.py

# docs/autoscaling.md's table: the simulator, queued-context vs ongoing-requests scaling (~5 min, CPU)
bench-autoscale: setup
	$(BIN)/python bench/autoscale.py

# docs/configuration.md is generated from cluster/config.py (a test checks they agree).
docs: setup
	$(BIN)/python -m cluster.config_docs > docs/configuration.md

clean:
	rm -rf $(VENV) models .pytest_cache
