"""T5 / FLAN-T5 (`model.family=t5`): transformers' `T5ForConditionalGeneration`, fine-tuned on
question -> answer as CyberSolve did on the DeepMind mathematics dataset.

The question goes to the encoder and the answer is the decoder's labels (the seq2seq collator,
megatrain/data/loader.py). A fresh model from the config has FLAN-T5's layout (T5 v1.1: gated-GELU
feed-forward, no dropout here); `model.from_pretrained` takes a user's local `save_pretrained`
folder (a downloaded `google/flan-t5-large`), whose own config then decides the shapes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megatrain.config import ModelConfig
from megatrain.model import ModelFamily, TokenIds, num_params

if TYPE_CHECKING:  # imported where used (see megatrain/model/llama.py)
    from transformers import T5Config, T5ForConditionalGeneration


def hf_config(cfg: ModelConfig, ids: TokenIds) -> T5Config:
    from transformers import T5Config

    return T5Config(
        vocab_size=ids.vocab_size, d_model=cfg.hidden_size, d_kv=cfg.hidden_size // cfg.num_heads,
        d_ff=cfg.intermediate_size, num_layers=cfg.num_layers, num_decoder_layers=cfg.num_layers,
        num_heads=cfg.num_heads, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        tie_word_embeddings=cfg.tie_embeddings, is_encoder_decoder=True,
        pad_token_id=ids.pad_id, eos_token_id=ids.eos_id, decoder_start_token_id=ids.pad_id)


def untie_lm_head(model: T5ForConditionalGeneration) -> None:
    """An LM head of its own, as T5 v1.1 / FLAN-T5 have. transformers 5.x builds every T5 with the head
    tied to the embedding (T5Config forces tie_word_embeddings=True and keeps the flag only as
    scale_decoder_outputs); a saved untied head loads untied again, since the two tensors differ."""
    d_model = model.config.d_model
    head = torch.empty_like(model.shared.weight).normal_(mean=0.0, std=d_model**-0.5)  # unit-scale logits at init
    model.lm_head.weight = torch.nn.Parameter(head)


class T5Family(ModelFamily):
    name = "t5"
    shape_fields = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "tie_embeddings")
    task = "seq2seq"
    hf_model_types = ("t5",)
    hf_tokenizer_class = "T5Tokenizer"

    def build(self, cfg: ModelConfig, ids: TokenIds, device_type: str = "cpu") -> T5ForConditionalGeneration:
        if cfg.from_pretrained:
            return self.load_hf(cfg.from_pretrained, device_type)
        from transformers import T5ForConditionalGeneration

        model = T5ForConditionalGeneration(hf_config(cfg, ids))
        if not cfg.tie_embeddings:
            untie_lm_head(model)
        return model

    def load_hf(self, path, device_type: str = "cpu", **placement) -> T5ForConditionalGeneration:
        from transformers import T5ForConditionalGeneration

        return T5ForConditionalGeneration.from_pretrained(path, dtype=torch.float32, **placement)

    def flops_per_token(self, cfg: ModelConfig, model: torch.nn.Module) -> float:
        """6N/2 per token (question and answer tokens counted alike): each token passes one of the two
        stacks, which are about the same size; attention is left out (short Q/A sequences)."""
        return 6 * num_params(model) / 2
