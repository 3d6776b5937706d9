"""Parallelism applied to a built single-device model, in one fixed order: TP, EP, activation
checkpointing; ZeRO wraps last (zero.py).

Tensor parallelism is DeepSpeed's AutoTP: the family's plan (for Llama, transformers' own
`base_model_tp_plan`) is carried by the model, the DeepSpeed JSON asks for `autotp_size`, and
`deepspeed.initialize` splits the layers before ZeRO partitions what each rank holds. So this module
checks the layout up front and prepares everything that is not the split itself.
"""

from __future__ import annotations

import contextlib

import torch

from megatrain.config import Config
from megatrain.model import ModelFamily
from megatrain.parallel import expert
from megatrain.parallel.checkpointing import apply_ac
from megatrain.parallel.dims import ParallelDims


def check(cfg: Config, family: ModelFamily, vocab_size: int, dims: ParallelDims) -> None:
    """Every layout the model or DeepSpeed cannot take, refused before any process group starts."""
    # Measured with DeepSpeed 0.19.8 on gloo (2026-12-02): AutoTP trains with ZeRO 0-3, bf16, activation
    # checkpointing, optimizer offload and (ZeRO-3) parameter offload, so only the model's own
    # divisibility can refuse a tp_degree.
    family.check_parallel(cfg, dims)  # e.g. expert parallelism, MoE under ZeRO-3
    family.check_tp(cfg.model, vocab_size, dims.tp)


def parallelize(model: torch.nn.Module, family: ModelFamily, cfg: Config, dims: ParallelDims,
                rank: int) -> torch.nn.Module:
    """Prepare `model` for the engine: experts sharded by EP rank, activation checkpointing; the TP
    split happens in deepspeed.initialize (see above)."""
    model = expert.apply_ep(model, family, cfg, dims, rank)
    apply_ac(model, cfg.parallel.activation_checkpointing)
    return model


def vocab_parallel(model: torch.nn.Module) -> bool:
    """True when the LM head keeps rank-local logits (AutoTP splits a tied head by vocabulary rows and
    patches the model's loss to a vocabulary-parallel cross entropy)."""
    return getattr(model.get_output_embeddings(), "is_vocab_parallel_lm_head", False)


@contextlib.contextmanager
def whole_logits(model: torch.nn.Module):
    """Within it the model returns logits over the whole vocabulary (gathered across the TP group), as
    greedy decoding and argmax scoring need; training keeps them split."""
    split = vocab_parallel(model)
    if split:
        model.get_output_embeddings().gather_output = True
    try:
        yield model
    finally:
        if split:
            model.get_output_embeddings().gather_output = False


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                        split_vocab: bool) -> torch.Tensor:
    """Per-token cross entropy (no reduction) in fp32, 0 where the target is ignore_index; also of
    vocabulary-split logits (then a TP collective). Either way the logits are upcast once, inside."""
    if split_vocab:
        from deepspeed.sequence.cross_entropy import vocab_parallel_cross_entropy
        from deepspeed.utils import groups

        return vocab_parallel_cross_entropy(logits, targets, groups.get_tensor_model_parallel_group(),
                                            ignore_index=ignore_index, reduction="none")
    # Flattened, not transposed to (B, V, T): a non-contiguous class dimension would cost another copy.
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=ignore_index,
                                             reduction="none").view_as(targets)
