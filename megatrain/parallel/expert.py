"""Expert parallelism: each rank keeps only its share of every MoE layer's experts.

DeepSpeed's MoE layer does the rest inside the engine: deepspeed.initialize makes the expert-parallel
groups (`ep_degree` consecutive data-parallel ranks, deepspeed/utils/groups.py
_create_expert_and_data_parallel), tokens travel to their expert's rank all-to-all, and an expert's
gradients are averaged only over the ranks holding the same experts (the expert-data-parallel group).
Which layouts a family can take is the family's to say (ModelFamily.check_parallel).
"""

from __future__ import annotations

import torch

from megatrain.config import Config
from megatrain.model import ModelFamily
from megatrain.parallel.dims import ParallelDims


def apply_ep(model: torch.nn.Module, family: ModelFamily, cfg: Config, dims: ParallelDims,
             rank: int) -> torch.nn.Module:
    """Keep on this rank only its expert-parallel share of every MoE layer's experts (the family knows
    its layers; AutoEP's family leaves it to deepspeed.initialize)."""
    return family.shard_experts(model, cfg, dims, rank)
