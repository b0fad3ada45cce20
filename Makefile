# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck docs docs-serve bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,assets,docs]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m polymod.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The documentation site (mkdocs.yml): built strictly, so a docstring that disagrees with its signature, a broken
# link or a page missing from the navigation fails. Open site/index.html, or `make docs-serve` for search.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict  # not --quiet: it hides the warnings strict counts
	@echo "site built: open site/index.html, or run 'make docs-serve' and open http://127.0.0.1:8001"

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --strict --dev-addr 127.0.0.1:8001

# mypy (pinned in the dev extra) checks a user's script against the public API's annotations
typecheck: $(STAMP)
	$(PY) -m mypy

test: $(STAMP) lint typecheck docs
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/lora_overhead.py --rounds 21

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
