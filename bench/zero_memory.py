"""Per-rank training-state memory under ZeRO 0/1/2/3 x tensor parallelism 1/2, on 2 and 4 ranks.

Each layout trains one step of the same Llama through megatrain's own path (family build,
parallelize, optimizer, derived DeepSpeed JSON, engine) on local gloo ranks. Then every rank sums
the bytes of the tensors alive in its process: every `torch.Tensor` the garbage collector knows,
counted once per storage. That is parameters, gradients, fp32 master copies, optimizer state and
DeepSpeed's flat buffers, measured, not from formulas. It is taken after the second step's
backward, before its optimizer step: gradients are complete and optimizer state exists. The
activations are freed by then and the one synthetic batch is a few KB.

    python bench/zero_memory.py                     # fp32 and bf16, 2 and 4 ranks (~5 min on 2 cores)
    python bench/zero_memory.py --precision bf16 --ranks 2

Printed: a table per precision of the largest rank's MiB and its ratio to ZeRO-0 TP-1 on the same
number of ranks. Goals: ZeRO-3 on 2 ranks <= 0.55; TP=2 x ZeRO-1 on 4 ranks <= 0.30.

bf16 note: megatrain refuses bf16 at ZeRO-0 for training (DeepSpeed's stage-0 bf16 optimizer steps
once at start, config.validate), but its memory is the honest baseline for the bf16 ratios, so the
bench builds that one engine without the check.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatrain.config import load_config  # noqa: E402
from megatrain.launch.local import rank_env  # noqa: E402
from megatrain.parallel.dims import free_port, init_world  # noqa: E402  (before deepspeed loads)


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive in this process (views and aliases counted once)."""
    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor):
                continue
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001  (objects that fail isinstance or have no storage: meta, sparse)
            continue
        if storage.data_ptr():
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def worker(args: argparse.Namespace) -> None:
    """One rank: build the engine for (zero, tp, precision), train a step, report live bytes."""
    from megatrain.model import TokenIds, family
    from megatrain.optim import build_optimizer, build_scheduler
    from megatrain.parallel import parallelize
    from megatrain.parallel.zero import wrap
    from megatrain.train import train_step

    import deepspeed
    deepspeed.utils.logger.setLevel("ERROR")
    cfg = load_config(None, [
        f"--model.hidden_size={args.hidden}", f"--model.num_layers={args.layers}", "--model.num_heads=8",
        f"--model.intermediate_size={args.hidden * 8 // 3 // 64 * 64}", "--model.max_seq_len=32",
        f"--model.tie_embeddings={str(not args.untied).lower()}", "--train.micro_batch_size=1", "--train.steps=10", "--optim.warmup_steps=1",
        f"--parallel.zero_stage={args.zero}", f"--parallel.tp_degree={args.tp}", f"--precision={args.precision}"])
    world = init_world(args.tp)
    torch.manual_seed(0)
    llama, ids = family("llama"), TokenIds(args.vocab, 0, 1, 2)
    parallelize.check(cfg, llama, ids.vocab_size, world.dims)
    model = parallelize.parallelize(llama.build(cfg.model, ids), llama, cfg, world.dims, world.rank)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(llama.param_groups(model, cfg.optim.weight_decay), cfg)
    engine = wrap(model, optimizer, build_scheduler(optimizer, cfg), cfg, world.dims)
    del model, optimizer
    tokens = torch.randint(3, args.vocab, (1, 32), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": tokens, "labels": tokens.clone(), "attention_mask": torch.ones_like(tokens),
             "real_tokens": torch.tensor([32])}
    train_step(engine, [batch], 1, llama)  # the optimizer state exists from the first step on
    # The second step's gradients are complete (reduced, partitioned) after its backward and freed by
    # its step, so that is where parameters, gradients and optimizer state are all alive.
    b = {k: v for k, v in batch.items() if k != "real_tokens"}
    engine.backward(llama.forward(engine, b).loss)
    used = live_tensor_bytes()
    engine.step()
    everyone = [None] * world.world_size
    torch.distributed.all_gather_object(everyone, used)
    if world.is_main:
        print(json.dumps({"bytes": everyone, "params": n_params}), flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def measure(args: argparse.Namespace, ranks: int, zero: int, tp: int, precision: str) -> dict:
    """Start `ranks` local processes for one layout; the per-rank bytes rank 0 gathered."""
    port = free_port()
    argv = [sys.executable, __file__, "--worker", f"--zero={zero}", f"--tp={tp}", f"--precision={precision}",
            f"--hidden={args.hidden}", f"--layers={args.layers}", f"--vocab={args.vocab}",
            *(["--untied"] if args.untied else [])]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=rank_env(r, ranks, port, threads_per_rank=1)) for r in range(ranks)]
    outs = [p.communicate(timeout=600) for p in procs]
    if any(p.returncode for p in procs):
        err = next(o[1] for p, o in zip(procs, outs) if p.returncode)
        raise SystemExit(f"ZeRO-{zero} TP-{tp} {precision} on {ranks} ranks failed:\n{err[-3000:]}")
    return json.loads(outs[0][0].strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--untied", action="store_true",
                   help="separate input embedding and LM head (AutoTP then splits only the head)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--zero", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    precisions = ("fp32", "bf16") if args.precision == "both" else (args.precision,)
    import deepspeed
    print(f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab} "
          f"({'untied' if args.untied else 'tied'} embeddings); torch {torch.__version__}, "
          f"deepspeed {deepspeed.__version__}; per-rank live tensor bytes after the second backward")
    for precision in precisions:
        print(f"\n{precision}\n| ranks | ZeRO | TP | max MiB/rank | ratio to ZeRO-0 TP-1 |\n|---:|---:|---:|---:|---:|")
        for ranks in args.ranks:
            base = None
            for tp in (1, 2):
                for zero in (0, 1, 2, 3):
                    result = measure(args, ranks, zero, tp, precision)
                    worst = max(result["bytes"])
                    base = base or worst
                    print(f"| {ranks} | {zero} | {tp} | {worst / 2**20:.1f} | {worst / base:.3f} |", flush=True)


if __name__ == "__main__":
    main()
