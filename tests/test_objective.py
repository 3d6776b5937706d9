"""The objective is the mean over the step's label tokens, however the step is split (objective.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SMOKE, run_megatrain
from megatrain import objective
from megatrain.data.loader import IGNORE_INDEX


def test_the_token_loss_is_transformers_own_cross_entropy_unreduced():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    ids = torch.randint(0, 50, (3, 9))
    labels = ids.clone()
    labels[0, :4] = labels[1, :7] = labels[2, 8:] = IGNORE_INDEX  # answers of unequal lengths
    out = model(input_ids=ids, labels=labels)
    token_loss = objective.token_loss(out.logits, labels, "causal_lm", split_vocab=False)
    counts = objective.label_counts(labels, "causal_lm")
    assert counts.tolist() == [5, 2, 7]  # position t is scored against label t+1
    torch.testing.assert_close(token_loss.sum() / counts.sum(), out.loss, rtol=1e-6, atol=0)  # fp32 sum order
    assert (token_loss[objective.targets(labels, "causal_lm") == IGNORE_INDEX] == 0).all()


def test_the_scale_makes_the_step_gradient_the_token_mean():
    # DeepSpeed divides each micro-batch's loss by the accumulation steps and averages over DP ranks.
    per_micro_batch_sums, accumulation, dp = [3.0, 5.0, 7.0, 1.0], 2, 2
    scale = objective.step_scale(40, accumulation, dp)
    seen_by_the_optimizer = sum(s * scale for s in per_micro_batch_sums) / accumulation / dp
    assert seen_by_the_optimizer == pytest.approx(sum(per_micro_batch_sums) / 40, rel=1e-15)


def _train(run_dir: Path, data: dict, micro_batch_size: int, nproc: int) -> Path:
    result = run_megatrain("train", SMOKE, "--nproc", nproc, f"--run.dir={run_dir}",
                           f"--data.shards={data['shards']}", f"--eval.released={data['released']}",
                           "--train.steps=3", "--train.global_batch_size=16",
                           f"--train.micro_batch_size={micro_batch_size}", "--checkpoint.interval=3",
                           "--eval.final_limit=0", "--optim.warmup_steps=0")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def three_layouts(mm_data, deepspeed_ops, tmp_path_factory):
    """3 fp32 steps of 16 Q/A rows (two modules, answers of unequal lengths) split three ways."""
    root = tmp_path_factory.mktemp("objective")
    return {name: _train(root / name, mm_data, mbs, nproc)
            for name, mbs, nproc in (("mbs16", 16, 1), ("mbs8_x_accumulation2", 8, 1), ("mbs8_x_dp2", 8, 2))}


def test_parameters_do_not_depend_on_how_the_step_is_split(three_layouts):
    weights = {name: load_file(str(run / "checkpoints" / "step_3" / "hf" / "model.safetensors"))
               for name, run in three_layouts.items()}
    reference = weights.pop("mbs16")
    for name, got in weights.items():
        for key, want in reference.items():
            # fp32 sums in another order differ at the ULP level; Adam's first steps divide by sqrt(v), so
            # compare each tensor's deviation with its own size, not element by element.
            error = (got[key] - want).norm() / want.norm()
            assert error < 1e-6, f"{name}: {key} differs by {error:.2e} (relative)"


def test_the_logged_loss_is_the_token_weighted_mean_of_the_source_losses(three_layouts):
    for run in three_layouts.values():
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        records = [r for r in records if "loss" in r]
        assert len(records) == 3
        for record in records:
            per_source = {k: v for k, v in record.items() if k.startswith("loss/")}
            assert len(per_source) == 2
            tokens = {k: record[f"label_tokens/{k[len('loss/'):]}"] for k in per_source}
            weighted = sum(per_source[k] * tokens[k] for k in per_source) / sum(tokens.values())
            assert record["loss"] == pytest.approx(weighted, rel=1e-9)
