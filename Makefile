# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv, install torch 2.13.0 first (the CPU build; an unpinned torch pulls CUDA) and the
# project with its extras, pinned by constraints.txt.

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tl-plugins-installed
EXTRAS := gguf,sae,dev
PYTEST_ARGS ?=

.PHONY: install demo test test-fast bench docs lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	$(BIN)/pip install -q -c constraints.txt triton || echo "triton not installable here: Triton tests will skip"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tl-plugins report --model smollm2-135m --out report/
	@echo "open report/index.html"

test: $(STAMP)
	@start=$$(date +%s); \
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS); rc=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s"; exit $$rc

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	@for b in load topk embedspace iclgd; do $(BIN)/tl-plugins bench $$b || exit 1; done

docs: $(STAMP)
	$(BIN)/pip install -q mkdocs
	$(BIN)/mkdocs build -q

lint: $(STAMP)
	$(BIN)/ruff check tl_plugins tl_topk tl_embedspace tl_iclgd tests

clean:
	rm -rf $(VENV) report site .pytest_cache
