# Everything a fresh machine needs: `make train` and `make test` set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed before the project so pip never pulls a CUDA build; override for GPUs,
# e.g. make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
DEMO_DIR ?= .cache/demo
DEMO_SHARDS := $(DEMO_DIR)/shards/manifest.parquet
DEMO_AUTOENCODER := runs/demo-autoencoder/export/model.safetensors
DEMO_EVAL_SHARDS := $(DEMO_DIR)/eval/shards/manifest.parquet
SCALING_SWEEP := runs/sweeps/scaling-demo
ARGS ?=

.PHONY: setup lock train scaling test test-fast lint sample shards latents demo-data demo-autoencoder clean

setup: $(VENV)/.installed

# constraints.txt holds the versions the suite last passed with: a fresh clone installs exactly
# those, so a new release upstream cannot break it overnight (pyproject.toml keeps the ranges
# for people who install Tessera as a library). torch is TORCH_SPEC's, so it is not in it.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

# Refresh constraints.txt from the environment after upgrading in it and passing `make test`.
lock: $(VENV)/.installed
	$(PY) -m pip freeze --exclude-editable | grep -v -E '^(torch|pip|setuptools|wheel)==' > constraints.txt

demo-data: $(DEMO_SHARDS)
$(DEMO_SHARDS): | $(VENV)/.installed
	$(PY) -m data.demo --out $(DEMO_DIR)

demo-autoencoder: $(DEMO_AUTOENCODER)
$(DEMO_AUTOENCODER): | $(DEMO_SHARDS)
	$(PY) -m train experiment=demo_autoencoder

# The embedded default: demo shards (once), the tiny autoencoder (once), then the tiny DiT.
train: $(DEMO_AUTOENCODER)
	$(PY) -m train experiment=demo $(ARGS)

# The held-out clips of the demo's evaluation loss: other cuts (seed 1) of the same videos.
$(DEMO_EVAL_SHARDS): | $(VENV)/.installed
	$(PY) -m data.demo --out $(DEMO_DIR)/eval --clips-per-source 12 --images-per-source 6 --seed 1

# The CPU scaling-law demo: 3 budgets x 3 sizes as a Hydra multirun, then the fit and plots.
# FIT_ARGS="--metric loss_at_time/0.55" fits the loss at one fixed time instead.
FIT_ARGS ?=
scaling: $(DEMO_AUTOENCODER) $(DEMO_EVAL_SHARDS)
	$(PY) -m train -m experiment=scaling_demo $(ARGS)
	$(PY) -m launch.scaling fit $(SCALING_SWEEP) $(FIT_ARGS)

# Generate from the latest demo run: make sample ARGS='prompt="a rabbit in a meadow"'
sample: | $(VENV)/.installed
	$(PY) -m train.sample checkpoint=runs/demo $(ARGS)

# Prepare your own clips: make shards ARGS='my_videos --out my_shards [key=value ...]'
shards: | $(VENV)/.installed
	$(PY) -m data.prepare $(ARGS)

# The demo's latent shards, so that training skips the frozen encoders:
#   make latents && make train ARGS='data.shards=$(DEMO_DIR)/latents'
latents: $(DEMO_AUTOENCODER)
	$(PY) -m train.encode --out $(DEMO_DIR)/latents experiment=demo $(ARGS)

# The slowest tests are listed at the end: CI's 45 minutes are a budget to keep.
test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=25 $(ARGS)

# Everything but the slow, multi-process and SLURM tests: a few minutes on 2 CPU cores.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow and not multiprocess and not slurm" $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/deptry .

clean:
	rm -rf runs .cache outputs multirun
