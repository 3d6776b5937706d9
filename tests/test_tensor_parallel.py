"""Tensor parallelism (DeepSpeed AutoTP) composed with ZeRO: the same training as TP=1, real engines on gloo.

Tolerance: a TP rank multiplies by its half of each split matrix and the row-parallel layers sum the
halves with an all-reduce, so fp32 sums are taken in another order than in one matmul. Measured
2026-12-02: at most 3.6e-7 apart in loss (~5), i.e. <1e-7 relative; rel=1e-6 leaves room for
other CPUs' kernels while any real error (a wrong shard, a batch read twice) moves the loss by >1e-3.
"""

import json
import re

import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import assert_checkpoint_scores_as_in_the_run, losses, run_megatrain
from megatrain.checkpoint import check_elastic
from megatrain.config import ModelConfig, load_config
from megatrain.errors import CheckpointError, ConfigError
from megatrain.model import ModelFamily, family
from test_train import assert_same_trajectory


@pytest.fixture(scope="module")
def tp2_run(tp_runs):
    """TP=2 x ZeRO-2 on 2 ranks (DP=1): the run the resume and eval tests continue or read."""
    return tp_runs(2, 2)[0]


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("nproc", [2, 4], ids=["tp2", "tp2xdp2"])
def test_fp32_tp_matches_tp1(reference_run, tp_runs, stage, nproc):
    run, _ = tp_runs(stage, nproc)
    assert_same_trajectory(losses(run), losses(reference_run), rel=1e-6)
    tokens = [json.loads(line)["tokens_per_s"] for line in (run / "metrics.jsonl").read_text().splitlines()[:1]]
    assert tokens[0] > 0
    state = json.loads((run / "checkpoints" / "step_8" / "trainer.json").read_text())
    assert (state["tp_degree"], state["world_size"]) == (2, nproc)


@pytest.mark.parametrize("overrides", [
    ("--parallel.zero_stage=0",),
    ("--parallel.activation_checkpointing=true",),
    ("--parallel.offload_optimizer=true",),
    ("--parallel.zero_stage=3", "--parallel.offload_optimizer=true", "--parallel.offload_params=true"),
], ids=["zero0", "activation_checkpointing", "offload_optimizer", "zero3_offload_all"])
def test_tp_composes_with_zero0_checkpointing_and_offload(train_smoke, reference_run, tmp_path, overrides):
    train_smoke(tmp_path / "run", "--parallel.tp_degree=2", *overrides)
    assert_same_trajectory(losses(tmp_path / "run"), losses(reference_run), rel=1e-6)


@pytest.mark.parametrize("stage", [2, 3])
def test_hf_export_of_a_tp_run_is_the_whole_model(reference_run, tp_runs, stage):
    """Every rank joins the gather; rank 0 writes unsplit tensors that load anywhere and give the
    same logits as the TP=1 run's model (which followed the same trajectory). ZeRO-3 with DP=2 too."""
    run, _ = tp_runs(stage, 2 if stage == 2 else 4)
    got = LlamaForCausalLM.from_pretrained(run / "checkpoints" / "step_8" / "hf", dtype=torch.float32)
    want = LlamaForCausalLM.from_pretrained(reference_run / "checkpoints" / "step_8" / "hf", dtype=torch.float32)
    assert {k: v.shape for k, v in got.state_dict().items()} == {k: v.shape for k, v in want.state_dict().items()}
    ids = torch.randint(0, want.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got(ids).logits, want(ids).logits, rtol=0, atol=1e-4)


def test_bf16_tp_learns(train_smoke, reference_run, tmp_path):
    train_smoke(tmp_path / "run", "--parallel.tp_degree=2", "--parallel.zero_stage=1", "--precision=bf16")
    got, want = losses(tmp_path / "run"), losses(reference_run)
    assert got[8] < got[1] - 0.5
    assert all(abs(got[s] - want[s]) < 0.05 for s in want), (got, want)


def test_resume_at_the_same_tp_degree_is_exact(train_smoke, tp2_run, tmp_path):
    run = tmp_path / "run"
    train_smoke(run, "--parallel.tp_degree=2", "--train.exit_interval=3")
    train_smoke(run, "--parallel.tp_degree=2", "--resume")
    assert losses(run) == losses(tp2_run)


