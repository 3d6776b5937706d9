"""transformers' Switch Transformers (`model.family=switch_t5`): the T5-style encoder-decoder with
mixture-of-experts feed-forward layers of the Switch paper (e.g. a local `google/switch-base-8`
folder), fine-tuned question -> answer like T5, with transformers' own top-1 router.

The router's capacity, jitter, z-loss and load-balancing loss are HF's (SwitchTransformersTop1Router);
they are logged as loss parts. Its experts live on every rank (no expert parallelism: HF's layer
has none), so the memory answer is ZeRO-2 with the optimizer offloaded to the CPU. For expert
parallelism train `model.family=moe`.
"""

from __future__ import annotations

import math

from typing import TYPE_CHECKING

import torch

from megatrain.config import ModelConfig
from megatrain.errors import ConfigError
from megatrain.model import ModelOutput, TokenIds
from megatrain.model.t5 import T5Family

if TYPE_CHECKING:  # imported where used (see megatrain/model/llama.py)
    from transformers import SwitchTransformersConfig


def hf_config(cfg: ModelConfig, ids: TokenIds) -> SwitchTransformersConfig:
    from transformers import SwitchTransformersConfig

    moe = cfg.moe
    sparse = cfg.num_layers // moe.every  # HF places them every num_layers // num_sparse layers
    # HF counts capacity per sequence: an expert takes at most this many of one sequence's tokens.
    capacity = max(moe.min_capacity, math.ceil(moe.capacity_factor * cfg.max_seq_len / moe.num_experts))
    return SwitchTransformersConfig(
        vocab_size=ids.vocab_size, d_model=cfg.hidden_size, d_kv=cfg.hidden_size // cfg.num_heads,
        d_ff=cfg.intermediate_size, num_layers=cfg.num_layers, num_decoder_layers=cfg.num_layers,
        num_heads=cfg.num_heads, num_experts=moe.num_experts, expert_capacity=capacity,
        num_sparse_encoder_layers=sparse, num_sparse_decoder_layers=sparse,
        router_jitter_noise=0.01 if moe.jitter else 0.0, router_z_loss_coef=moe.z_loss_coef,
        router_aux_loss_coef=moe.aux_loss_coef, dropout_rate=0.0, tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=ids.pad_id, eos_token_id=ids.eos_id, decoder_start_token_id=ids.pad_id)


class SwitchT5Family(T5Family):
    name = "switch_t5"
    shape_fields = (*T5Family.shape_fields, "moe.num_experts", "moe.every")
    hf_model_types = ("switch_transformers",)

    def check_parallel(self, cfg, dims) -> None:
        p = cfg.parallel
        if p.ep_degree > 1:
            raise ConfigError(f"parallel.ep_degree={p.ep_degree}: model.family=switch_t5 routes with transformers' own "
                              "layer, which has no expert parallelism; use parallel.ep_degree=1 (ZeRO-2 with "
                              "parallel.offload_optimizer=true for memory), or model.family=moe")
        if cfg.model.moe.every < 2 and not cfg.model.from_pretrained:
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

    def build(self, cfg: ModelConfig, ids: TokenIds, device_type: str = "cpu"):
        from transformers import SwitchTransformersForConditionalGeneration

        from megatrain.model.switch_t5_experts import run_every_expert

        if cfg.from_pretrained:
            return run_every_expert(self.load_hf(cfg.from_pretrained, device_type))
        return run_every_expert(SwitchTransformersForConditionalGeneration(hf_config(cfg, ids)))

    def load_hf(self, path, device_type: str = "cpu", **placement):
        from transformers import SwitchTransformersForConditionalGeneration

        return SwitchTransformersForConditionalGeneration.from_pretrained(path, dtype=torch.float32, **placement)

    def forward(self, model: torch.nn.Module, batch: dict) -> ModelOutput:
        out = model(**self.inputs(model, batch), output_router_logits=True)
        config = getattr(model, "module", model).config
        # HF gives a plain 0 for a stack without router losses (a folder whose every layer is sparse).
        z, aux = (torch.as_tensor(a + b, dtype=torch.float32, device=out.logits.device)
                  for a, b in ((out.encoder_z_loss, out.decoder_z_loss), (out.encoder_aux_loss, out.decoder_aux_loss)))
        # Weighted by the config's coefficients, as HF adds them to its own loss.
        extra = config.router_z_loss_coef * z + config.router_aux_loss_coef * aux
        parts = {"loss_part/aux": aux.detach(), "loss_part/z": z.detach()}
        return ModelOutput(out.logits, extra, parts)

    def flops_per_token(self, cfg: ModelConfig, model: torch.nn.Module) -> float:
        """As T5, counting one expert of each sparse layer (top-1) instead of all of them."""
        experts = [m for name, m in model.named_modules() if name.endswith(".mlp.experts")]
        inactive = sum(p.numel() for e in experts for p in e.parameters()) * (1 - 1 / model.config.num_experts)
        return super().flops_per_token(cfg, model) - 6 * inactive / 2
