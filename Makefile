# The two commands of the README: `make demo` (install + main job) and `make test` (install + tests).
PYTHON ?= python3
DATA := data/linear1d
RUN_DIR := runs/linear1d-tiny
DEMO_TRAIN := 150000
DEMO_TEST := 1000

.PHONY: install demo test clean-demo

# torch first and pinned: an unpinned `torch` with none installed pulls several GB of CUDA packages.
# The constraint keeps whatever torch is installed where it is while the rest resolves.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	@mkdir -p .cache
	@$(PYTHON) -c "import torch; print('torch==' + torch.__version__)" > .cache/torch-constraint.txt
	$(PYTHON) -m pip install -q -c .cache/torch-constraint.txt -e ".[dev]"

$(DATA)/released/interpolate/algebra__linear_1d.txt:
	megatrain-data deepmind generate --module algebra__linear_1d --train $(DEMO_TRAIN) --test $(DEMO_TEST) \
		--seed 1 --out $(DATA)/released

$(DATA)/shards/manifest.json: $(DATA)/released/interpolate/algebra__linear_1d.txt
	megatrain-data deepmind shards --released $(DATA)/released --module algebra__linear_1d --out $(DATA)/shards

# A finished or interrupted run continues from its last checkpoint instead of starting over.
demo: install $(DATA)/shards/manifest.json
	megatrain train configs/linear1d-tiny.yaml --nproc 2 --auto-resume
	megatrain generate $(RUN_DIR) "Solve 24 = 1601*c - 1605*c for c."

test: install
	$(PYTHON) -m pytest -q tests

clean-demo:
	rm -rf $(DATA) $(RUN_DIR)
