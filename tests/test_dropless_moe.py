"""The dropless MoE family under ZeRO-3 with expert parallelism (DeepSpeed AutoEP), on real engines over gloo.

Tolerance of the EP parity test: with no capacity every token reaches its expert whatever the
layout, and an expert sees the same tokens in the same order from its own rank (EP=1) or through the
all-to-all (EP=2). What differs is ZeRO-3's bookkeeping: at EP=1 an expert's gradient is
reduce-scattered over both ranks, at EP=2 it is not reduced at all (one rank holds it), so fp32 sums
run in another order. Measured 2026-12-03: losses within 1.2e-7 (2.8e-8 relative) over 8 steps, load
identical. rel=1e-6 allows that; a token at the wrong expert or a gradient averaged over the wrong
group moves the loss by >1e-3 within a few steps.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import SMOKE, losses
from megatrain.model.moe import routing_losses
from test_bad_input import assert_one_clear_line, tree_digest
from test_moe import dump_ranks, records
from test_train import assert_same_trajectory

DROPLESS = ("--model.family=dropless_moe", "--model.moe.num_experts=4", "--parallel.zero_stage=3")


@pytest.fixture(scope="session")
def dropless_runs(train_smoke, tmp_path_factory):
    """EP=1 and EP=2 on 2 ranks, ZeRO-3, fp32, with the final eval."""
    root = tmp_path_factory.mktemp("dropless")
    for ep in (1, 2):
        train_smoke(root / f"ep{ep}", *DROPLESS, f"--parallel.ep_degree={ep}")
    return {1: root / "ep1", 2: root / "ep2"}


def test_zero3_ep2_matches_ep1(dropless_runs):
    ep1, ep2 = records(dropless_runs[1]), records(dropless_runs[2])
    assert_same_trajectory(losses(dropless_runs[2]), losses(dropless_runs[1]), rel=1e-6)
    for step in ep1:
        for key in ("loss_part/aux", "loss_part/z", "moe/layer1/load_e0", "moe/layer1/load_e3"):
            assert ep2[step][key] == pytest.approx(ep1[step][key], rel=1e-6, abs=1e-9), (step, key)
    assert losses(dropless_runs[2])[8] < losses(dropless_runs[2])[1] - 1.0
    # The final eval decodes on whole EP groups in lockstep (the all-to-all needs both ranks).
    scores = [{k: v for k, v in json.loads((run / "eval.json").read_text()).items() if k != "examples"}
              for run in dropless_runs.values()]
    assert scores[0] == scores[1] and scores[1]["n"] == 16


def test_loss_parts_and_expert_load_are_logged(dropless_runs):
    for r in records(dropless_runs[2]).values():
        load = [r[f"moe/layer1/load_e{e}"] for e in range(4)]
        assert sum(load) == pytest.approx(1.0, abs=1e-6) and min(load) >= 0
        want = r["loss_part/lm"] + 0.01 * r["loss_part/aux"] + 0.001 * r["loss_part/z"]
        assert r["loss"] == pytest.approx(want, rel=1e-6)
        assert r["loss_part/aux"] >= 1.0 - 1e-6
        assert "moe/layer1/dropped" not in r  # nothing is ever dropped


def test_routing_losses_are_deepspeeds():
    """The figures model.family=moe logs from DeepSpeed's gate, recomputed from router logits."""
    from deepspeed.moe.sharded_moe import top1gating, top2gating

    logits = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)) * 2
    aux, z, load = routing_losses(logits)
    for gating in (lambda x: top1gating(x, 10.0, 64, drop_tokens=False, use_rts=False),
                   lambda x: top2gating(x, 10.0, 64, drop_tokens=False, top2_2nd_expert_sampling=False)):
        torch.testing.assert_close(aux, gating(logits)[0], rtol=1e-6, atol=0)
    assert z == pytest.approx(torch.logsumexp(logits, -1).square().mean().item())
    assert load.tolist() == (torch.bincount(logits.argmax(-1), minlength=4) / 64).tolist()


