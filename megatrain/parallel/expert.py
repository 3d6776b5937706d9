"""Expert parallelism for the MoE family: checks, and each rank keeping only its share of the experts.

DeepSpeed's MoE layer does the rest inside the engine: deepspeed.initialize makes the expert-parallel
groups (`ep_degree` consecutive data-parallel ranks, deepspeed/utils/groups.py
_create_expert_and_data_parallel), tokens travel to their expert's rank all-to-all, and an expert's
gradients are averaged only over the ranks holding the same experts (the expert-data-parallel group).
"""

from __future__ import annotations

import torch

from megatrain.config import Config
from megatrain.errors import ConfigError
from megatrain.parallel.dims import ParallelDims


def check(cfg: Config, dims: ParallelDims) -> None:
    """Every MoE layout DeepSpeed's MoE layer cannot train, refused with one line each."""
    p, moe = cfg.parallel, cfg.model.moe
    if cfg.model.family == "switch_t5":
        if p.ep_degree > 1:
            raise ConfigError(f"parallel.ep_degree={p.ep_degree}: model.family=switch_t5 routes with transformers' own "
                              "layer, which has no expert parallelism; use parallel.ep_degree=1 (ZeRO-2 with "
                              "parallel.offload_optimizer=true for memory), or model.family=moe")
        if moe.every < 2 and not cfg.model.from_pretrained:
            # modeling_switch_transformers.py (transformers 5.24) adds its router losses only for a sparse
            # step > 1: with every layer sparse the routers would train without them.
            raise ConfigError("model.moe.every=1: transformers' Switch Transformers computes its router z-loss and "
                              "load-balancing loss only when sparse layers alternate with dense ones; use "
                              "model.moe.every=2 (as switch-base-8)")
        if p.zero_stage == 3:
            # Each rank runs only the experts its tokens chose, so ZeRO-3 would gather different
            # parameters on different ranks.
            raise ConfigError("model.family=switch_t5 trains with parallel.zero_stage 0, 1 or 2 (ranks run different "
                              "experts, which ZeRO-3's parameter gathering cannot follow); use zero_stage=2 with "
                              "parallel.offload_optimizer=true")
        return
    if cfg.model.family != "moe":
        if p.ep_degree > 1:
            raise ConfigError(f"parallel.ep_degree={p.ep_degree}: model.family={cfg.model.family} has no experts; "
                              "use model.family=moe or parallel.ep_degree=1")
        return
    if moe.num_experts % p.ep_degree:
        raise ConfigError(f"parallel.ep_degree={p.ep_degree} does not divide model.moe.num_experts={moe.num_experts}; "
                          "every expert-parallel rank holds the same number of experts")
    if moe.every > cfg.model.num_layers:
        raise ConfigError(f"model.moe.every={moe.every} exceeds model.num_layers={cfg.model.num_layers}: the model "
                          "would have no MoE layer; use model.family=llama for a dense model")
    if p.zero_stage == 3:
        # DeepSpeed 0.19.8 rejects its native MoE layer under ZeRO-3 (engine.py _configure_zero_optimizer).
        raise ConfigError("model.family=moe trains with parallel.zero_stage 0, 1 or 2 (DeepSpeed's MoE layer does "
                          "not support ZeRO-3); for less memory use zero_stage=2 with parallel.offload_optimizer=true, "
                          "or more expert-parallel ranks (parallel.ep_degree)")
    if p.tp_degree > 1:
        raise ConfigError(f"parallel.tp_degree={p.tp_degree}: model.family=moe is not tensor-parallel (DeepSpeed's "
                          "MoE layer with AutoTP is untested upstream); split it with parallel.ep_degree instead")


def apply_ep(model: torch.nn.Module, cfg: Config, dims: ParallelDims, rank: int) -> torch.nn.Module:
    """Keep on this rank only its expert-parallel share of every MoE layer's experts."""
    if cfg.model.family != "moe" or dims.ep == 1:
        return model
    from megatrain.model.moe import replace_sparse_blocks

    return replace_sparse_blocks(model, cfg.model.moe, dims.ep, dims.ep_rank(rank))
