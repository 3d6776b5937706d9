"""A Llama-style decoder from transformers' classes, for one device.

Using transformers' `LlamaForCausalLM` keeps checkpoints HF-native: `save_pretrained` folders load
in any HF tool, and a local HF folder can be the starting point of continued pretraining.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megatrain.config import ModelConfig

log = logging.getLogger(__name__)


def pick_attention(requested: str, device_type: str) -> str:
    """The attention kernel: flash-attn's when asked for (or `auto`) on a GPU where it imports, else SDPA.

    On CPU, SDPA runs PyTorch's own flash kernel, so `auto` loses nothing there.
    """
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if (has_flash and device_type == "cuda") else "sdpa"
    if requested == "flash_attention_2" and not (has_flash and device_type == "cuda"):
        why = "flash-attn is not installed (pip install '.[gpu]')" if not has_flash else "there is no GPU"
        warnings.warn(f"model.attention=flash_attention_2 ignored: {why}; using sdpa", stacklevel=2)
        return "sdpa"
    return requested


def hf_config(cfg: ModelConfig, vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )


def build_model(cfg: ModelConfig, vocab_size: int, pad_id: int, bos_id: int, eos_id: int,
                device_type: str = "cpu") -> LlamaForCausalLM:
    """A fresh (or `cfg.from_pretrained`) LlamaForCausalLM in fp32; the engine casts for bf16."""
    attn = pick_attention(cfg.attention, device_type)
    if cfg.from_pretrained:
        return LlamaForCausalLM.from_pretrained(cfg.from_pretrained, attn_implementation=attn,
                                                torch_dtype=torch.float32)
    config = hf_config(cfg, vocab_size, pad_id, bos_id, eos_id)
    config._attn_implementation = attn
    return LlamaForCausalLM(config)


def num_params(model: torch.nn.Module, exclude_embeddings: bool = True) -> int:
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        n -= model.get_input_embeddings().weight.numel()
    return n


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12*L*H*T for attention (PaLM appendix B)."""
    return 6 * n_params + 12 * cfg.num_layers * cfg.hidden_size * seq_len
