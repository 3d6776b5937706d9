# The two commands of the README: `make demo` (install + main job) and `make test` (install + tests).
PYTHON ?= python3
DATA := data/math-mix
RUN_DIR := runs/math-mix
# The main job's DeepMind modules (configs/math-mix.yaml evaluates the same ones), and problems per module.
MODULES := algebra__linear_1d,numbers__place_value,comparison__pair,numbers__round_number
DEMO_TRAIN := 60000
DEMO_TEST := 500

.PHONY: install demo test clean-demo

# torch first and pinned: an unpinned `torch` with none installed pulls several GB of CUDA packages.
# The constraint keeps whatever torch is installed where it is while the rest resolves.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	@mkdir -p .cache
	@$(PYTHON) -c "import torch; print('torch==' + torch.__version__)" > .cache/torch-constraint.txt
	$(PYTHON) -m pip install -q -c .cache/torch-constraint.txt -e ".[dev]"

# The released folder appears whole (written to a temp folder, then renamed), so one file marks it.
$(DATA)/released/interpolate/algebra__linear_1d.txt:
	megatrain-data deepmind generate --module $(MODULES) --train $(DEMO_TRAIN) --test $(DEMO_TEST) \
		--seed 1 --out $(DATA)/released

$(DATA)/shards/manifest.json: $(DATA)/released/interpolate/algebra__linear_1d.txt
	megatrain-data deepmind shards --released $(DATA)/released --module $(MODULES) --out $(DATA)/shards

# A finished or interrupted run continues from its last checkpoint instead of starting over.
demo: install $(DATA)/shards/manifest.json
	megatrain train configs/math-mix.yaml --nproc 2 --auto-resume
	megatrain generate $(RUN_DIR) "What is the hundreds digit of 31857?"

test: install
	$(PYTHON) -m pytest -q tests

clean-demo:
	rm -rf $(DATA) $(RUN_DIR)
