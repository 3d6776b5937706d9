from setuptools import find_packages, setup

setup(
    name="megatrain",
    version="0.1.0",
    description="DeepSpeed ZeRO pretraining and fine-tuning of language models on math corpora",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    # 3.11: hashlib.file_digest (checkpoint checksums, shard ids); only 3.11 is tested.
    python_requires=">=3.11",
    packages=find_packages(include=["megatrain", "megatrain.*", "data_tools", "data_tools.*"]),
    package_data={"megatrain.eval": ["prompts/*.json"]},  # the versioned few-shot prompts
    # torch is deliberately unpinned here: install it first (the Makefile does, torch==2.13.0 on
    # CPU); a bare resolver run with no torch present would pull the CUDA build.
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.19.8,<0.20",
        "transformers>=5.23,<6",
        "safetensors>=0.8",
        # megatrain eval/generate --max-memory: transformers' device_map="auto" places and offloads through it.
        "accelerate>=1.0",
        "sentencepiece>=0.2.3",
        "webdataset>=1.0.2",
        "numpy>=1.26",
        "pyyaml>=6",
        "tqdm>=4.66",
        "tensorboard>=2.16",
        "submitit>=1.5.4",
        # The DeepMind generator; data_tools/deepmind.py bridges its sympy/numpy incompatibilities.
        "mathematics_dataset==1.0.1",
        "absl-py",
        "six",
        # megatrain-data dedup --near (MinHash LSH), inspect --histogram, and .jsonl.zst outputs.
        "datasketch>=2.0,<3",
        "matplotlib>=3.7",
        "zstandard>=0.22",
        # megatrain-data build sources (parquet, save_to_disk folders) and HF tokenizer.json folders.
        "pyarrow>=14",
        "datasets>=2.14",
        "tokenizers>=0.15",
        # Few-shot math eval: answer equivalence (1/2 = 0.5 = \frac{1}{2}) by a library made for it.
        "math-verify[antlr4_13_2]==0.9.0",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.6"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "psutil>=5.9"],
    },
    entry_points={"console_scripts": ["megatrain=megatrain.cli:entry", "megatrain-data=data_tools.cli:main"]},
)
