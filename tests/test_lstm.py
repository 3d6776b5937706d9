"""model.family=lstm: the TinyStories study's recurrent LM, on the same loop, checkpoints, eval and generate."""

from __future__ import annotations


import pytest
import torch

from conftest import assert_checkpoint_scores_as_in_the_run, losses, run_megatrain
from megatrain.config import load_config
from megatrain.errors import ConfigError
from megatrain.model.lstm_model import LSTMConfig, LSTMForCausalLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LSTMConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2)
    return LSTMForCausalLM(config).eval()


def test_a_left_padded_row_gives_the_logits_of_the_row_alone(model):
    a, b = torch.tensor([[1, 5, 6, 7]]), torch.tensor([[1, 9, 8]])
    batch = torch.tensor([[1, 5, 6, 7], [0, 1, 9, 8]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    logits = model(batch, attention_mask=mask).logits
    torch.testing.assert_close(logits[0], model(a).logits[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits[1, 1:], model(b).logits[0], rtol=0, atol=1e-6)


def test_generation_carries_the_state_and_equals_recomputing_the_whole_text(model):
    prompt = torch.tensor([[1, 5, 6, 7]])
    out = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    text = prompt
    for _ in range(6):
        text = torch.cat([text, model(text).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.tolist() == text.tolist()


def test_the_export_reloads_tied_through_auto_classes(model, tmp_path):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LSTMForCausalLM and loaded.lm_head.weight is loaded.embed_tokens.weight
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("override, message", [
    ("--parallel.tp_degree=2", "model.family=lstm has no tensor-parallel plan"),
    ("--parallel.ep_degree=2", "model.family=lstm has no experts"),
    ("--parallel.zero_stage=3", "model.family=lstm trains with parallel.zero_stage 0, 1 or 2"),
    ("--parallel.activation_checkpointing=true", "model.family=lstm has no layers to recompute"),
])
def test_layouts_an_lstm_cannot_take_are_refused_in_one_line(dm_data, tmp_path, override, message):
    out = run_megatrain("train", "configs/cpu-smoke.yaml", "--nproc", 2, f"--run.dir={tmp_path / 'run'}",
                        f"--data.shards={dm_data['shards']}", "--model.family=lstm", override)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert message in out.stderr
    assert not (tmp_path / "run").exists()


def test_an_lstm_run_learns_and_its_checkpoint_evaluates_and_generates_as_in_the_run(train_smoke, tmp_path):
    run = tmp_path / "run"
    train_smoke(run, "--model.family=lstm", "--train.steps=12", "--checkpoint.interval=12")
    got = losses(run)
    assert got[12] < got[1] - 1.0, got
    assert_checkpoint_scores_as_in_the_run(run)


def test_the_config_takes_the_family():
    assert load_config(None, ["--model.family=lstm"]).model.family == "lstm"
    with pytest.raises(ConfigError, match="known families are .*lstm"):
        from megatrain.model import family
        family("rnn")
