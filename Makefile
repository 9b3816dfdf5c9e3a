# Two entry points: `make demo` and `make test`. Each builds its own .venv.
PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# tests/fetch_flux_tokenizers.py fetches every tokenizer in one download; this file comes last.
TOKENIZERS := .cache/sd3-tokenizers/tokenizer_3/spiece.model

.PHONY: test test-fast demo docs bench lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e '.[dev,bench,encoders]'
	touch $@

$(TOKENIZERS): tests/fetch_flux_tokenizers.py | $(STAMP)
	$(BIN)/python tests/fetch_flux_tokenizers.py .cache/flux-tokenizers

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) $(TOKENIZERS) lint
	$(BIN)/python -m pytest -q

# The quick subset while you work: everything but the end-to-end runs marked slow.
test-fast: $(STAMP) $(TOKENIZERS) lint
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP) $(TOKENIZERS)
	$(BIN)/python examples/demo.py

# Refresh the pictures the README shows and the key table of docs/configs.md (only this
# target writes into docs/).
docs: $(STAMP) $(TOKENIZERS)
	$(BIN)/python examples/demo.py --out docs --report-only
	$(BIN)/python -c "from bucketing.pipeline.spec import update_key_table as u; u('docs/configs.md')"

bench: $(STAMP)
	$(BIN)/python bench/run_all.py --quick

clean:
	rm -rf $(VENV) .cache .pytest_cache
