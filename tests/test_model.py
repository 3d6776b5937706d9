"""The single-device model: built from a config, HF-native, attention kernel chosen with a fallback."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import LlamaForCausalLM

from megatrain.config import ModelConfig
from megatrain.model.llama import build_model, flops_per_token, num_params, pick_attention


def test_attention_choice_falls_back_to_sdpa_with_a_warning():
    assert pick_attention("auto", "cpu") == "sdpa"
    assert pick_attention("eager", "cpu") == "eager"
    with pytest.warns(UserWarning, match="flash_attention_2 ignored"):
        assert pick_attention("flash_attention_2", "cpu") == "sdpa"


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_flash_attention_picked_on_gpu_when_installed():
    assert pick_attention("auto", "cuda") == "flash_attention_2"


def test_model_roundtrips_through_save_pretrained(tmp_path):
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=100, pad_id=0, bos_id=2, eos_id=3)
    model.save_pretrained(tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 100, (2, 9))
    torch.testing.assert_close(model(ids).logits, again(ids).logits, rtol=0, atol=0)
    assert again.config.num_key_value_heads == 2 and again.config.vocab_size == 100


def test_flops_per_token_formula():
    cfg = ModelConfig(hidden_size=64, num_layers=2)
    model = build_model(cfg, vocab_size=100, pad_id=0, bos_id=2, eos_id=3)
    n = num_params(model)
    assert flops_per_token(cfg, n, seq_len=32) == 6 * n + 12 * 2 * 64 * 32
