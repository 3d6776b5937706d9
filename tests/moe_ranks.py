"""Train a few steps through megatrain's own setup and save what this rank holds, for tests/test_moe.py.

Run as one process per rank (the RANK / WORLD_SIZE / MASTER_* environment set):
    python tests/moe_ranks.py OUT_DIR CONFIG [--section.key=value ...]
Writes OUT_DIR/rank<R>.pt: {"shared": {name: tensor}, "experts": {layer: {global id: (gate_up, down)}}}.
"""

import sys
from pathlib import Path

import torch

from megatrain.config import load_config
from megatrain.model.moe import switch_layers
from megatrain.train import fetch, setup, train_step

out, config, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
s = setup(load_config(config, overrides), resume=False)
for _ in range(s.cfg.train.steps):
    batches, _ = fetch(s.loader, s.plan.accumulation)
    train_step(s.engine, batches, len(s.loader.source_names), s.family)
shared = {k: v.detach().clone() for k, v in s.engine.module.state_dict().items() if ".experts." not in k}
experts = {layer.layer_idx: layer.hf_experts() for layer in switch_layers(s.engine)}
torch.save({"shared": shared, "experts": experts}, out / f"rank{s.world.rank}.pt")
s.loader.close()
torch.distributed.barrier()