@pytest.mark.parametrize("first, then", [
    (("--parallel.tp_degree=2",), ("--parallel.tp_degree=1",)),
    ((), ("--parallel.tp_degree=2",)),
    (("--parallel.tp_degree=2",), ("--parallel.tp_degree=2", "--nproc=4")),  # DP 1 -> 2 under TP 2
], ids=["tp2to1", "tp1to2", "dp1to2"])
def test_resume_onto_another_layout(train_smoke, reference_run, tmp_path, first, then):
    """Through DeepSpeed's universal checkpoint: the continued run follows the uninterrupted one."""
    run = tmp_path / "run"
    train_smoke(run, *first, "--train.exit_interval=4")
    nproc = int(then[-1].split("=")[1]) if then[-1].startswith("--nproc") else 2
    train_smoke(run, *(a for a in then if not a.startswith("--nproc")), "--resume", nproc=nproc)
    assert (run / "checkpoints" / "step_4" / "universal").is_dir()
    assert_same_trajectory(losses(run), losses(reference_run), rel=1e-6)


@pytest.mark.parametrize("stage", [0, 3])
def test_tp_change_refused_where_it_would_not_load_exactly(tmp_path, stage):
    ckpt = tmp_path / "step_4"
    ckpt.mkdir()
    (ckpt / "trainer.json").write_text(json.dumps({"step": 4, "world_size": 2, "tp_degree": 2}))
    cfg = load_config(None, ["--parallel.tp_degree=1", f"--parallel.zero_stage={stage}"])
    with pytest.raises(CheckpointError, match=rf"tp_degree=2; with ZeRO-{stage} it cannot be resumed at "
                                              r"tp_degree=1\. Resume with --parallel.tp_degree=2"):
        check_elastic(ckpt, cfg, 2)


def test_eval_of_a_tp_run_decodes_as_the_whole_model(tp2_run):
    """The final eval ran with each TP group decoding together; the exported model, alone on one
    process, scores the same problems the same way and gives the same answers."""
    assert_checkpoint_scores_as_in_the_run(tp2_run)


@pytest.mark.parametrize("overrides, nproc, message", [
    (["--parallel.tp_degree=4"], 2, "parallel.tp_degree=4 does not divide the world size 2"),
    (["--parallel.tp_degree=4", "--model.num_kv_heads=2"], 4, r"does not divide model.num_kv_heads \(2\)"),
    (["--parallel.tp_degree=4", "--model.intermediate_size=130"], 4,
     r"does not divide model.intermediate_size \(130\)"),
])
def test_bad_tp_layout_is_one_line_before_any_rank_starts(dm_data, tmp_path, overrides, nproc, message):
    out = run_megatrain("train", "configs/cpu-smoke.yaml", "--nproc", nproc, f"--run.dir={tmp_path / 'run'}",
                        f"--data.shards={dm_data['shards']}", *overrides)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("error: ") and re.search(message, out.stderr), out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field, value, vocab, message", [
    ("num_heads", 6, 512, r"model.num_heads \(6\)"),
    ("num_kv_heads", 1, 512, r"model.num_kv_heads \(1\)"),
    ("intermediate_size", 130, 512, r"model.intermediate_size \(130\)"),
    (None, None, 511, r"the vocabulary size \(511\)"),
])
def test_llama_tp_plan_checks(field, value, vocab, message):
    cfg = ModelConfig(hidden_size=96, num_heads=4, intermediate_size=128)
    if field:
        setattr(cfg, field, value)
    with pytest.raises(ConfigError, match=message):
        family("llama").check_tp(cfg, vocab, 4)
    family("llama").check_tp(ModelConfig(hidden_size=96, num_heads=4, intermediate_size=128), 512, 4)


def test_family_without_a_tp_plan_refuses_tp():
    class NoPlan(ModelFamily):
        name = "noplan"
    with pytest.raises(ConfigError, match="model.family=noplan has no tensor-parallel plan"):
        NoPlan().check_tp(ModelConfig(), 512, 2)
    NoPlan().check_tp(ModelConfig(), 512, 1)
