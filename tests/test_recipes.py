"""Every recipe in configs/ has a tiny twin that trains here, on 2 CPU ranks, and whose per-step fp32
losses are stored in tests/reference_losses/ (a regression guard, as torchtitan keeps its loss curves).

A twin is its recipe with the sizes made small and the data made local (tiny_twin below): the same
model family, objective (continued pretraining from a folder, from scratch on packed rows, or
question -> answer), ZeRO stage, offload, activation checkpointing and fp32 gradient sums; TP and EP
capped at the 2 ranks there are; fp32 so that the losses can be stored. A recipe that stops parsing,
or a change that moves a trajectory, fails here.

Regenerate the stored losses after a change that is meant to move them (and say why in the commit):

    MEGATRAIN_REGENERATE_LOSSES=1 python -m pytest tests/test_recipes.py

Tolerance: rel 1e-3 per step. The same twin on this machine gives the same losses run after run
(fp32, fixed seeds, one rank order); another CPU's matmul kernels sum in another order (~1e-7
relative per product), which 4 Adam steps carry to ~1e-5, and an MoE router's top-1 can flip on a
near-tie. A change of substance (init, LR schedule, loss normalisation, data order) moves some step by
more than 1e-2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from conftest import REPO, losses, run_megatrain

REFERENCE = Path(__file__).parent / "reference_losses"
REGENERATE = os.environ.get("MEGATRAIN_REGENERATE_LOSSES") == "1"
STEPS = 4

# recipe -> the data its twin trains on: "qa" (question/answer shards) or "packed" (a pretraining mixture)
RECIPES = {
    "llemma-7b": "packed",
    "llemma-34b": "packed",
    "switch-moe-decoder": "packed",
    "tinystories": "packed",
    "tinystories-1layer": "packed",
    "tinystories-lstm": "packed",
    "cybersolve-flan-t5-large": "qa",
    "switch-base-8": "qa",
}


def test_every_recipe_has_a_twin():
    seeds = {p.stem for p in (REPO / "configs").glob("*.yaml")} - {"cpu-smoke", "mixture-smoke", "math-mix"}
    assert seeds == set(RECIPES), "a recipe in configs/ without a tiny twin here (or a twin without its recipe)"


@pytest.fixture(scope="session")
def packed_data(dm_data, tmp_path_factory):
    """A packed pretraining dataset built by `megatrain-data build`'s code from the test's DeepMind problems."""
    from data_tools.build import build_dataset
    from data_tools.sources import parse_source

    out = tmp_path_factory.mktemp("packed") / "math"
    build_dataset([parse_source(f"math=deepmind:{dm_data['released']}#module=algebra__linear_1d")],
                  dm_data["shards"] / "tokenizer.model", out, seq_len=128, rows_per_block=16, workers=1,
                  shard_mb=0.25, progress=False)
    return out


def pretrained_folder(family_name: str, tokenizer_path: Path, out: Path) -> Path:
    """A small model of the family saved as a Hugging Face folder, with the data's token ids: what a recipe's
    model.from_pretrained holds (Code Llama, FLAN-T5, switch-base-8), at test size."""
    import torch

    from megatrain.config import ModelConfig, MoEConfig
    from megatrain.data.tokenizer import Tokenizer
    from megatrain.model import TokenIds, family

    tok = Tokenizer(tokenizer_path)
    ids = TokenIds(tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id)
    cfg = ModelConfig(family=family_name, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                      max_seq_len=128, tie_embeddings=False, moe=MoEConfig(num_experts=4, every=2))
    torch.manual_seed(0)
    family(family_name).build(cfg, ids).save_pretrained(out)
    return out


def tiny_twin(recipe: str, data: dict, tmp: Path) -> Path:
    """The recipe at test size, as a YAML file next to its run folder."""
    cfg = yaml.safe_load((REPO / "configs" / f"{recipe}.yaml").read_text())
    model, parallel = cfg["model"], cfg.get("parallel", {})
    if model.get("from_pretrained"):
        model["from_pretrained"] = str(pretrained_folder(model["family"], data["tokenizer"], tmp / "pretrained"))
    model.update(hidden_size=64, num_layers=min(model.get("num_layers", 2), 2), num_heads=4, num_kv_heads=0,
                 intermediate_size=128, max_seq_len=96 if data["kind"] == "qa" else 128, attention="auto")
    if "moe" in model:
        model["moe"].update(num_experts=4, every=min(model["moe"].get("every", 2), 2))
    if data["kind"] == "qa":
        cfg["data"] = {"shards": str(data["shards"]), "num_workers": 0}
        cfg["eval"] = {"released": str(data["released"]), "modules": ["algebra__linear_1d"], "interval": 0,
                       "limit": 8, "final_limit": 8, "batch_size": 8, "max_new_tokens": 8}
    else:  # the recipe's source names and weights, each on the local dataset
        cfg["data"] = {**cfg["data"], "num_workers": 0, "mixture_window": 16,  # 128 rows: every source gets some
                       "sources": {name: {"path": str(data["packed"]), "weight": src["weight"]}
                                   for name, src in cfg["data"]["sources"].items()}}
    cfg["train"].update(steps=STEPS, micro_batch_size=2, global_batch_size=8, exit_interval=0)
    cfg["optim"].update(warmup_steps=1)
    parallel.update(tp_degree=min(parallel.get("tp_degree", 1), 2), ep_degree=min(parallel.get("ep_degree", 1), 2))
    cfg["parallel"] = parallel
    cfg["precision"] = "fp32"
    cfg["checkpoint"] = {"interval": STEPS, "keep_last": 1}
    cfg["log"] = {"interval": 1, "progress": False}
    cfg["run"] = {"dir": str(tmp / "run"), "seed": 7}
    path = tmp / f"{recipe}-twin.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_the_tiny_twin_trains_and_keeps_its_stored_losses(recipe, dm_data, packed_data, deepspeed_ops, tmp_path):
    data = {"kind": RECIPES[recipe], "shards": dm_data["shards"], "released": dm_data["released"],
            "packed": packed_data, "tokenizer": dm_data["shards"] / "tokenizer.model"}
    twin = tiny_twin(recipe, data, tmp_path)
    result = run_megatrain("train", twin, "--nproc", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    got = losses(tmp_path / "run")
    assert sorted(got) == list(range(1, STEPS + 1))
    # Finite and positive (a random switch-base-8 folder starts high: HF's init gives its untied head unit-scale rows).
    assert all(0 < v < 100 for v in got.values()), got
    assert (tmp_path / "run" / "checkpoints" / f"step_{STEPS}" / "hf" / "config.json").is_file()
    stored = REFERENCE / f"{recipe}.json"
    if REGENERATE:
        REFERENCE.mkdir(exist_ok=True)
        stored.write_text(json.dumps({"recipe": f"configs/{recipe}.yaml", "steps": STEPS,
                                      "losses": [got[s] for s in range(1, STEPS + 1)]}, indent=1) + "\n")
    want = json.loads(stored.read_text())["losses"]
    assert [got[s] for s in range(1, STEPS + 1)] == pytest.approx(want, rel=1e-3), \
        f"{recipe}'s twin moved from tests/reference_losses/{stored.name}; if meant, regenerate (module docstring)"