def test_experts_live_on_their_rank_and_the_export_is_the_training_model(dm_data, deepspeed_ops, dropless_runs,
                                                                         tmp_path):
    """Re-running the EP=2 run's 8 steps: experts 0-1 on rank 0 and 2-3 on rank 1, shared weights equal on
    both, and transformers' Qwen3-MoE loaded from the run's export computes the live model's logits."""
    ranks = dump_ranks(tmp_path, *DROPLESS, "--parallel.ep_degree=2", "--train.steps=8",
                       f"--data.shards={dm_data['shards']}", "--eval.final_limit=0")
    shared = [r["shared"] for r in ranks]
    assert shared[0].keys() == shared[1].keys()
    for name in shared[0]:
        assert torch.equal(shared[0][name], shared[1][name]), name
    experts = [r["experts"][1] for r in ranks]
    assert (sorted(experts[0]), sorted(experts[1])) == ([0, 1], [2, 3])
    hf = AutoModelForCausalLM.from_pretrained(dropless_runs[2] / "checkpoints" / "step_8" / "hf", dtype=torch.float32)
    assert type(hf).__name__ == "Qwen3MoeForCausalLM" and hf.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 4
    for e in range(4):
        torch.testing.assert_close(hf.model.layers[1].mlp.experts.gate_up_proj[e], experts[e // 2][e][0], rtol=0, atol=0)
    ids = torch.randint(3, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf.eval()(input_ids=ids).logits
    for r in ranks:
        torch.testing.assert_close(r["logits"], want, rtol=0, atol=1e-5)


def test_resume_is_exact(train_smoke, dropless_runs, tmp_path):
    run = tmp_path / "run"
    train_smoke(run, *DROPLESS, "--parallel.ep_degree=2", "--train.exit_interval=3", "--eval.final_limit=0")
    train_smoke(run, *DROPLESS, "--parallel.ep_degree=2", "--resume", "--eval.final_limit=0")
    assert losses(run) == losses(dropless_runs[2])  # measured bit-identical
    before = tree_digest(run / "checkpoints")
    result = train_smoke(run, *DROPLESS, "--parallel.ep_degree=1", "--resume", "--train.steps=10", check=False)
    assert_one_clear_line(result, "parallel.ep_degree=2", "same layout")
    assert tree_digest(run / "checkpoints") == before


@pytest.mark.parametrize("overrides, tolerance", [
    # DeepSpeedCPUAdam rounds differently from torch's AdamW: 2.4e-7 apart measured over 8 steps.
    (("--parallel.offload_optimizer=true", "--parallel.offload_params=true"), 1e-5),
    # bf16 rounds activations: 1.7e-3 apart at most, measured.
    (("--precision=bf16", "--parallel.activation_checkpointing=true"), 0.02),
], ids=["cpu_offload", "bf16_activation_checkpointing"])
def test_offload_and_bf16_learn_the_same(train_smoke, dropless_runs, tmp_path, overrides, tolerance):
    train_smoke(tmp_path / "run", *DROPLESS, "--parallel.ep_degree=2", "--eval.final_limit=0", *overrides)
    got, want = losses(tmp_path / "run"), losses(dropless_runs[2])
    assert all(abs(got[s] - want[s]) <= tolerance * max(1.0, abs(want[s])) for s in want), (got, want)


def test_training_continues_from_an_exported_folder(train_smoke, dropless_runs, tmp_path):
    exported = dropless_runs[2] / "checkpoints" / "step_8" / "hf"
    train_smoke(tmp_path / "run", *DROPLESS, f"--model.from_pretrained={exported}", "--parallel.ep_degree=2",
                "--train.steps=2", "--optim.warmup_steps=1", "--eval.final_limit=0")
    assert losses(tmp_path / "run")[1] < losses(dropless_runs[2])[1] - 1.0


@pytest.mark.parametrize("overrides, nproc, needles", [
    (("--parallel.zero_stage=2",), 1, ("zero_stage=2", "model.family=moe")),
    (("--model.moe.num_experts=3", "--parallel.ep_degree=2"), 2, ("ep_degree=2", "num_experts=3")),
    (("--parallel.tp_degree=2",), 2, ("tp_degree=2", "ep_degree")),
], ids=["below_zero3", "ep_vs_experts", "tp"])
def test_bad_dropless_settings(dm_data, tmp_path, overrides, nproc, needles):
    from conftest import run_megatrain

    result = run_megatrain("train", SMOKE, "--nproc", nproc, f"--run.dir={tmp_path / 'run'}",
                           f"--data.shards={dm_data['shards']}", *DROPLESS, *overrides)
    assert_one_clear_line(result, *needles)
    assert not (tmp_path / "run").exists()
