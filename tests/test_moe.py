"""The Switch-style MoE family on DeepSpeed's MoE layer: expert parallelism, ZeRO 0-2 and offload,
resume, HF export, the balance loss and the per-layer metrics, on real engines over gloo.

Tolerance of the EP parity tests: an expert sees the same tokens in the same order whether they
arrive from its own rank (EP=1) or through the all-to-all (EP=2), and its gradient is averaged over
the same ranks, so the runs sum the same fp32 numbers. Measured 2026-12-03: bit-identical losses on 2
ranks and on 4 (dp 4, ep 2). rel=1e-6 leaves room for kernels that block other buffer shapes
differently; any real error (an expert on the wrong rank, a gradient averaged over the wrong group)
moves the loss by >1e-3 within a few steps.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, SMOKE, losses
from megatrain.config import ModelConfig, MoEConfig
from megatrain.data.tokenizer import Tokenizer
from megatrain.launch.local import rank_env
from megatrain.model import TokenIds, family
from megatrain.model.moe import SwitchFeedForward
from megatrain.parallel.dims import free_port
from test_bad_input import assert_one_clear_line, tree_digest
from test_offload import assert_offloaded_model_matches
from test_train import assert_same_trajectory

MOE = ("--model.family=moe", "--model.moe.num_experts=4")


@pytest.fixture(scope="session")
def moe_runs(train_smoke, tmp_path_factory):
    """EP=1 and EP=2 on 2 ranks (ZeRO-2, fp32, tokens dropped at capacity 1.25), with the final eval."""
    root = tmp_path_factory.mktemp("moe")
    for ep in (1, 2):
        train_smoke(root / f"ep{ep}", *MOE, f"--parallel.ep_degree={ep}")
    return {1: root / "ep1", 2: root / "ep2"}


def records(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def test_ep2_matches_ep1_with_tokens_dropped(moe_runs):
    ep1, ep2 = records(moe_runs[1]), records(moe_runs[2])
    assert_same_trajectory(losses(moe_runs[2]), losses(moe_runs[1]), rel=1e-6)
    for step in ep1:
        for key in ("loss_part/aux", "loss_part/z", "moe/layer1/dropped", "moe/layer1/load_e3"):
            assert ep2[step][key] == pytest.approx(ep1[step][key], rel=1e-6, abs=1e-9), (step, key)
    assert any(r["moe/layer1/dropped"] > 0 for r in ep1.values())  # capacity 1.25 really dropped tokens
    # The final eval decodes each problem share on a whole EP group in lockstep: the same scores.
    # Each problem is counted once (n), not once per rank of the group.
    scores = [{k: v for k, v in json.loads((run / "eval.json").read_text()).items() if k != "examples"}
              for run in moe_runs.values()]
    assert scores[0] == scores[1] and scores[1]["n"] == 16


@pytest.mark.parametrize("nproc, extra", [(2, ("--model.moe.drop_tokens=false",)), (4, ())],
                         ids=["no_token_dropping", "dp4_ep2"])
def test_ep2_matches_ep1(train_smoke, tmp_path, nproc, extra):
    for ep in (1, 2):
        train_smoke(tmp_path / f"ep{ep}", *MOE, f"--parallel.ep_degree={ep}", "--eval.final_limit=0", *extra,
                    nproc=nproc)
    assert_same_trajectory(losses(tmp_path / "ep2"), losses(tmp_path / "ep1"), rel=1e-6)


def test_loss_parts_and_expert_load_are_logged(moe_runs):
    for r in records(moe_runs[2]).values():
        load = [r[f"moe/layer1/load_e{e}"] for e in range(4)]
        assert sum(load) == pytest.approx(1.0, abs=1e-6) and min(load) >= 0
        assert 0 <= r["moe/layer1/dropped"] < 1
        # The loss trained on is the LM loss plus the Switch defaults' weighted aux and z-loss.
        want = r["loss_part/lm"] + 0.01 * r["loss_part/aux"] + 0.001 * r["loss_part/z"]
        assert r["loss"] == pytest.approx(want, rel=1e-6)
        assert r["loss_part/aux"] >= 1.0 - 1e-6  # Switch's aux loss is 1 at uniform load, more when skewed
    assert "moe/layer0/dropped" not in r  # layer 0 is dense (model.moe.every=2)


def dump_ranks(tmp_path, *overrides):
    """Each rank's parameters after 3 steps (unless overridden), from tests/moe_ranks.py on 2 ranks."""
    out = tmp_path / "dump"
    out.mkdir()
    port = free_port()
    # stderr to files, not pipes: ZeRO-3 warns at every collective, and a full pipe would block the rank.
    logs = [open(out / f"rank{rank}.err", "w") for rank in range(2)]
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "moe_ranks.py"), str(out), str(SMOKE), *MOE,
                               "--train.steps=3", f"--run.dir={tmp_path / 'run'}", *overrides],
                              env={**os.environ, **rank_env(rank, 2, port)}, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=log) for rank, log in enumerate(logs)]
    for rank, p in enumerate(procs):
        assert p.wait(timeout=300) == 0, (out / f"rank{rank}.err").read_text()[-3000:]
    for log in logs:
        log.close()
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("ep", [1, 2])
def test_each_ep_rank_holds_its_experts_and_shared_weights_agree(dm_data, deepspeed_ops, tmp_path, ep):
    ranks = dump_ranks(tmp_path, f"--parallel.ep_degree={ep}", f"--data.shards={dm_data['shards']}",
                       "--eval.final_limit=0")
    shared = [r["shared"] for r in ranks]
    assert shared[0].keys() == shared[1].keys()
    for name in shared[0]:
        assert torch.equal(shared[0][name], shared[1][name]), name
    experts = [r["experts"][1] for r in ranks]  # layer 1, the MoE layer
    if ep == 1:  # every rank holds every expert, the same after the same averaged steps
        assert sorted(experts[0]) == sorted(experts[1]) == [0, 1, 2, 3]
        assert all(torch.equal(experts[0][e][0], experts[1][e][0]) for e in range(4))
    else:  # experts 0-1 live on rank 0, 2-3 on rank 1, each trained only there
        assert (sorted(experts[0]), sorted(experts[1])) == ([0, 1], [2, 3])
        assert not torch.allclose(experts[0][0][0], experts[1][2][0])


