"""bf16 training with gradients accumulated and reduced in fp32 vs in bf16: the loss gap to fp32.

Trains the demo model (configs/math-mix.yaml: 3.3M-parameter Llama, ZeRO-2, 2 CPU ranks) for --steps
steps three times on the same data in the same order: fp32, bf16 with `parallel.fp32_grad_reduce=false`
(DeepSpeed's default: bf16 gradient sums), and bf16 with it true (megatrain's default, as Megatron-LM
and LLEMMA's GPT-NeoX config). micro_batch_size 8 under a global batch of 64 makes 4 accumulation steps
per rank, where bf16 sums lose the most.

    python bench/bf16_grad_reduce.py              # 50 steps each, ~3 min on 2 cores with native bf16

Needs a CPU with native bf16 (avx512_bf16 / AMX) or a GPU: emulated bf16 is ~350x slower. Prints
the mean and final |loss - fp32 loss| per bf16 variant and writes them as JSON under --work.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULES = "algebra__linear_1d,numbers__place_value,comparison__pair,numbers__round_number"


def data(work: Path) -> tuple[Path, Path]:
    """The demo's modules, fewer problems (the runs read 64 x steps of them)."""
    released, shards = work / "released", work / "shards"
    cli = [sys.executable, "-m", "data_tools.cli", "deepmind"]
    if not (shards / "manifest.json").exists():
        subprocess.run([*cli, "generate", "--module", MODULES, "--train", "6000", "--test", "20", "--seed", "1",
                        "--out", str(released)], check=True, cwd=REPO)
        subprocess.run([*cli, "shards", "--released", str(released), "--module", MODULES, "--out", str(shards)],
                       check=True, cwd=REPO)
    return released, shards


def train(work: Path, name: str, steps: int, released: Path, shards: Path, *overrides: str) -> dict[int, float]:
    run_dir = work / "runs" / name
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    subprocess.run([sys.executable, "-m", "megatrain", "train", "configs/math-mix.yaml", "--nproc", "2",
                    f"--run.dir={run_dir}", f"--data.shards={shards}", f"--eval.released={released}",
                    f"--train.steps={steps}", "--train.micro_batch_size=8", "--log.interval=1", "--log.progress=false",
                    "--eval.final_limit=0", f"--checkpoint.interval={steps}", f"--optim.warmup_steps={steps // 5}",
                    *overrides],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--work", type=Path, default=Path.home() / ".cache/megatrain-bench/bf16_grad_reduce")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    released, shards = data(args.work)
    fp32 = train(args.work, "fp32", args.steps, released, shards, "--precision=fp32")
    report = {"steps": args.steps, "micro_batch_size": 8, "global_batch_size": 64, "ranks": 2, "zero_stage": 2}
    for name, flag in (("bf16_grad_sums_in_bf16", "false"), ("bf16_grad_sums_in_fp32", "true")):
        bf16 = train(args.work, name, args.steps, released, shards, "--precision=bf16",
                     f"--parallel.fp32_grad_reduce={flag}")
        gaps = [abs(bf16[s] - fp32[s]) for s in sorted(fp32)]
        report[name] = {"mean_abs_gap": sum(gaps) / len(gaps), "final_abs_gap": gaps[-1],
                        "final_loss": bf16[max(bf16)]}
        print(f"{name}: mean |loss - fp32| {report[name]['mean_abs_gap']:.5f}, at step {args.steps} "
              f"{gaps[-1]:.5f} (fp32 {fp32[max(fp32)]:.4f}, bf16 {bf16[max(bf16)]:.4f})", flush=True)
    report["fp32_final_loss"] = fp32[max(fp32)]
    (args.work / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
