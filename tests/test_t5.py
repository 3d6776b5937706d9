"""T5 / FLAN-T5 fine-tuning on the DeepMind Q/A shards: the seq2seq collator, ZeRO 0-3, bf16 and
activation checkpointing on real engines, both exact-match metrics, HF in and out, and a FLAN-T5
style folder (its own sentencepiece model, T5's special ids) whose tokenizer builds the shards.
"""

import json

import numpy as np
import pytest
import sentencepiece
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, T5Config, T5ForConditionalGeneration

from conftest import SMOKE, losses, run_megatrain
from megatrain.data.loader import IGNORE_INDEX, collate_seq2seq, seq2seq_example
from megatrain.model.t5 import untie_lm_head
from test_bad_input import assert_one_clear_line, tree_digest
from test_offload import assert_offloaded_model_matches
from test_train import assert_same_trajectory

T5 = ("--model.family=t5",)


@pytest.fixture(scope="session")
def t5_run(train_smoke, tmp_path_factory):
    """T5 from the config (FLAN-T5's layout, tiny), ZeRO-2, fp32, 2 ranks, with the final eval."""
    run = tmp_path_factory.mktemp("t5") / "zero2"
    train_smoke(run, *T5)
    return run


def test_seq2seq_collator():
    ids = {"eos": 1}
    examples = [seq2seq_example(np.array([5, 6, 7]), np.array([8]), ids, 16),
                seq2seq_example(np.array([9]), np.array([10, 11]), ids, 16)]
    batch = collate_seq2seq(examples, pad_id=0, sources=[0, 1])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1], [9, 1, 0, 0]]  # question <eos>, right-padded
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[8, 1, IGNORE_INDEX], [10, 11, 1]]  # answer <eos>
    assert batch["real_tokens"].tolist() == [6, 5] and batch["source"].tolist() == [0, 1]
    question, _ = seq2seq_example(np.arange(100, 140), np.array([8]), ids, 16)
    assert question == [*range(125, 140), 1]  # a long question keeps its last tokens


