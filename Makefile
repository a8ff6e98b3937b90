# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv, install torch 2.13.0 first (the CPU build; an unpinned torch pulls CUDA) and the
# project with its extras, pinned by constraints.txt.
#
# `make test` runs the suite in two legs, one after the other, each in its own virtual environment:
#   tl39: .venv      TransformerLens 3.9 + SAELens (constraints.txt),          TL_PLUGINS_TEST_LEG=tl39
#   tl4:  .venv-tl4  TransformerLens 4.3, no SAELens (constraints-tl4.txt),   TL_PLUGINS_TEST_LEG=tl4
# The second leg runs even when the first fails; `make test` fails if either did. `make test-tl39` and
# `make test-tl4` run one leg. Each environment is installed once (a stamp file inside it records that).

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tl-plugins-installed
EXTRAS := gguf,sae,dev
VENV_TL4 := .venv-tl4
BIN_TL4 := $(VENV_TL4)/bin
STAMP_TL4 := $(VENV_TL4)/.tl-plugins-installed
EXTRAS_TL4 := gguf,dev
PYTEST_ARGS ?=
PYTEST := python -m pytest -q -p no:cacheprovider

.PHONY: browsers install install-tl4 demo test test-tl39 test-tl4 test-fast bench docs lint clean tutorial

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	$(BIN)/pip install -q -c constraints.txt triton || echo "triton not installable here: Triton tests will skip"
	touch $(STAMP)

# An existing .venv-tl4 without the stamp (made by hand) is reused: the install step runs into it.
$(BIN_TL4)/python:
	$(PY) -m venv $(VENV_TL4)
	$(BIN_TL4)/pip install -q --upgrade pip

$(STAMP_TL4): $(BIN_TL4)/python pyproject.toml constraints-tl4.txt
	$(BIN_TL4)/pip install -q torch==2.13.0
	$(BIN_TL4)/pip install -q -c constraints-tl4.txt -e ".[$(EXTRAS_TL4)]"
	$(BIN_TL4)/pip install -q -c constraints-tl4.txt triton || echo "triton not installable here: Triton tests will skip"
	touch $(STAMP_TL4)

# Headless Chromium for the browser tests (report, debugger app): the Debian package, where this
# machine can install it; the tests skip, saying why, where it cannot.
browsers:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  (apt-get install -y -q chromium >/dev/null 2>&1 && echo "installed chromium") || \
	  echo "chromium not installable here: browser tests will skip"

install: $(STAMP)

install-tl4: $(STAMP_TL4)

demo: $(STAMP)
	$(BIN)/tl-plugins report --model smollm2-135m --out report/
	@echo "open report/index.html"

# Each leg is a sub-make, so that a failed install of one leg does not stop the other.
test:
	@start=$$(date +%s); rc=0; summary=""; \
	for leg in tl39 tl4; do \
	  t0=$$(date +%s); \
	  if $(MAKE) --no-print-directory test-$$leg; then res=passed; else res=FAILED; rc=1; fi; \
	  summary="$$summary  leg $$leg: $$res in $$(( $$(date +%s) - t0 )) s (install and tests)\n"; \
	done; \
	printf "make test:\n$$summary  total: %s s\n" "$$(( $$(date +%s) - start ))"; exit $$rc

test-tl39: $(STAMP) browsers
	@start=$$(date +%s); \
	TL_PLUGINS_TEST_LEG=tl39 $(BIN)/$(PYTEST) $(PYTEST_ARGS); rc=$$?; \
	echo "make test-tl39: tests $$(( $$(date +%s) - start )) s (rc $$rc)"; exit $$rc

test-tl4: $(STAMP_TL4) browsers
	@start=$$(date +%s); \
	TL_PLUGINS_TEST_LEG=tl4 $(BIN_TL4)/$(PYTEST) $(PYTEST_ARGS); rc=$$?; \
	echo "make test-tl4: tests $$(( $$(date +%s) - start )) s (rc $$rc)"; exit $$rc

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	@for b in load topk embedspace iclgd; do $(BIN)/tl-plugins bench $$b || exit 1; done

# Execute docs/tutorial.ipynb on SmolLM2-135M and keep the outputs in the file (the suite runs it on a
# tiny model: tests/tl_plugins/test_tutorial.py).
tutorial: $(STAMP)
	$(BIN)/python scripts/tutorial.py --model smollm2-135m

docs: $(STAMP)
	$(BIN)/pip install -q mkdocs
	$(BIN)/mkdocs build -q

# ruff over the whole tree; mypy over the host's contract (hookspecs, registry, API, seams, state,
# built-ins, report, bench and measurement machinery), where every plugin's types meet, and each
# plugin's hookimpls (plugin.py), and the jaxtyped tensor APIs whose bodies check clean.
MYPY_FILES := tl_plugins/hookspecs.py tl_plugins/plugins.py tl_plugins/api.py tl_plugins/builtins \
	tl_plugins/seams.py tl_plugins/state.py tl_plugins/errors.py tl_plugins/cli_checks.py \
	tl_plugins/report.py tl_plugins/bench.py tl_plugins/ranking.py tl_plugins/measure.py \
	tl_topk/plugin.py tl_embedspace/plugin.py tl_iclgd/plugin.py \
	tl_plugins/backends/base.py tl_iclgd/metrics.py tl_iclgd/linear_attention.py tl_iclgd/capture.py \
	tl_embedspace/projections.py tl_embedspace/cpp_scan.py tl_plugins/extensions.py tl_topk/ops

lint: $(STAMP)
	$(BIN)/ruff check tl_plugins tl_topk tl_embedspace tl_iclgd tests scripts
	$(BIN)/mypy --ignore-missing-imports --follow-imports=silent $(MYPY_FILES)

clean:
	rm -rf $(VENV) $(VENV_TL4) report site .pytest_cache
