"""A Llama-style decoder from transformers' classes, for one device.

Using transformers' `LlamaForCausalLM` keeps checkpoints HF-native: `save_pretrained` folders load
in any HF tool, and a local HF folder can be the starting point of continued pretraining.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings

from typing import TYPE_CHECKING

import torch

from megatrain.config import ModelConfig
from megatrain.errors import ConfigError
from megatrain.model import ModelFamily, TokenIds, num_params

# transformers' model classes are imported where a model is built: importing them takes ~6 s of CPU,
# which `train --nproc N` would pay once more in the launcher, whose preflight only runs the family's checks.
if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM

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
    from transformers import LlamaConfig

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
    from transformers import LlamaForCausalLM

    attn = pick_attention(cfg.attention, device_type)
    if cfg.from_pretrained:
        return LlamaForCausalLM.from_pretrained(cfg.from_pretrained, attn_implementation=attn,
                                                torch_dtype=torch.float32)
    config = hf_config(cfg, vocab_size, pad_id, bos_id, eos_id)
    config._attn_implementation = attn
    return LlamaForCausalLM(config)


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12*L*H*T for attention (PaLM appendix B)."""
    return 6 * n_params + 12 * cfg.num_layers * cfg.hidden_size * seq_len


class LlamaFamily(ModelFamily):
    name = "llama"
    hf_model_types = ("llama",)
    shape_fields = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "tie_embeddings")
    # transformers' own plan (q/k/v/gate/up column-wise, o/down row-wise), which DeepSpeed's AutoTP
    # applies when the model carries it (engine._apply_autotp_partitioning: HF tp_plan).
    supports_tp = True

    def build(self, cfg: ModelConfig, ids: TokenIds, device_type: str = "cpu") -> LlamaForCausalLM:
        return build_model(cfg, ids.vocab_size, ids.pad_id, ids.bos_id, ids.eos_id, device_type)

    def load_hf(self, path, device_type: str = "cpu", **placement) -> LlamaForCausalLM:
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM.from_pretrained(path, attn_implementation=pick_attention("auto", device_type),
                                                dtype=torch.float32, **placement)

    def flops_per_token(self, cfg: ModelConfig, model: torch.nn.Module) -> float:
        return flops_per_token(cfg, num_params(model), cfg.max_seq_len)

    def check_tp(self, cfg: ModelConfig, vocab_size: int, tp_degree: int) -> None:
        kv = cfg.num_kv_heads or cfg.num_heads
        for what, n in (("model.num_heads", cfg.num_heads), ("model.num_kv_heads", kv),
                        ("model.intermediate_size", cfg.intermediate_size), ("the vocabulary size", vocab_size)):
            if n % tp_degree:
                # Heads and the MLP are split column-wise, the LM head by vocabulary rows.
                raise ConfigError(f"parallel.tp_degree={tp_degree} does not divide {what} ({n}); "
                                  f"use a tp_degree that divides it")
