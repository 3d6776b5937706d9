"""A recurrent LM (`model.family=lstm`): the TinyStories study's second model, trained on the same shards
with the same loop, checkpoints, eval and generate as the transformers (megatrain/model/lstm_model.py).

Sizes: model.hidden_size (embedding and LSTM width, equal so the output layer can be the embedding),
model.num_layers (stacked LSTMs). Heads, intermediate_size and rope mean nothing here. It is data
parallel with ZeRO 0-2; tensor and expert parallelism, activation checkpointing and ZeRO-3 are
refused: a model of this kind is small (the study's are 1-30M parameters), and a fused LSTM kernel
has no layers to split, recompute or gather one by one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megatrain.config import ModelConfig
from megatrain.errors import ConfigError
from megatrain.model import ModelFamily, TokenIds

if TYPE_CHECKING:  # imported where used (see megatrain/model/llama.py)
    from megatrain.model.lstm_model import LSTMConfig, LSTMForCausalLM


def hf_config(cfg: ModelConfig, ids: TokenIds) -> LSTMConfig:
    from megatrain.model.lstm_model import LSTMConfig

    return LSTMConfig(vocab_size=ids.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                      initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings,
                      pad_token_id=ids.pad_id, bos_token_id=ids.bos_id, eos_token_id=ids.eos_id)


class LSTMFamily(ModelFamily):
    name = "lstm"
    hf_model_types = ("megatrain_lstm",)
    shape_fields = ("hidden_size", "num_layers", "tie_embeddings")

    def build(self, cfg: ModelConfig, ids: TokenIds, device_type: str = "cpu") -> LSTMForCausalLM:
        from megatrain.model.lstm_model import LSTMForCausalLM

        if cfg.from_pretrained:
            return self.load_hf(cfg.from_pretrained, device_type)
        return LSTMForCausalLM(hf_config(cfg, ids))

    def load_hf(self, path, device_type: str = "cpu", **placement) -> LSTMForCausalLM:
        from megatrain.model.lstm_model import LSTMForCausalLM

        return LSTMForCausalLM.from_pretrained(path, dtype=torch.float32, **placement)

    def check_pretrained(self, cfg, ids: TokenIds):
        import megatrain.model.lstm_model  # noqa: F401  registers the model type with AutoConfig

        return super().check_pretrained(cfg, ids)

    def check_parallel(self, cfg, dims) -> None:
        super().check_parallel(cfg, dims)  # no experts
        p = cfg.parallel
        if p.zero_stage == 3:
            raise ConfigError("model.family=lstm trains with parallel.zero_stage 0, 1 or 2 (ZeRO-3 gathers a model "
                              "layer by layer; the LSTM is one fused module, and small); use zero_stage=2")
        if p.activation_checkpointing:
            raise ConfigError("parallel.activation_checkpointing=true: model.family=lstm has no layers to recompute "
                              "(one fused LSTM module); set it to false")

    def flops_per_token(self, cfg: ModelConfig, model: torch.nn.Module) -> float:
        """6 FLOPs per weight per token (forward and backward) over the LSTM's weights and the output layer,
        which runs for every token even when tied to the embedding (the embedding lookup costs none)."""
        lstm = sum(p.numel() for p in model.lstm.parameters())
        return 6 * (lstm + model.lm_head.weight.numel())