def test_resume_is_exact_and_keeps_the_layout(train_smoke, moe_runs, tmp_path):
    run = tmp_path / "run"
    train_smoke(run, *MOE, "--parallel.ep_degree=2", "--train.exit_interval=3", "--eval.final_limit=0")
    train_smoke(run, *MOE, "--parallel.ep_degree=2", "--resume", "--eval.final_limit=0")
    assert losses(run) == losses(moe_runs[2])  # measured bit-identical
    before = tree_digest(run / "checkpoints")
    result = train_smoke(run, *MOE, "--parallel.ep_degree=1", "--resume", "--train.steps=10", check=False)
    assert_one_clear_line(result, "parallel.ep_degree=2", "same layout")
    assert tree_digest(run / "checkpoints") == before


def test_zero2_with_cpu_offload_learns(train_smoke, moe_runs, tmp_path):
    """ZeRO-2 with the optimizer on the CPU (DeepSpeedCPUAdam over the expert and shared groups)."""
    train_smoke(tmp_path / "run", *MOE, "--parallel.ep_degree=2", "--parallel.offload_optimizer=true",
                "--eval.final_limit=0")
    got = losses(tmp_path / "run")
    assert got[8] < got[1] - 1.0
    # DeepSpeedCPUAdam and torch's AdamW round differently: 6e-7 apart measured over 8 steps.
    assert_same_trajectory(got, losses(moe_runs[2]), rel=1e-5)


@pytest.mark.parametrize("overrides", [("--parallel.zero_stage=1", "--precision=bf16"),
                                       ("--parallel.zero_stage=0", "--parallel.activation_checkpointing=true")],
                         ids=["zero1_bf16", "zero0_activation_checkpointing"])
def test_other_zero_stages_precisions_and_checkpointing(train_smoke, moe_runs, tmp_path, overrides):
    train_smoke(tmp_path / "run", *MOE, "--parallel.ep_degree=2", "--eval.final_limit=0", *overrides)
    got, want = losses(tmp_path / "run"), losses(moe_runs[2])
    # bf16 rounds activations (measured 2.4e-3 apart at most); ZeRO-0 sums gradients in another order.
    assert all(abs(got[s] - want[s]) < 0.02 for s in want), (got, want)


