"""Several DeepMind modules in one run: generated together, sharded per module, mixed in every
global batch, loss and exact match reported per module, loss curves and examples at the end."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import MODULES, SMOKE, run_megatrain
from megatrain.data.loader import QAOrder, QALoader
from megatrain.data.shards import ShardSet


def test_modules_generated_together_equal_each_generated_alone(mm_data, tmp_path):
    from data_tools.deepmind import generate_released

    alone = generate_released(tmp_path / "alone", MODULES[1], train=900, test=40, seed=5, progress=False)
    for split in ("train-easy", "train-medium", "train-hard", "interpolate"):
        together = (mm_data["released"] / split / f"{MODULES[1]}.txt").read_bytes()
        assert together == (alone / split / f"{MODULES[1]}.txt").read_bytes()


def test_each_shard_holds_one_module(mm_data):
    shards = ShardSet(mm_data["shards"])
    assert shards.source_names == MODULES
    manifest = shards.manifest
    assert [s["source"] for s in manifest["shards"]] == [MODULES[0]] * 2 + [MODULES[1]] * 2  # 900 = 512 + 388
    assert Counter(shards.block_source) == Counter({0: 8, 1: 8})
    assert sum(s["samples"] for s in manifest["shards"]) == manifest["samples"] == 1800


def test_every_global_batch_holds_each_module_in_proportion(mm_data):
    shards = ShardSet(mm_data["shards"])
    dp, micro, accumulation = 2, 4, 2
    global_batch = dp * micro * accumulation
    loaders = [QALoader(shards, 3, rank, dp, micro, max_seq_len=96, num_workers=0, global_batch_size=global_batch)
               for rank in range(dp)]
    epoch_steps = shards.num_samples // global_batch
    seen = Counter()
    for _ in range(epoch_steps):
        per_module = Counter()
        for _ in range(accumulation):
            for loader in loaders:
                batch = next(loader)
                per_module.update(batch["source"].tolist())
                for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
                    seen[tuple(row[mask.bool()].tolist())] += 1
        assert per_module == Counter({0: 8, 1: 8})  # equal-sized modules: half each, in every step
    assert sum(seen.values()) == epoch_steps * global_batch
    # Within an epoch no problem is read twice: (block, row) pairs of the first 1,792 indices are distinct.
    blocks, rows = QAOrder(shards, 3, global_batch).locate_many(np.arange(epoch_steps * global_batch))
    assert len(set(zip(blocks.tolist(), rows.tolist()))) == epoch_steps * global_batch


def test_module_order_is_the_same_for_any_worker_count_and_resumes(mm_data):
    shards = ShardSet(mm_data["shards"])
    args = dict(max_seq_len=96, global_batch_size=16)
    plain = QALoader(shards, 3, 1, 2, 4, num_workers=0, **args)
    first = [next(plain) for _ in range(6)]
    workers = QALoader(shards, 3, 1, 2, 4, num_workers=2, **args)
    with_workers = [next(workers) for _ in range(6)]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, with_workers) for k in a)
    resumed = QALoader(shards, 3, 1, 2, 4, num_workers=0, **args)
    resumed.load_state_dict(QALoader(shards, 3, 1, 2, 4, num_workers=0, **args).state_dict() |
                            {"consumed_samples": 3 * 8})
    after_resume = next(resumed)
    assert all(torch.equal(first[3][k], after_resume[k]) for k in first[3])
    other = QALoader(shards, 3, 1, 2, 4, num_workers=0, max_seq_len=96, global_batch_size=32)
    with pytest.raises(Exception, match="resume with the same train.global_batch_size"):
        other.load_state_dict(resumed.state_dict())


def test_a_run_reports_loss_and_exact_match_per_module(mm_data, deepspeed_ops, tmp_path):
    run = tmp_path / "run"
    result = run_megatrain("train", SMOKE, "--nproc", "2", f"--run.dir={run}", f"--data.shards={mm_data['shards']}",
                           f"--eval.released={mm_data['released']}", f"--eval.modules={','.join(MODULES)}",
                           "--train.steps=6", "--log.interval=3", "--eval.final_limit=8", "--eval.examples=2")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        parts = [record[f"loss/{m}"] for m in MODULES]
        assert all(np.isfinite(parts)) and min(parts) <= record["loss"] * 1.5
    final = json.loads((run / "eval.json").read_text())
    assert sorted(final["modules"]) == sorted(MODULES) and final["n"] == 16
    assert {len(final["examples"][m]) for m in MODULES} == {2}
    assert all({"question", "answer", "gold"} <= e.keys() for m in MODULES for e in final["examples"][m])
    out = result.stdout
    table = out[out.index("module"):]
    assert all(m in table for m in [*MODULES, "overall"]) and "gold:" in table
    assert json.loads(out.strip().splitlines()[-1])["n"] == 16  # the last line is still the JSON summary
    png = (run / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
