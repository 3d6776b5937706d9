"""Under bf16, DeepSpeed accumulates and reduces gradients in fp32 at every ZeRO stage megatrain trains
bf16 with (1-3; bf16 on ZeRO-0 is refused): real engines, asked what they hold.

The loss gap this closes is measured by bench/bf16_grad_reduce.py (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from megatrain.config import load_config
from megatrain.parallel.dims import ParallelDims
from megatrain.parallel.zero import deepspeed_config

ENGINE = """
import json, sys, torch
from megatrain.config import load_config
from megatrain.model import TokenIds, family
from megatrain.optim import build_optimizer, build_scheduler
from megatrain.parallel.dims import init_world
from megatrain.parallel.zero import wrap

stage, fp32_reduce = int(sys.argv[1]), sys.argv[2]
cfg = load_config(None, ["--model.hidden_size=32", "--model.num_layers=1", "--model.num_heads=2",
                         "--model.intermediate_size=64", "--model.max_seq_len=16", "--train.micro_batch_size=2",
                         "--train.global_batch_size=4", f"--parallel.zero_stage={stage}", "--precision=bf16",
                         f"--parallel.fp32_grad_reduce={fp32_reduce}"])
world = init_world()
llama = family("llama")
model = llama.build(cfg.model, TokenIds(64, 0, 1, 2))
optimizer = build_optimizer(llama.param_groups(model, 0.0), cfg)
engine = wrap(model, optimizer, build_scheduler(optimizer, cfg), cfg, world.dims)
opt = engine.optimizer
print(json.dumps({"optimizer": type(opt).__name__, "communication": str(engine.communication_data_type),
                  "accumulation": str(getattr(opt, "gradient_accumulation_dtype", None)),
                  "bf16_optimizer_grads": str(opt.fp32_groups_gradients_flat[0].dtype)
                  if hasattr(opt, "fp32_groups_gradients_flat") else None}))
"""


def test_bf16_asks_for_fp32_gradient_sums():
    cfg = load_config(None, ["--precision=bf16"])
    ds = deepspeed_config(cfg, ParallelDims(2))
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    off = load_config(None, ["--precision=bf16", "--parallel.fp32_grad_reduce=false"])
    assert "data_types" not in deepspeed_config(off, ParallelDims(2))
    assert "data_types" not in deepspeed_config(load_config(None, ["--precision=fp32"]), ParallelDims(2))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_engines_accumulate_and_reduce_bf16_gradients_in_fp32(stage, deepspeed_ops):
    out = subprocess.run([sys.executable, "-c", ENGINE, str(stage), "true"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["communication"] == "torch.float32"
    if stage == 1:  # DeepSpeed's BF16_Optimizer: fp32 gradient buffers (engine.py _do_optimizer_sanity_check)
        assert got["optimizer"] == "BF16_Optimizer" and got["bf16_optimizer_grads"] == "torch.float32"
    else:  # without the setting DeepSpeed accumulates in the model's dtype and communicates in bf16
        assert got["accumulation"] == "torch.float32"
