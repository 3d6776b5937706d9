"""The streamed Hugging Face export (megatrain/export.py), in a run and offline (`megatrain export`), and
evals that decode on the ZeRO-3-sharded model.

What is compared with what:
- the streamed writer against transformers' own save_pretrained of the same model (every family, tied
  and untied heads, one shard and several): the same names, the same bytes, the same config files;
- `megatrain export` of a ZeRO-3 x TP=2 checkpoint against that run's in-run export of the same step:
  the same tensors, bit for bit (fp32: the master weights are the module's weights);
- a ZeRO-3 run's checkpoints and evals against what ZeRO-3 gathers: never the whole model on a rank.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, losses, run_megatrain
from megatrain.cli import _load
from megatrain.config import ModelConfig, MoEConfig
from megatrain.eval.qa import generate_answers
from megatrain.export import ShardWriter, export_hf
from megatrain.model import TokenIds, family
from megatrain.parallel.dims import World
from test_bad_input import assert_one_clear_line

IDS = TokenIds(vocab_size=96, pad_id=0, bos_id=1, eos_id=2)


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a save_pretrained folder, one shard or several."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


class Engine:
    """What export_hf reads of a DeepSpeed engine, for a model on one process: its module."""

    def __init__(self, module):
        self.module = module


@pytest.mark.parametrize("name, overrides", [
    ("llama", {"tie_embeddings": True}),
    ("llama", {"tie_embeddings": False}),
    ("t5", {"tie_embeddings": False}),
    ("t5", {"tie_embeddings": True}),
    ("switch_t5", {"moe": MoEConfig(num_experts=4, every=2)}),
    ("moe", {"moe": MoEConfig(num_experts=4, every=1, top_k=2, drop_tokens=False)}),
    ("dropless_moe", {"moe": MoEConfig(num_experts=4, every=2)}),
], ids=["llama_tied", "llama_untied", "t5_untied", "t5_tied", "switch_t5", "moe", "dropless_moe"])
def test_streamed_export_is_what_save_pretrained_writes(tmp_path, name, overrides):
    """One process, no ZeRO: the module-by-module writer gives save_pretrained's folder, bit for bit (tied
    weights once under the kept name, Qwen3-MoE's experts as per-expert matrices, the same config.json)."""
    cfg = ModelConfig(family=name, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_seq_len=32,
                      **overrides)
    model_family = family(name)
    torch.manual_seed(0)
    model = model_family.build(cfg, IDS).to(torch.bfloat16)
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "vocab.txt").write_text("a b c")
    export_hf(Engine(model), model_family, tmp_path / "ours", World(0, 0, 1, "cpu"), tokenizer)
    model_family.save_hf(model, tmp_path / "theirs", model_family.hf_state_dict(model))
    ours, theirs = folder_tensors(tmp_path / "ours"), folder_tensors(tmp_path / "theirs")
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    for file in ("config.json", "generation_config.json"):
        ours_file, theirs_file = (tmp_path / side / file for side in ("ours", "theirs"))
        assert json.loads(ours_file.read_text()) == json.loads(theirs_file.read_text()), file
    assert (tmp_path / "ours" / "vocab.txt").read_text() == "a b c"
    assert sorted(p.name for p in (tmp_path / "ours").glob("*.safetensors")) == ["model.safetensors"]


def test_shards_are_written_as_they_fill(tmp_path):
    """A small shard size: several shards named as save_pretrained names them, an index that maps every
    tensor, and a folder transformers loads into the same model."""
    from transformers import LlamaForCausalLM

    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_seq_len=32)
    torch.manual_seed(0)
    model = family("llama").build(cfg, IDS)
    export_hf(Engine(model), family("llama"), tmp_path / "out", World(0, 0, 1, "cpu"), None, max_shard_bytes=20_000)
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    tensors = folder_tensors(tmp_path / "out")
    assert sorted(index["weight_map"]) == sorted(tensors) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for shard in shards:  # each under the limit, unless one tensor alone is larger
        held = load_file(tmp_path / "out" / shard)
        assert len(held) == 1 or sum(t.numel() * t.element_size() for t in held.values()) <= 20_000
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_failed_write_is_raised_after_the_walk_as_a_write_error(tmp_path):
    """Rank 0 keeps walking (every module's gather is a collective) and raises what Checkpointer._attempt
    reports as a failed write, once at the end: here its folder's place is taken by a file."""
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_seq_len=32)
    model = family("llama").build(cfg, IDS)
    (tmp_path / "hf").write_text("not a folder")
    walked = []
    with pytest.raises(OSError):
        export_hf(Engine(model), family("llama"), tmp_path / "hf", World(0, 0, 1, "cpu"), None,
                  max_shard_bytes=1, on_gathered=lambda: walked.append(1))
    assert len(walked) == len(list(model.modules()))  # every module, after the first failed write too


