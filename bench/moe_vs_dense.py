"""A Switch MoE against a dense decoder with the same active FLOPs per token: loss at equal steps and
at equal wall time (the Switch Transformer paper's claim, Fedus et al. 2021, fig. 1, at small scale).

Both are trained by megatrain's own setup and train_step (one rank, ZeRO-1, fp32) on the same packed
DeepMind-mathematics dataset in the same order. The MoE model is the dense one with every
`--every`-th feed-forward replaced by `--experts` experts of the dense feed-forward's size behind a
top-1 router, so a token's matmuls are the dense model's plus the router's (hidden x experts). The
runs alternate in blocks of steps in one process pair, so a change in the machine's load hits both.

    python bench/moe_vs_dense.py                 # 400 steps each, about 5 minutes on 2 cores
    python bench/moe_vs_dense.py --steps 2000 --experts 16

Prints a table (params, active FLOPs per token, ms/step, held-out loss at equal steps and at equal time)
and writes it, with the curves, as JSON next to the data (--work, default ~/.cache/megatrain-bench/moe_vs_dense).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

HELDOUT_BATCHES = 16  # held-out micro-batches scored after every block of steps


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=344, help="intermediate size of the dense MLP and of each expert")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--every", type=int, default=2, help="an MoE layer every N-th layer")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--problems", type=int, default=20000,
                   help="DeepMind problems per module to train on (and a tenth of it held out)")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "megatrain-bench" / "moe_vs_dense")
    p.add_argument("--worker", choices=("dense", "moe"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


MODULES = ("algebra__linear_1d", "arithmetic__add_or_sub", "numbers__gcd")


def dataset(args: argparse.Namespace) -> tuple[Path, Path]:
    """Generated DeepMind problems of a few modules, packed into rows of --seq tokens: the training set
    (train splits) and a held-out set (interpolate split) that both models are scored on. Cached."""
    from data_tools.build import build_dataset
    from data_tools.deepmind import generate_released
    from data_tools.sources import parse_source
    from data_tools.tokenizer import train_tokenizer_on_sources

    root = args.work / f"dm-{args.problems}-{args.seq}"
    train, heldout = root / "packed", root / "heldout"
    if (heldout / "manifest.json").is_file():
        return train, heldout
    if not (root / "released").is_dir():
        generate_released(root / "released", list(MODULES), train=args.problems, test=args.problems // 10, seed=11,
                          progress=False)
    specs = {split: [parse_source(f"{m}=deepmind:{root / 'released'}#module={m}&splits={split}") for m in MODULES]
             for split in ("train-easy,train-medium,train-hard", "interpolate")}
    train_specs, heldout_specs = specs.values()
    tokenizer = train_tokenizer_on_sources(train_specs, root / "tokenizer", vocab_size=1024, max_sentences=50_000)
    for specs_, out in ((train_specs, train), (heldout_specs, heldout)):
        build_dataset(specs_, tokenizer, out, seq_len=args.seq, rows_per_block=64, workers=1, shard_mb=4,
                      progress=False)
    return train, heldout


def config(args: argparse.Namespace, kind: str, data: Path, run_dir: Path):
    from megatrain.config import load_config

    model = {"family": "llama" if kind == "dense" else "moe", "hidden_size": args.hidden, "num_layers": args.layers,
             "num_heads": args.heads, "intermediate_size": args.ffn, "max_seq_len": args.seq}
    if kind == "moe":
        model["moe"] = {"num_experts": args.experts, "every": args.every, "expert_intermediate_size": args.ffn}
    return load_config(None, {
        "run": {"dir": str(run_dir), "seed": 5}, "model": model,
        "data": {"sources": {"math": {"path": str(data)}}, "num_workers": 0, "verify": False},
        "train": {"steps": args.steps, "micro_batch_size": args.micro_batch},
        "optim": {"lr": args.lr, "warmup_steps": min(50, args.steps)},
        "parallel": {"zero_stage": 1}, "precision": "fp32",
        "checkpoint": {"interval": 0}, "eval": {"interval": 0, "final_limit": 0},
        "log": {"interval": 10**9, "tensorboard": False, "progress": False}})


def worker(args: argparse.Namespace) -> None:
    """One model: train --steps steps when told to on stdin, a block at a time; report each step's
    training loss and time, and the held-out loss after the block (not timed)."""
    from megatrain import objective
    from megatrain.data.training_data import open_data
    from megatrain.model import num_params
    from megatrain.train import fetch, setup, train_step

    run_dir = args.work / "runs" / args.worker
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    train, heldout = dataset(args)
    s = setup(config(args, args.worker, train, run_dir), resume=False)
    heldout_loader = open_data(config(args, args.worker, heldout, run_dir)).loader(s.world, s.plan)
    heldout_batches = [next(heldout_loader) for _ in range(HELDOUT_BATCHES)]
    heldout_loader.close()

    @torch.no_grad()
    def heldout_loss() -> float:
        s.engine.module.eval()
        total = 0.0
        for batch in heldout_batches:
            batch = {k: v for k, v in batch.items() if k not in ("real_tokens", "source")}
            token_loss = objective.token_loss(s.family.forward(s.engine, batch).logits, batch["labels"],
                                              s.family.task, split_vocab=False)
            total += float(token_loss.sum() / objective.label_counts(batch["labels"], s.family.task).sum())
        s.engine.module.train()
        return total / len(heldout_batches)

    model = s.engine.module
    report({"params": num_params(model, exclude_embeddings=False),
            "flops_per_token": s.family.flops_per_token(s.cfg.model, model)})
    for line in sys.stdin:
        block = []
        for _ in range(int(line)):
            t0 = time.perf_counter()
            batches, _ = fetch(s.loader, s.plan.accumulation)
            result = train_step(s.engine, batches, len(s.loader.source_names), s.family)
            block.append([result.lm_loss_sum / result.label_tokens, time.perf_counter() - t0])
        report({"steps": block, "heldout": heldout_loss()})


REPORT = "@@ "  # the trainer prints lines of its own (the precision line) on stdout


def report(obj) -> None:
    print(REPORT + json.dumps(obj), flush=True)


def received(worker: subprocess.Popen):
    for line in worker.stdout:
        if line.startswith(REPORT):
            return json.loads(line[len(REPORT):])
    raise RuntimeError(f"a bench worker exited with code {worker.wait()}; its stderr says why")


def loss_at(heldout: list[tuple[float, float]], seconds: float) -> float:
    """Held-out loss at the last evaluation done by `seconds` of training time."""
    return [loss for t, loss in heldout if t <= seconds][-1]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    dataset(args)  # built here, before the workers start, so neither times it
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count()), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1"}
    workers, info, curves, heldout = {}, {}, {}, {}
    for port, kind in enumerate(("dense", "moe")):
        workers[kind] = subprocess.Popen([sys.executable, __file__, *(argv or sys.argv[1:]), "--worker", kind],
                                         env={**env, "MASTER_PORT": str(29650 + port)}, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
        info[kind] = received(workers[kind])
        curves[kind], heldout[kind] = [], []
    block = 20
    for start in range(0, args.steps, block):
        for kind in (("dense", "moe") if start // block % 2 == 0 else ("moe", "dense")):
            workers[kind].stdin.write(f"{min(block, args.steps - start)}\n")
            workers[kind].stdin.flush()
            clock = curves[kind][-1][1] if curves[kind] else 0.0
            done = received(workers[kind])
            for loss, seconds in done["steps"]:
                clock += seconds
                curves[kind].append((loss, clock))
            heldout[kind].append((clock, done["heldout"]))
    for w in workers.values():
        w.stdin.close()
        w.wait()
    equal_time = min(curves[k][-1][1] for k in curves)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "date": time.strftime("%Y-%m-%d")}
    print(f"held-out loss (interpolate split), after {args.steps} steps and after {equal_time:.0f} s of training:")
    print(f"{'model':6} {'params':>9} {'GFLOP/token':>11} {'ms/step':>8} {f'@{args.steps} steps':>12} "
          f"{f'@{equal_time:.0f} s':>8}")
    for kind, curve in curves.items():
        row = {"params": info[kind]["params"], "gflops_per_token": info[kind]["flops_per_token"] / 1e9,
               "ms_per_step": 1000 * curve[-1][1] / len(curve),
               "loss_at_equal_steps": loss_at(heldout[kind], float("inf")),
               "loss_at_equal_time": loss_at(heldout[kind], equal_time),
               "heldout": [(round(t, 2), round(loss, 4)) for t, loss in heldout[kind]],
               "train_losses": [round(loss, 4) for loss, _ in curve]}
        result[kind] = row
        print(f"{kind:6} {row['params']:>9,} {row['gflops_per_token']:>11.4f} {row['ms_per_step']:>8.1f} "
              f"{row['loss_at_equal_steps']:>12.4f} {row['loss_at_equal_time']:>8.4f}")
    (args.work / "result.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
