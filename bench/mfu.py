"""Model FLOPs utilisation of a ~1B Llama at sequence length 4096 in bf16, on GPUs.

megatrain's own path (family build, parallelize, optimizer, derived DeepSpeed JSON, engine,
train_step) trains synthetic batches; tokens/s and MFU = FLOPs/token x tokens/s / peak, with the
peak from metrics.PEAK_BF16_FLOPS (datasheet dense bf16). Rows: activation checkpointing off and
on; TP=1 on one GPU, and TP=2 where two GPUs exist (each layout started as local ranks).

    python bench/mfu.py                 # every row this machine can run
    python bench/mfu.py --steps 20 --layers 16
    python bench/mfu.py --flash-sdpa --json rows.json   # SDPA's flash kernel or fail; rows as JSON too

Goal: >= 55 % MFU on H100/H200. Without a GPU it says so and exits 0 (CI has none).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatrain.config import load_config  # noqa: E402
from megatrain.launch.local import rank_env  # noqa: E402
from megatrain.parallel.dims import free_port, init_world, shutdown  # noqa: E402  (before deepspeed loads)


def worker(args: argparse.Namespace) -> None:
    import deepspeed

    from megatrain.metrics import peak_flops
    from megatrain.model import TokenIds, family
    from megatrain.optim import build_optimizer, build_scheduler
    from megatrain.parallel import parallelize
    from megatrain.parallel.zero import wrap
    from megatrain.train import train_step

    deepspeed.utils.logger.setLevel("ERROR")
    cfg = load_config(None, [
        f"--model.hidden_size={args.hidden}", f"--model.num_layers={args.layers}", f"--model.num_heads={args.heads}",
        f"--model.num_kv_heads={args.kv_heads}", f"--model.intermediate_size={args.ffn}",
        f"--model.max_seq_len={args.seq}", "--model.attention=auto", "--model.tie_embeddings=false",
        f"--train.micro_batch_size={args.micro_batch}", f"--train.steps={args.warmup + args.steps}",
        "--optim.warmup_steps=1", "--parallel.zero_stage=1", f"--parallel.tp_degree={args.tp}",
        f"--parallel.activation_checkpointing={str(args.ac).lower()}", "--precision=bf16"])
    world = init_world(args.tp)
    llama, ids = family("llama"), TokenIds(args.vocab, 0, 1, 2)
    parallelize.check(cfg, llama, ids.vocab_size, world.dims)
    model = parallelize.parallelize(llama.build(cfg.model, ids, world.device_type), llama, cfg, world.dims, world.rank)
    flops_per_token = llama.flops_per_token(cfg.model, model)
    optimizer = build_optimizer(llama.param_groups(model, cfg.optim.weight_decay), cfg)
    engine = wrap(model, optimizer, build_scheduler(optimizer, cfg), cfg, world.dims)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, args.vocab, (args.micro_batch, args.seq), generator=g)

    def batch():
        return {"input_ids": tokens, "labels": tokens, "real_tokens": torch.full((args.micro_batch,), args.seq)}

    for _ in range(args.warmup):
        train_step(engine, [batch()], 1, llama)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(engine, [batch()], 1, llama)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    # Ranks of a TP group train on the same tokens: the model's tokens/s is one DP replica's.
    tokens_per_s = args.steps * args.micro_batch * args.seq / elapsed
    peak = peak_flops("cuda", "bf16")
    mfu = flops_per_token * tokens_per_s / (peak * world.world_size) if peak else None
    if world.is_main:
        print(json.dumps({"tokens_per_s": tokens_per_s, "mfu": mfu, "device": torch.cuda.get_device_name(),
                          "attention": model.config._attn_implementation, "ms_per_step": elapsed / args.steps * 1e3,
                          "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}), flush=True)
    shutdown()


def run(args: argparse.Namespace, tp: int, ac: bool) -> dict:
    port = free_port()
    argv = [sys.executable, __file__, "--worker", f"--tp={tp}", *(["--ac"] if ac else []),
            *(["--flash-sdpa"] if args.flash_sdpa else []),
            *(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
              if k in ("hidden", "layers", "heads", "kv_heads", "ffn", "seq", "vocab", "micro_batch", "steps",
                       "warmup"))]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=rank_env(r, tp, port)) for r in range(tp)]
    outs = [p.communicate() for p in procs]
    if any(p.returncode for p in procs):
        err = next(o[1] for p, o in zip(procs, outs) if p.returncode)
        return {"error": err.strip().splitlines()[-1] if err.strip() else "failed"}
    return json.loads(outs[0][0].strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--flash-sdpa", action="store_true",
                   help="run inside sdpa_kernel(FLASH_ATTENTION): an SDPA call that cannot take the flash kernel fails")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows to PATH as a JSON list")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--ac", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        if args.flash_sdpa:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                worker(args)
        else:
            worker(args)
        return 0
    if not torch.cuda.is_available():
        print("bench/mfu.py measures GPU MFU; this machine has no CUDA device, so there is nothing to measure.")
        return 0
    gpus = torch.cuda.device_count()
    print(f"Llama hidden {args.hidden}, {args.layers} layers, ffn {args.ffn}, vocab {args.vocab}, seq {args.seq}, "
          f"micro batch {args.micro_batch}, bf16, ZeRO-1; {gpus} x {torch.cuda.get_device_name()}, torch "
          f"{torch.__version__}")
    print("| TP | activation checkpointing | attention | tokens/s | ms/step | MFU | peak GiB |\n|---:|---|---|---:|---:|---:|---:|")
    rows = []
    for tp in [t for t in (1, 2) if t <= gpus]:
        for ac in (False, True):
            r = run(args, tp, ac)
            rows.append({"tp": tp, "activation_checkpointing": ac, "flash_sdpa": args.flash_sdpa, **r})
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
            if "error" in r:
                print(f"| {tp} | {'on' if ac else 'off'} | | failed: {r['error'][:120]} | | | |")
                continue
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (device not in the peak table)"
            print(f"| {tp} | {'on' if ac else 'off'} | {r['attention']} | {r['tokens_per_s']:.0f} | "
                  f"{r['ms_per_step']:.0f} | {mfu} | {r['peak_mem_gib']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