def test_shard_writer_puts_a_large_tensor_alone(tmp_path):
    writer = ShardWriter(tmp_path, max_bytes=100)
    writer.add({"a": torch.zeros(10), "big": torch.zeros(100), "b": torch.ones(5)})
    writer.close()
    shards = [load_file(p) for p in sorted(tmp_path.glob("model-*.safetensors"))]
    assert [sorted(s) for s in shards] == [["a"], ["big"], ["b"]]


# --- in a run, and `megatrain export` ------------------------------------------------------------------

def test_megatrain_export_of_a_zero3_tp2_checkpoint_is_the_in_run_export(tp_runs, tmp_path):
    """ZeRO-3 x TP=2 on 4 ranks (2 data-parallel; the run test_tensor_parallel.py checks against TP=1): with
    checkpoint.hf_export=last only the final checkpoint carries hf/; `megatrain export` (one process,
    DeepSpeed's universal-checkpoint reader) writes the same tensors and files from DeepSpeed's files, and
    the same for the interval checkpoint without hf/."""
    run, stderr = tp_runs(3, 4)
    assert "is deprecated" not in stderr  # DeepSpeed's own calls of torch's deprecated collectives
    ckpts = run / "checkpoints"
    assert (ckpts / "step_8" / "hf" / "model.safetensors").is_file()
    assert (ckpts / "step_4" / "hf_config" / "config.json").is_file()
    before = {p: p.stat().st_mtime_ns for p in ckpts.rglob("*")}
    result = run_megatrain("export", run, "--out", tmp_path / "out8")  # the run folder: its latest, step_8
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(tmp_path / "out8")
    in_run, offline = folder_tensors(ckpts / "step_8" / "hf"), folder_tensors(tmp_path / "out8")
    assert sorted(offline) == sorted(in_run)
    for key in in_run:  # fp32: the master weights are the module's weights, bit for bit
        assert torch.equal(offline[key], in_run[key]), key
    for file in ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json"):
        assert (tmp_path / "out8" / file).read_bytes() == (ckpts / "step_8" / "hf" / file).read_bytes(), file
    assert {p: p.stat().st_mtime_ns for p in ckpts.rglob("*")} == before  # the checkpoints are only read
    assert not list(tmp_path.glob(".tmp-*")) and not (tmp_path / "latest_universal").exists()

    # The interval checkpoint, which has no hf/: `megatrain eval` names the fix, and the fix works (the export
    # is written next to the checkpoint, where eval looks; the other tests of this run read only step_8).
    step4 = ckpts / "step_4"
    result = run_megatrain("eval", step4, "--limit", "2")
    assert_one_clear_line(result, "step_4", "megatrain export")
    result = run_megatrain("export", run, "--step", "4", "--out", step4 / "hf")
    assert result.returncode == 0, result.stderr[-3000:]
    exported = folder_tensors(step4 / "hf")
    assert sorted(exported) == sorted(in_run) and any(not torch.equal(exported[k], in_run[k]) for k in in_run)
    result = run_megatrain("eval", step4, "--limit", "2")
    assert result.returncode == 0 and json.loads(result.stdout)["n"] == 2, result.stderr[-3000:]


