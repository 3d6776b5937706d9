# The two commands of the README: `make demo` (install + main job) and `make test` (install + tests).
PYTHON ?= python3
DATA := data/math-mix
RUN_DIR := runs/math-mix
# The main job's DeepMind modules (configs/math-mix.yaml evaluates the same ones), and problems per module.
MODULES := algebra__linear_1d,numbers__place_value,comparison__pair,numbers__round_number
DEMO_TRAIN := 60000
DEMO_TEST := 500

.PHONY: install demo test clean-demo gpu-wheels

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
	$(PYTHON) -m pytest -q --durations=25 tests

clean-demo:
	rm -rf $(DATA) $(RUN_DIR)

# Wheels for the GPU machine (bench/gpu_check.py): no network there, Python 3.12 with torch, transformers
# 5.17 and sentencepiece but no DeepSpeed. DeepSpeed is built here without its ops (they JIT-compile
# there with nvcc and ninja); the rest are what megatrain's train path needs that the image lacks or has
# too old (transformers >= 5.23 pulls huggingface-hub 2.x, which pulls httpx2). Pinned to what this
# machine tests with. submitit, webdataset, mathematics_dataset, datasketch and zstandard stay behind: neither
# the train path nor the data commands gpu_check runs (it writes its own problems) import them.
# The folder travels with the working tree: 64 MiB in all, checked at the end.
GPU_WHEELS := .whl
GPU_PLATFORM := --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
GPU_PINS := transformers==5.25.0 huggingface-hub==2.4.0 kernels==0.19.1 tomlkit==0.15.3 regex==2026.5.9 \
	httpx2==2.17.0 httpcore2==2.17.0 h11==0.16.0 anyio==4.16.0 idna==3.21 truststore==0.10.5 click==8.5.1 \
	hf-xet==1.8.0 hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \
	typing-inspection==0.4.2 typing-extensions==4.16.0

gpu-wheels:
	rm -rf $(GPU_WHEELS)
	mkdir -p $(GPU_WHEELS)
	DS_BUILD_OPS=0 $(PYTHON) -m pip wheel -q --no-deps --no-build-isolation --wheel-dir $(GPU_WHEELS) deepspeed==0.19.8
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: $(GPU_PLATFORM) -d $(GPU_WHEELS) $(GPU_PINS)
	$(PYTHON) bench/gpu_check.py --wheels-report $(GPU_WHEELS)
