"""Pretraining on a real mixture with real DeepSpeed engines on gloo: build -> verify -> mix -> stream
-> train, elastic resume (2 ranks -> 1, 1 -> 2), a next data stage, and the bad-shard policies."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatrain.data.mixture import quotas
from conftest import REPO, losses, run_megatrain

CONFIG = REPO / "configs" / "mixture-smoke.yaml"
WEIGHTS = {"tex": 2, "html": 4, "coq": 1, "math": 1}


@pytest.fixture(scope="module")
def train_mix(mix_data, deepspeed_ops):
    def train(run_dir: Path, *overrides: str, nproc: int = 2, check: bool = True, datasets=None):
        paths = datasets or mix_data["datasets"]
        result = run_megatrain("train", CONFIG, "--nproc", nproc, f"--run.dir={run_dir}",
                               *(f"--data.sources.{n}.path={p}" for n, p in paths.items()), *overrides)
        if check:
            assert result.returncode == 0, result.stderr[-3000:]
        return result
    return train


def trainer_state(run_dir: Path) -> dict:
    ckpt = run_dir / "checkpoints"
    return json.loads((ckpt / (ckpt / "latest").read_text().strip() / "trainer.json").read_text())


def last_metrics(run_dir: Path) -> dict:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]


@pytest.fixture(scope="module")
def straight(train_mix, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mixruns") / "straight"
    train_mix(run_dir)
    return run_dir


def test_the_datasets_verify(mix_data):
    for path in mix_data["datasets"].values():
        result = subprocess.run([sys.executable, "-m", "data_tools.cli", "verify", str(path)], capture_output=True,
                                text=True, cwd=REPO)
        assert result.returncode == 0, result.stderr


def test_a_mixture_trains_and_counts_each_source(straight):
    loss = losses(straight)
    assert len(loss) == 8 and loss[8] < loss[1] - 0.5, loss
    data = trainer_state(straight)["data"]
    assert {n: c["samples"] for n, c in data["counters"].items()} == {n: 8 * q for n, q in quotas(WEIGHTS, 16).items()}
    record = last_metrics(straight)
    assert {k: v for k, v in record.items() if k.startswith("data/tokens/")} == \
        {f"data/tokens/{n}": c["tokens"] for n, c in data["counters"].items()}
    assert (straight / "checkpoints" / "step_8" / "hf" / "tokenizer.model").is_file()


def test_tensor_parallel_mixture_matches_tp1(train_mix, straight, tmp_path):
    """TP=2 on the packed mixture (attention reset, a vocabulary-split tied head): the same losses,
    per-source losses (vocabulary-parallel cross entropy) and token counters as TP=1."""
    run_dir = tmp_path / "tp2"
    train_mix(run_dir, "--parallel.tp_degree=2")
    got, want = losses(run_dir), losses(straight)
    assert got.keys() == want.keys() and all(abs(got[s] - want[s]) <= 1e-6 * abs(want[s]) for s in want)
    mine, theirs = last_metrics(run_dir), last_metrics(straight)
    for key in [k for k in theirs if k.startswith("loss/")]:
        assert abs(mine[key] - theirs[key]) <= 1e-5 * abs(theirs[key]), key
    assert {k: v for k, v in mine.items() if k.startswith("data/")} == \
        {k: v for k, v in theirs.items() if k.startswith("data/")}


# The resumed run reduces gradients over another number of ranks (an all-reduce vs accumulation),
# which changes the order of fp32 sums: differences are rounding-sized, far below a wrong batch.
LOSS_RTOL = 1e-5


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)], ids=["2-ranks-to-1", "1-rank-to-2"])
def test_elastic_resume_continues_the_same_global_sequence(train_mix, straight, tmp_path, first, second):
    run_dir = tmp_path / "elastic"
    train_mix(run_dir, "--train.exit_interval=4", nproc=first)
    train_mix(run_dir, "--resume", nproc=second)
    expected, got = losses(straight), losses(run_dir)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(expected[step], rel=LOSS_RTOL), step
    assert trainer_state(run_dir)["data"]["counters"] == trainer_state(straight)["data"]["counters"]


def test_a_next_data_stage_changes_weights_and_the_counters_continue(train_mix, straight, tmp_path):
    run_dir = tmp_path / "staged"
    shutil.copytree(straight, run_dir)
    train_mix(run_dir, "--resume", "--train.steps=12", "--data.sources.coq.weight=4", "--data.sources.html.weight=2")
    data = trainer_state(run_dir)["data"]
    assert [s["start_sample"] for s in data["stages"]] == [0, 8 * 16]
    new = quotas({"tex": 2, "html": 2, "coq": 4, "math": 1}, 16)
    old = quotas(WEIGHTS, 16)
    assert {n: c["samples"] for n, c in data["counters"].items()} == {n: 8 * old[n] + 4 * new[n] for n in WEIGHTS}
    before = trainer_state(straight)["data"]["counters"]
    assert all(data["counters"][n]["tokens"] > before[n]["tokens"] for n in WEIGHTS)


def corrupt_copy(mix_data, tmp_path) -> tuple[dict, str]:
    """The mixture with one of tex's shards (pari-doc: several shards) flipped in a copy."""
    datasets = dict(mix_data["datasets"])
    broken = tmp_path / "tex"
    shutil.copytree(datasets["tex"], broken)
    shard = sorted(broken.glob("shard-*.tar"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    datasets["tex"] = broken
    return datasets, shard.name


def test_a_corrupt_shard_stops_the_run_naming_it(train_mix, mix_data, tmp_path):
    datasets, shard = corrupt_copy(mix_data, tmp_path)
    result = train_mix(tmp_path / "run", datasets=datasets, check=False)
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and f"shard {shard} of data.sources.tex" in error[0]
    assert "sha256 mismatch (expected " in error[0] and "on_bad_shard=skip" in error[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_skip_policy_leaves_a_corrupt_shard_out_and_counts_it(train_mix, mix_data, tmp_path):
    datasets, shard = corrupt_copy(mix_data, tmp_path)
    run_dir = tmp_path / "run"
    result = train_mix(run_dir, "--data.on_bad_shard=skip", "--train.steps=2", datasets=datasets)
    assert f"tex/{shard}" in result.stdout + result.stderr
    assert last_metrics(run_dir)["data/skipped_shards"] == 1
