"""DeepSpeed ZeRO: the engine config derived from the config tree, and the wrapping itself."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from megatrain.config import Config, batch_plan
from megatrain.model import family
from megatrain.parallel.dims import ParallelDims, tensor_parallel_groups


def deepspeed_config(cfg: Config, dims: ParallelDims, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON for `cfg`, derived, never written by hand (as gpt-neox does).

    Args:
        load_universal: The checkpoint to resume is a DeepSpeed universal checkpoint (written for
            another number of data-parallel ranks, see layout_conversion.prepare_resume).
    """
    plan = batch_plan(cfg, dims)
    p = cfg.parallel
    zero: dict = {"stage": p.zero_stage}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if p.zero_stage == 3:
        # Buckets sized to the model, as transformers' "auto" values: DeepSpeed's defaults (5e8
        # elements) make ZeRO-3 hold ~2 GB of fp32 buffers per rank whatever the model (measured with
        # bench/zero_memory.py: 2.1 GB for a 21M-parameter model, 8.8x its ZeRO-0 footprint).
        h = cfg.model.hidden_size
        zero.update(reduce_bucket_size=h * h, stage3_prefetch_bucket_size=int(0.9 * h * h),
                    stage3_param_persistence_threshold=10 * h)
    ds = {
        # Counted over data-parallel ranks: wrap() hands DeepSpeed the TP/DP groups, so its batch check
        # divides out the tensor-parallel ranks (which read the same batches).
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.accumulation,
        # Explicit: DeepSpeed 0.19.8 clips at 1.0 when the key is absent.
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        # check_grad_overflow: a step whose gradient norm is inf/NaN is skipped on every rank (guard.py).
        # DeepSpeed's default, but the guard relies on it.
        "bf16": {"enabled": cfg.precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": False},
        # Our optimizers are torch's AdamW or DeepSpeedCPUAdam, both built in optim.py.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if cfg.precision == "bf16" and p.fp32_grad_reduce and p.zero_stage > 0:
        # DeepSpeed 0.19.8 otherwise accumulates and all-reduces bf16 gradients: communication_data_type
        # defaults to the model's dtype (runtime/engine.py:1719-1731) and grad_accum_dtype to it too
        # (engine.py:1804-1810). With fp32: ZeRO-1 takes the BF16_Optimizer, whose gradients are fp32
        # (engine.py:2305-2311, bf16_optimizer.py get_grads_for_reduction); ZeRO-1 + offload and ZeRO-2
        # accumulate in a separate fp32 buffer (zero/stage_1_and_2.py:395-401, 1233-1240) and reduce in
        # communication_data_type (1485-1494); ZeRO-3 accumulates into its fp32 gradient partitions
        # (zero/stage3.py:239, 792) and reduce-scatters in communication_data_type (1648-1678). ZeRO-0
        # with bf16 is refused (config.validate); DeepSpeed has no fp32 accumulation there (engine.py:2313-2323).
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
        ds["communication_data_type"] = "fp32"
    if dims.tp > 1:
        ds["tensor_parallel"] = {"autotp_size": dims.tp}
    ds.update(family(cfg.model.family).deepspeed_config(cfg, dims))  # e.g. AutoEP's "expert_parallel"
    return ds


def wrap(model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler, cfg: Config,
         dims: ParallelDims, load_universal: bool = False):
    """Wrap the model in a DeepSpeed engine (ZeRO sharding, bf16 master weights, accumulation, clipping).

    Returns:
        The engine; `engine.optimizer` and `engine.lr_scheduler` are the wrapped collaborators.
    """
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                           config=deepspeed_config(cfg, dims, load_universal),
                                           mpu=tensor_parallel_groups(dims.tp) if dims.tp > 1 else None)
    return engine


def partitioned(module: torch.nn.Module) -> bool:
    """Whether ZeRO-3 holds `module`'s parameters in partitions (each rank a slice; gathered per layer as
    the layer runs)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def gathered_params(params: torch.nn.Module | Iterable[torch.nn.Parameter]):
    """A context in which `params` (a module's, recursively, when given a module) are whole on every rank:
    ZeRO-3 gathers their partitions on the device and releases them on exit; a no-op for parameters ZeRO-3
    does not partition.

    Gather one module at a time: a whole model does not fit on one device where ZeRO-3 is needed (a 34B
    model is 68 GB of bf16). megatrain/export.py walks the model this way; an eval needs no gather at all
    (ZeRO-3's own hooks gather each layer as it runs).
    """
    params = list(params.parameters()) if isinstance(params, torch.nn.Module) else list(params)
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3 marks the parameters it partitions
        import deepspeed
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def tp_gathered_params(params: list[torch.nn.Parameter], module: torch.nn.Module):
    """A context in which the AutoTP slices among `module`'s own `params` are whole on every rank of the
    tensor-parallel group (DeepSpeed's GatherReplacedLayerParams, re-split on exit); a no-op for parameters
    AutoTP did not split. Under ZeRO-3 it goes inside gathered_params (as DeepSpeed nests them)."""
    from deepspeed.module_inject.layers import DS_IS_REPLACED_MODULE

    if not any(getattr(p, DS_IS_REPLACED_MODULE, False) for p in params):
        return contextlib.nullcontext()
    from deepspeed.module_inject.layers import GatherReplacedLayerParams

    return GatherReplacedLayerParams(params, module, enabled=True)