def test_t5_learns_and_reports_both_exact_matches(t5_run):
    got = losses(t5_run)
    assert got[8] < got[1] - 1.0, got
    result = json.loads((t5_run / "eval.json").read_text())
    assert result["n"] == 16
    assert {"exact_match", "teacher_forced_exact_match", "numeric_match"} <= result.keys()
    records = [json.loads(line) for line in (t5_run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["tokens_per_s"] > 0


@pytest.mark.parametrize("overrides", [("--parallel.zero_stage=3",), ("--parallel.zero_stage=0",),
                                       ("--parallel.activation_checkpointing=true",)],
                         ids=["zero3", "zero0", "activation_checkpointing"])
def test_t5_zero_stages_and_checkpointing_match(train_smoke, t5_run, tmp_path, overrides):
    train_smoke(tmp_path / "run", *T5, "--eval.final_limit=0", *overrides)
    # The stages sum the same fp32 numbers in another order (as the decoder's tests, test_train.py).
    assert_same_trajectory(losses(tmp_path / "run"), losses(t5_run), rel=1e-5)
    if overrides == ("--parallel.zero_stage=3",):  # the export gathers ZeRO-3's partitions: the same model
        got = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "run" / "checkpoints" / "step_8" / "hf")
        want = AutoModelForSeq2SeqLM.from_pretrained(t5_run / "checkpoints" / "step_8" / "hf")
        ids = torch.randint(4, want.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
        labels = torch.randint(4, want.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(got(input_ids=ids, labels=labels).logits,
                                   want(input_ids=ids, labels=labels).logits, rtol=0, atol=1e-4)


def test_t5_bf16_learns(train_smoke, t5_run, tmp_path):
    train_smoke(tmp_path / "run", *T5, "--precision=bf16", "--parallel.zero_stage=1", "--eval.final_limit=0")
    got, want = losses(tmp_path / "run"), losses(t5_run)
    assert got[8] < got[1] - 1.0 and all(abs(got[s] - want[s]) < 0.05 for s in want), (got, want)


def test_eval_of_a_t5_checkpoint(t5_run):
    """`megatrain eval` reads the checkpoint's hf/ folder as a seq2seq model: the training run's numbers."""
    result = run_megatrain("eval", t5_run / "checkpoints" / "step_8", "--eval.final_limit=16")
    assert result.returncode == 0, result.stderr[-2000:]
    want = {k: v for k, v in json.loads((t5_run / "eval.json").read_text()).items() if k not in ("step", "examples")}
    assert json.loads(result.stdout.splitlines()[0]) == want


def test_eval_of_a_t5_larger_than_the_memory_budget(t5_run, tmp_path):
    assert_offloaded_model_matches(t5_run / "checkpoints" / "step_8", tmp_path)


@pytest.fixture(scope="session")
def flan_folder(tmp_path_factory, dm_data):
    """A FLAN-T5-style `save_pretrained` folder: T5 v1.1 layout and a sentencepiece model with T5's
    special ids (pad 0, eos 1, unk 2, no bos, no <sep>) named spiece.model, as google/flan-t5-* ship."""
    from megatrain.data.released import TRAIN_SPLITS, read_split

    folder = tmp_path_factory.mktemp("flan") / "flan-t5-tiny"
    folder.mkdir()
    text = [t for pair in read_split(dm_data["released"], "algebra__linear_1d", TRAIN_SPLITS) for t in pair]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=str(folder / "spiece"), vocab_size=320, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True, minloglevel=2)
    torch.manual_seed(0)
    config = T5Config(vocab_size=320, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config)
    untie_lm_head(model)  # FLAN-T5 has an LM head of its own
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def flan_shards(flan_folder, dm_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("flan-shards") / "shards"
    result = run_megatrain_data("deepmind", "shards", "--released", dm_data["released"], "--module",
                                "algebra__linear_1d", "--out", out, "--tokenizer", flan_folder / "spiece.model")
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def run_megatrain_data(*args):
    import subprocess
    import sys

    from conftest import REPO
    return subprocess.run([sys.executable, "-m", "data_tools.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_fine_tune_a_flan_t5_folder_on_shards_of_its_own_tokenizer(train_smoke, flan_folder, flan_shards, tmp_path):
    manifest = json.loads((flan_shards / "manifest.json").read_text())
    assert (manifest["pad_id"], manifest["eos_id"], manifest["bos_id"], manifest["sep_id"]) == (0, 1, None, None)
    run = tmp_path / "run"
    train_smoke(run, *T5, f"--model.from_pretrained={flan_folder}", f"--data.shards={flan_shards}")
    got = losses(run)
    assert got[8] < got[1] - 0.5, got
    exported = AutoModelForSeq2SeqLM.from_pretrained(run / "checkpoints" / "step_8" / "hf")
    imported = AutoModelForSeq2SeqLM.from_pretrained(flan_folder)
    assert exported.config.vocab_size == 320 and not exported.config.scale_decoder_outputs  # T5 v1.1 layout
    assert not torch.equal(exported.lm_head.weight, exported.shared.weight)  # the head stayed its own
    moved = [(exported.state_dict()[k] - v).abs().max().item() for k, v in imported.state_dict().items()]
    assert 0 < max(moved) < 1.0  # the same model, trained from the imported weights
    assert json.loads((run / "eval.json").read_text())["n"] == 16
    # The export's tokenizer is the folder's own, as transformers loads it (T5's <eos> appended).
    text = "Solve 2*x = 4 for x."
    own = sentencepiece.SentencePieceProcessor(model_file=str(flan_folder / "spiece.model")).encode(text)
    assert AutoTokenizer.from_pretrained(run / "checkpoints" / "step_8" / "hf")(text).input_ids == [*own, 1]


@pytest.mark.parametrize("case", ["t5_folder_to_llama", "llama_folder_to_t5", "other_tokenizer", "tp",
                                  "packed_rows", "decoder_on_shards_without_sep"])
def test_bad_t5_input(case, flan_folder, flan_shards, dm_data, reference_run, tmp_path):
    hf_llama = reference_run / "checkpoints" / "step_8" / "hf"
    overrides, needles = {
        "t5_folder_to_llama": ((f"--model.from_pretrained={flan_folder}", f"--data.shards={dm_data['shards']}"),
                               ("holds a t5 model", "model.family=t5")),
        "llama_folder_to_t5": ((*T5, f"--model.from_pretrained={hf_llama}", f"--data.shards={dm_data['shards']}"),
                               ("holds a llama model", "model.family=llama")),
        "other_tokenizer": ((*T5, f"--model.from_pretrained={flan_folder}", f"--data.shards={dm_data['shards']}"),
                            ("tokenizer", "--tokenizer")),
        "tp": ((*T5, "--parallel.tp_degree=2", f"--data.shards={dm_data['shards']}"),
               ("tp_degree=2", "model.family=t5")),
        "packed_rows": ((*T5, "--data.sources.math.path=/nonexistent", "--eval.final_limit=0"),
                        ("model.family=t5", "data.sources")),
        "decoder_on_shards_without_sep": ((f"--data.shards={flan_shards}",), ("<sep>", "model.family=t5")),
    }[case]
    before = tree_digest(flan_folder)
    result = run_megatrain("train", SMOKE, "--nproc", 2, f"--run.dir={tmp_path / 'run'}", *overrides)
    assert_one_clear_line(result, *needles)
    assert not (tmp_path / "run").exists() and tree_digest(flan_folder) == before


SWITCH = ("--model.family=switch_t5", "--model.moe.num_experts=4")


@pytest.fixture(scope="session")
def switch_run(train_smoke, tmp_path_factory):
    """transformers' Switch Transformers from the config (one sparse layer of 4 experts in each stack), ZeRO-2 with the
    optimizer offloaded to the CPU, 2 ranks: the "with offload" of a Switch fine-tune."""
    run = tmp_path_factory.mktemp("switch") / "run"
    train_smoke(run, *SWITCH, "--parallel.offload_optimizer=true", "--eval.final_limit=0")
    return run


def test_switch_transformers_learns_with_zero2_offload_and_logs_router_losses(switch_run):
    got = losses(switch_run)
    assert got[8] < got[1] - 1.0, got
    for record in map(json.loads, (switch_run / "metrics.jsonl").read_text().splitlines()):
        # HF's loss holds its router z-loss and aux loss with the Switch defaults' coefficients.
        want = record["loss_part/lm"] + 0.001 * record["loss_part/z"] + 0.01 * record["loss_part/aux"]
        assert record["loss"] == pytest.approx(want, rel=1e-5) and record["loss_part/aux"] > 0


def test_switch_transformers_export_loads_and_continues(train_smoke, switch_run, tmp_path):
    """The checkpoint's hf/ is a SwitchTransformers folder; fine-tuning continues from it (as from a
    downloaded switch-base-8): its first loss is the trained model's, not a fresh one's."""
    folder = switch_run / "checkpoints" / "step_8" / "hf"
    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    assert type(model).__name__ == "SwitchTransformersForConditionalGeneration"
    assert len(model.encoder.block[1].layer[1].mlp.experts) == 4
    train_smoke(tmp_path / "run", *SWITCH, f"--model.from_pretrained={folder}", "--eval.final_limit=0",
                "--train.steps=2", "--optim.warmup_steps=1")
    assert losses(tmp_path / "run")[1] < losses(switch_run)[1] - 1.0


@pytest.mark.parametrize("overrides, needles", [
    (("--parallel.ep_degree=2",), ("ep_degree=2", "no expert parallelism")),
    (("--parallel.zero_stage=3",), ("zero_stage=2", "offload_optimizer")),
    (("--model.moe.every=1",), ("every=1", "router")),
])
def test_bad_switch_transformers_layouts(dm_data, tmp_path, overrides, needles):
    result = run_megatrain("train", SMOKE, "--nproc", 2, f"--run.dir={tmp_path / 'run'}",
                           f"--data.shards={dm_data['shards']}", *SWITCH, *overrides)
    assert_one_clear_line(result, *needles)
