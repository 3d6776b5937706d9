"""Soak: the tiny recipe for a while, checkpointing every few steps with keep_last 2 and eval on.

Runs `megatrain train configs/cpu-smoke.yaml --nproc 2` on generated DeepMind problems and samples,
every few seconds, each rank's resident memory (RSS) and open file descriptors and the run folder's
disk use. After --minutes it sends SIGTERM (the run stops at a step boundary with a checkpoint) and
reports, after the warm-up: each rank's RSS range and its drift per 10 minutes (least squares), the
descriptor range, the largest disk use and the number of checkpoint folders ever seen at once.
Writes the samples and the summary to <work>/soak.json.

    python bench/soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--warmup-minutes", type=float, default=2.0, help="left out of the drift figures")
    p.add_argument("--checkpoint-interval", type=int, default=5)
    p.add_argument("--eval-interval", type=int, default=100)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    p.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "megatrain-bench" / "soak")
    return p.parse_args(argv)


def dataset(work: Path) -> tuple[Path, Path]:
    """1200 algebra__linear_1d problems and their Q/A shards, as the tests make them (cached)."""
    from data_tools.deepmind import generate_released
    from data_tools.shards import build_qa_shards
    from data_tools.tokenizer import train_tokenizer
    from megatrain.data.released import TRAIN_SPLITS, read_split

    released, shards = work / "released", work / "shards"
    if not (shards / "manifest.json").is_file():
        generate_released(released, "algebra__linear_1d", train=1200, test=64, seed=3, progress=False)
        pairs = read_split(released, "algebra__linear_1d", TRAIN_SPLITS)
        tokenizer = train_tokenizer((t for pair in pairs for t in pair), work / "tok", vocab_size=512)
        build_qa_shards(pairs, tokenizer, shards, samples_per_shard=512, block_size=128)
    return released, shards


def disk_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except FileNotFoundError:  # a checkpoint pruned while walking
                pass
    return total


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    released, shards = dataset(args.work)
    run = args.work / "run"
    shutil.rmtree(run, ignore_errors=True)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "megatrain", "train", str(REPO / "configs" / "cpu-smoke.yaml"), "--nproc", "2",
         f"--run.dir={run}", f"--data.shards={shards}", f"--eval.released={released}", "--train.steps=100000000",
         f"--checkpoint.interval={args.checkpoint_interval}", "--checkpoint.keep_last=2",
         f"--eval.interval={args.eval_interval}", "--eval.limit=16", "--log.interval=10",
         f"--data.num_workers={args.workers}"],
        # stderr to a file: a pipe nobody reads fills up over a long run and blocks the ranks.
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(args.work / "stderr.log", "w"), start_new_session=True)
    samples, t0 = [], time.monotonic()
    while time.monotonic() - t0 < args.minutes * 60:
        time.sleep(args.every)
        if launcher.poll() is not None:
            raise SystemExit(f"the run ended early ({launcher.returncode}): see {args.work / 'stderr.log'}")
        ranks = {}
        for child in psutil.Process(launcher.pid).children():
            try:
                ranks[int(child.environ()["RANK"])] = (child.memory_info().rss, child.num_fds(),
                                                      len(child.children()))
            except (psutil.Error, KeyError):
                pass
        ckpts = run / "checkpoints"
        folders = len([p for p in ckpts.glob("*step_*") if p.is_dir()]) if ckpts.is_dir() else 0
        metrics = run / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        step = json.loads(lines[-1])["step"] if lines else 0
        samples.append({"t": time.monotonic() - t0, "step": step, "disk": disk_bytes(run), "checkpoint_folders": folders,
                        **{f"rank{r}_{k}": v for r, values in ranks.items()
                           for k, v in zip(("rss", "fds", "workers"), values)}})
    os.killpg(launcher.pid, signal.SIGTERM)
    launcher.wait(timeout=120)
    warm = [s for s in samples if s["t"] >= args.warmup_minutes * 60 and "rank1_rss" in s]
    summary = {"minutes": args.minutes, "steps": samples[-1]["step"], "stop_exit_code": launcher.returncode,
               "checkpoint_interval": args.checkpoint_interval, "keep_last": 2,
               "max_disk_mib": max(s["disk"] for s in samples) / 2**20,
               "max_checkpoint_folders": max(s["checkpoint_folders"] for s in samples)}
    t = np.array([s["t"] for s in warm]) / 60
    for r in (0, 1):
        rss = np.array([s[f"rank{r}_rss"] for s in warm]) / 2**20
        fds = [s[f"rank{r}_fds"] for s in warm]
        summary[f"rank{r}"] = {"rss_mib": [round(rss.min(), 1), round(rss.max(), 1)],
                               "rss_drift_mib_per_10_min": round(float(np.polyfit(t, rss, 1)[0]) * 10, 2),
                               "fds": [min(fds), max(fds)]}
    (args.work / "soak.json").write_text(json.dumps({"summary": summary, "samples": samples}, indent=1))
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