def test_hf_export_of_an_ep_run_holds_every_expert(moe_runs):
    """The EP=2 run's experts, gathered from both ranks, give the EP=1 run's model."""
    got = AutoModelForCausalLM.from_pretrained(moe_runs[2] / "checkpoints" / "step_8" / "hf", dtype=torch.float32)
    want = AutoModelForCausalLM.from_pretrained(moe_runs[1] / "checkpoints" / "step_8" / "hf", dtype=torch.float32)
    assert type(got).__name__ == "Qwen3MoeForCausalLM"
    assert got.model.layers[1].mlp.experts.gate_up_proj.shape == (4, 2 * 128, 64)
    ids = torch.randint(0, want.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got(ids).logits, want(ids).logits, rtol=0, atol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(moe_runs[2] / "checkpoints" / "step_8" / "hf")
    own = Tokenizer(moe_runs[2] / "checkpoints" / "step_8" / "hf" / "tokenizer.model")
    assert tokenizer("Solve 2*x = 4 for x.").input_ids == own.encode("Solve 2*x = 4 for x.")
    special = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
    assert special == (own.pad_id, own.eos_id, own.bos_id)
    assert tokenizer.convert_tokens_to_ids("<sep>") == own.sep_id


def test_training_continues_from_an_exported_folder(train_smoke, moe_runs, tmp_path):
    """model.from_pretrained of a Qwen3-MoE folder (here the EP=2 run's export) onto EP=2: the first
    loss is the trained model's, not a fresh one's."""
    exported = moe_runs[2] / "checkpoints" / "step_8" / "hf"
    train_smoke(tmp_path / "run", *MOE, f"--model.from_pretrained={exported}",
                "--parallel.ep_degree=2", "--train.steps=2", "--optim.warmup_steps=1", "--eval.final_limit=0")
    assert losses(tmp_path / "run")[1] < losses(moe_runs[2])[1] - 1.0
    result = train_smoke(tmp_path / "other", *MOE, f"--model.from_pretrained={exported}",
                         "--model.moe.num_experts=8", check=False)
    assert_one_clear_line(result, "other experts", "--model.moe.num_experts=4")


def test_eval_of_an_moe_larger_than_the_memory_budget(moe_runs, tmp_path):
    """The EP=2 run's export on one process, some experts on disk."""
    assert_offloaded_model_matches(moe_runs[2] / "checkpoints" / "step_8", tmp_path)


@pytest.mark.parametrize("top_k", [1, 2])
def test_hf_model_computes_what_training_computes(tmp_path, top_k):
    """Without token dropping, transformers' Qwen3-MoE with the exported weights is the training model:
    top-1 weighs the expert by its softmax probability, top-2 renormalizes the pair, as DeepSpeed's gates."""
    cfg = ModelConfig(family="moe", hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_seq_len=32,
                      moe=MoEConfig(num_experts=4, every=1, top_k=top_k, drop_tokens=False))
    moe = family("moe")
    torch.manual_seed(0)
    model = moe.build(cfg, TokenIds(vocab_size=100, pad_id=0, bos_id=1, eos_id=2)).eval()
    moe.save_hf(model, tmp_path, moe.hf_state_dict(model))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_balance_loss_evens_out_a_skewed_router():
    """Every token starts on expert 0 (most dropped at capacity); descending the aux loss alone spreads them."""
    torch.manual_seed(0)
    layer = SwitchFeedForward(0, hidden_size=16, expert_size=32, moe=MoEConfig(num_experts=4, jitter=False))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 4.0
    x = torch.randn(1, 256, 16)
    x[..., 0] += 3.0
    layer(x)
    assert layer.load.max() == 1.0 and layer.dropped > 0.5
    optimizer = torch.optim.Adam(layer.router.parameters(), lr=0.05)
    for _ in range(100):
        layer(x)
        optimizer.zero_grad()
        layer.aux_loss.backward()
        optimizer.step()
    assert layer.load.max() < 0.3 and layer.dropped < 0.05  # uniform is 0.25 each, nothing dropped


@pytest.mark.parametrize("overrides, nproc, needles", [
    (("--model.moe.num_experts=3", "--parallel.ep_degree=2"), 2, ("ep_degree=2", "num_experts=3")),
    (("--parallel.ep_degree=4",), 2, ("ep_degree=4", "2 data-parallel ranks")),
    (("--model.moe.capacity_factor=0",), 1, ("capacity_factor=0", "positive")),
    (("--parallel.zero_stage=3",), 1, ("zero_stage=2", "offload_optimizer")),
    (("--parallel.tp_degree=2",), 2, ("tp_degree=2", "ep_degree")),
    (("--model.family=llama", "--parallel.ep_degree=2"), 2, ("model.family=llama", "no experts")),
], ids=["ep_vs_experts", "ep_vs_dp", "capacity", "zero3", "tp", "dense_family"])
def test_bad_moe_settings(dm_data, tmp_path, overrides, nproc, needles):
    from conftest import run_megatrain

    result = run_megatrain("train", SMOKE, "--nproc", nproc, f"--run.dir={tmp_path / 'run'}",
                           f"--data.shards={dm_data['shards']}", *MOE, *overrides)
    assert_one_clear_line(result, *needles)
    assert not (tmp_path / "run").exists()


def test_checkpoint_of_another_family_is_refused(train_smoke, reference_run, tmp_path):
    """A dense (llama) checkpoint given to the MoE recipe: one line, nothing changed."""
    before = tree_digest(reference_run / "checkpoints")
    result = train_smoke(reference_run, *MOE, "--resume", "--train.steps=10", check=False)
    assert_one_clear_line(result, "model.family: checkpoint 'llama', config 'moe'")
    assert tree_digest(reference_run / "checkpoints") == before


def test_fewer_tokens_than_the_minimum_capacity():
    """A decode step of fewer sequences than model.moe.min_capacity (DeepSpeed's gate asserts against
    it) is padded inside the layer: each token's output is what it is in a full batch."""
    torch.manual_seed(0)
    layer = SwitchFeedForward(0, hidden_size=16, expert_size=32, moe=MoEConfig(num_experts=4, drop_tokens=False)).eval()
    x = torch.randn(1, 6, 16)
    with torch.no_grad():
        full = layer(x)
        torch.testing.assert_close(layer(x[:, :2]), full[:, :2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("top_k,capacity_factor", [(1, 1.0), (2, 0.5)])
def test_padding_moves_no_loss_gradient_or_expert_load(top_k, capacity_factor):
    """Pads are not routed: adding pad columns or a pad row to a micro-batch leaves the loss, every
    parameter's gradient and the expert load as they were (capacity counts the micro-batch's token
    budget, pads and fillers take no expert slot under top-1 or top-2, the aux/z-losses and the load
    count real tokens only)."""
    from megatrain import objective
    from megatrain.config import Config, TrainConfig
    from megatrain.data.loader import IGNORE_INDEX
    from megatrain.parallel.dims import ParallelDims

    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(family="moe", hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                   max_seq_len=12, moe=MoEConfig(num_experts=4, top_k=top_k, capacity_factor=capacity_factor,
                                                                  jitter=False)),
                 train=TrainConfig(micro_batch_size=3, global_batch_size=3))
    moe = family("moe")
    model = moe.shard_experts(moe.build(cfg.model, TokenIds(64, 0, 1, 2)), cfg, ParallelDims(1), 0).train()
    lengths, width = (12, 7, 4), 12
    ids = torch.randint(3, 64, (3, width))
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    labels = torch.where(mask.bool() & (torch.arange(width) >= 2), ids, IGNORE_INDEX)
    ids = ids * mask  # pad id 0

    def padded(columns: int, rows: int) -> dict:
        pad = lambda t, value: torch.nn.functional.pad(t, (0, columns, 0, rows), value=value)  # noqa: E731
        return {"input_ids": pad(ids, 0), "attention_mask": pad(mask, 0), "labels": pad(labels, IGNORE_INDEX)}

    def step(batch: dict):
        model.zero_grad()
        out = moe.forward(model, batch)
        token_loss = objective.token_loss(out.logits, batch["labels"], "causal_lm", split_vocab=False)
        loss = token_loss.sum() / objective.label_counts(batch["labels"], "causal_lm").sum() + out.extra_loss
        loss.backward()
        load = {k: v for k, v in out.parts.items() if "load" in k or "dropped" in k}
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, load

    want_loss, want_grads, want_load = step(padded(0, 0))
    assert want_load["moe/layer1/dropped"] > 0  # capacity 1.0 bites: the test covers who is dropped
    for columns, rows in ((5, 0), (0, 2), (3, 1)):
        loss, grads, load = step(padded(columns, rows))
        # The same real tokens take the same fp32 path; only reductions over a longer buffer may reorder
        # sums (ULP level).
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
        assert grads.keys() == want_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, want_grads[name], rtol=1e-5, atol=1e-7, msg=name)
        for name, value in load.items():
            torch.testing.assert_close(value, want_load[name], rtol=0, atol=0, msg=name)


def test_the_masked_top2_gate_is_deepspeeds_where_every_token_is_real():
    """moe_gate.masked_top2_routes with an all-ones mask returns what DeepSpeed's top2gating returns (the
    routes, slots, weights, capacity and counts); with tokens masked they take no route and no slot."""
    from deepspeed.moe.sharded_moe import top2gating

    from megatrain.model.moe_gate import masked_top2_routes

    logits = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    want = top2gating(logits.clone(), 0.5, 2, drop_tokens=True, top2_2nd_expert_sampling=False, sparse_routes=True)
    got = masked_top2_routes(logits.clone(), torch.ones(40), 0.5, 2)
    assert (got[1], got[2]) == (want[1], want[2])  # capacity, experts
    for a, b in zip(got[3:], want[3:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(got[0], want[0])
    assert (want[3] < 0).any()  # capacity bites, so the slots are what is compared

    used = (torch.arange(40) % 3 != 0).float()
    indices, slots = masked_top2_routes(logits.clone(), used, 0.5, 2)[3:5]
    assert (indices[:, used == 0] == -1).all()
    for expert in range(4):  # the real routes fill each expert's slots from 0 with no gap left by a masked token
        taken = slots[indices == expert]
        assert sorted(taken.tolist()) == list(range(len(taken)))
