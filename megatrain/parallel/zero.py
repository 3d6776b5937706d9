"""DeepSpeed ZeRO: the engine config derived from the config tree, and the wrapping itself."""

from __future__ import annotations

import contextlib

import torch

from megatrain.config import Config, gradient_accumulation_steps


def deepspeed_config(cfg: Config, dp_world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON for `cfg`, derived, never written by hand (as gpt-neox does).

    Args:
        load_universal: The checkpoint to resume is a DeepSpeed universal checkpoint (written for
            another number of data-parallel ranks, see Checkpointer.prepare_resume).
    """
    accumulation = gradient_accumulation_steps(cfg, dp_world_size)
    p = cfg.parallel
    zero: dict = {"stage": p.zero_stage}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if p.zero_stage == 3:
        # Gather full weights on save so checkpoints export to HF without a consolidation pass.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": cfg.train.micro_batch_size * accumulation * dp_world_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        # Explicit: DeepSpeed 0.19.8 clips at 1.0 when the key is absent.
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": False},
        # Our optimizers are torch's AdamW or DeepSpeedCPUAdam, both built in optim.py.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }


def wrap(model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler, cfg: Config,
         dp_world_size: int, load_universal: bool = False):
    """Wrap the model in a DeepSpeed engine (ZeRO sharding, bf16 master weights, accumulation, clipping).

    Returns:
        The engine; `engine.optimizer` and `engine.lr_scheduler` are the wrapped collaborators.
    """
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                           config=deepspeed_config(cfg, dp_world_size, load_universal))
    return engine


def gathered_params(module: torch.nn.Module):
    """A context in which every parameter is whole on every rank (ZeRO-3 gathers them; else a no-op)."""
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3 marks the parameters it partitions
        import deepspeed
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()