def test_zero3_eval_decodes_sharded_and_resume_needs_no_hf(train_smoke, tmp_path):
    """ZeRO-3 on 2 ranks with checkpoint.hf_export=never: an eval at the step of a checkpoint, a stop and a
    resume from a checkpoint without hf/, then a final eval whose 5 problems split 3/2 over the ranks in
    batches of 2 (one rank runs a padding batch). Its scores and answers are those of the same checkpoint's
    export evaluated on one process. An untied head and a small learning rate keep the answers non-empty
    (a tied head this young repeats <sep>, which decodes to nothing)."""
    run = tmp_path / "run"
    common = ("--parallel.zero_stage=3", "--train.steps=4", "--checkpoint.interval=2", "--checkpoint.hf_export=never",
              "--model.tie_embeddings=false", "--optim.lr=1e-4", "--eval.interval=2", "--eval.limit=3",
              "--eval.final_limit=5", "--eval.batch_size=2")
    train_smoke(run, *common, "--train.exit_interval=2")
    assert not list((run / "checkpoints").rglob("hf"))
    train_smoke(run, *common, "--resume")
    assert sorted(losses(run)) == [1, 2, 3, 4] and not list((run / "checkpoints").rglob("hf"))
    final = json.loads((run / "eval.json").read_text())
    assert final["n"] == 5
    step4 = run / "checkpoints" / "step_4"
    result = run_megatrain("export", run, "--out", step4 / "hf")
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_megatrain("eval", step4, "--limit", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    alone = json.loads(result.stdout)
    assert {k: v for k, v in alone.items() if k != "examples"} == {k: v for k, v in final.items()
                                                                   if k not in ("examples", "step")}
    shown = final["examples"]["algebra__linear_1d"]
    assert all(e["answer"] for e in shown)  # something to compare beyond <eos>
    # The single-process model `megatrain eval` scored, answering rank 0's examples.
    cfg, model, tokenizer = _load(argparse.Namespace(checkpoint=step4, max_memory=None, offload_folder=None))
    questions = [e["question"] for e in shown]
    assert generate_answers(model, tokenizer, questions, cfg.eval.max_new_tokens, cfg.model.max_seq_len) == \
        [e["answer"] for e in shown]


def test_save_and_eval_gather_no_whole_model(tmp_path):
    """bench/zero_memory.py --phases on 2 ranks, with ZeRO-3's cap on gathered parameters at 1.5 layers (as
    DeepSpeed's default stands to a 34B model): the parameter bytes whole on a rank, counted at every module's
    forward and inside every export gather, never exceed the training step's during the save (one module at
    a time) or the eval (ZeRO-3's own per-layer gathers); the whole-model gathers megatrain did before
    exceed them. Counts of parameter bytes, not timings: the same on every run."""
    result = subprocess.run([sys.executable, "bench/zero_memory.py", "--phases", "--json", "--ranks", "2",
                             "--hidden", "64", "--layers", "2"], cwd=REPO, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["phase"]: r for r in json.loads(result.stdout.strip().splitlines()[-1])}
    assert rows["hf_export"]["gathered_ratio"] < 0.5 and rows["save"]["gathered_ratio"] < 0.5
    assert rows["eval"]["gathered_ratio"] <= 1.0
    assert rows["hf_export_whole_gather"]["gathered_ratio"] > 1.2 and rows["eval_whole_gather"]["gathered_ratio"] > 1.2


# --- refusals ------------------------------------------------------------------------------------------

def fake_checkpoint(root: Path, model: dict) -> Path:
    """A checkpoint folder as far as export's checks read it: trainer.json, config.yaml, hf_config/."""
    step = root / "checkpoints" / "step_2"
    (step / "hf_config").mkdir(parents=True)
    (step / "trainer.json").write_text(json.dumps({"step": 2, "world_size": 2, "tp_degree": 1, "ep_degree": 2}))
    (step / "config.yaml").write_text(json.dumps({"model": model, "parallel": {"zero_stage": 2}}))
    (step / "hf_config" / "config.json").write_text("{}")
    (root / "checkpoints" / "latest").write_text("step_2")
    return step


@pytest.mark.parametrize("case", ["moe", "out_not_empty", "no_such_step"])
def test_export_refusals_are_one_line(tmp_path, case):
    run = tmp_path / "run"
    fake_checkpoint(run, {"family": "moe" if case == "moe" else "llama"})
    out = tmp_path / "out"
    if case == "out_not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    args = ["--step", "7"] if case == "no_such_step" else []
    result = run_megatrain("export", run, *args, "--out", out)
    needles = {"moe": ("model.family=moe", "hf_export"), "out_not_empty": (str(out), "not empty"),
               "no_such_step": ("step_7", "steps 2")}[case]
    assert_one_clear_line(result, *needles)
    assert (out / "keep.txt").read_text() == "mine" if case == "out_not_empty" else not out.exists()
