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
    python bench/zero_memory.py --precision bf16 --ranks 2 --bf16-grad-sums bf16   # without fp32 gradient sums

Printed: a table per precision of the largest rank's MiB and its ratio to ZeRO-0 TP-1 on the same
number of ranks. Goals: ZeRO-3 on 2 ranks <= 0.55; TP=2 x ZeRO-1 on 4 ranks <= 0.30.

Save and eval peaks (`--phases`): ZeRO-3, TP 1, on 2 and 4 ranks. Each rank measures, per phase, its
peak resident memory (VmHWM from /proc/self/status, reset before the phase through /proc/self/clear_refs
after gc and malloc_trim: every byte the process touched, tensors, DeepSpeed's buffers and the interpreter
alike) and its peak gathered parameter bytes (ZeRO-3 parameters whole on this rank, summed at every
module's forward and inside every gather of the export: deterministic). Phases, in the training loop's
order, after a first step that creates the optimizer state:
    train           one training step (forward, backward, optimizer step): the reference
    eval            evaluate() on the sharded model (megatrain/eval/qa.py)
    deepspeed_save  DeepSpeed's save_checkpoint      } a checkpoint: `save` is the larger of the two
    hf_export       the streamed HF export (megatrain/export.py)
and, for comparison, what megatrain did before: the HF export and the eval inside one gather of the whole
model (`*_whole_gather`). The workers run with MALLOC_MMAP_THRESHOLD_ fixed at 1 MiB, so that freed
tensors leave the RSS. ZeRO-3's live-parameter cap and the export's shard size are scaled to the model
as they stand to a 34B one (phase_worker says how), or a small model would not show what a large one does.

    python bench/zero_memory.py --phases --hidden 1024 --layers 8   # 100M parameters, fp32, 2 and 4 ranks (~2.5 min)
    python bench/zero_memory.py --phases --json --ranks 2 --hidden 64 --layers 2   # the tests' size

Goal: save and eval peaks <= 1.1 x the training step's, on every rank.

bf16 note: megatrain refuses bf16 at ZeRO-0 for training (DeepSpeed's stage-0 bf16 optimizer steps
once at start, config.validate), but its memory is the honest baseline for the bf16 ratios, so the
bench builds that one engine without the check.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatrain.config import load_config  # noqa: E402
from megatrain.launch.local import rank_env  # noqa: E402
from megatrain.parallel import host  # noqa: E402
from megatrain.parallel.dims import free_port, init_world, shutdown  # noqa: E402  (before deepspeed loads)


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
    from megatrain import objective
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
        f"--parallel.zero_stage={args.zero}", f"--parallel.tp_degree={args.tp}", f"--precision={args.precision}",
        f"--parallel.fp32_grad_reduce={str(args.bf16_grad_sums == 'fp32').lower()}"])
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
    logits = llama.forward(engine, b).logits
    split_vocab = parallelize.vocab_parallel(engine.module)
    engine.backward(objective.token_loss(logits, b["labels"], llama.task, split_vocab).mean())
    used = live_tensor_bytes()
    engine.step()
    everyone = host.all_gather_object(used)
    if world.is_main:
        print(json.dumps({"bytes": everyone, "params": n_params}), flush=True)
    shutdown()


def peak_rss() -> int:
    """This process's resident-memory high-water mark since the last reset_peak_rss(), in bytes."""
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := the current RSS


def gathered_bytes(params: list) -> int:
    """Bytes of the ZeRO-3 parameters whole on this rank now (gathered, or small enough to stay whole)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return sum(p.ds_numel * p.element_size() for p in params if p.ds_status == ZeroParamStatus.AVAILABLE)


def phase_worker(args: argparse.Namespace) -> None:
    """One rank of --phases: peak RSS and gathered bytes of a training step, a save and an eval."""
    from megatrain.config import load_config
    from megatrain.data.tokenizer import Tokenizer
    from megatrain.eval.qa import evaluate
    from megatrain.export import export_hf
    from megatrain.model import TokenIds, family
    from megatrain.optim import build_optimizer, build_scheduler
    from megatrain.parallel import parallelize
    from megatrain.parallel.zero import deepspeed_config, gathered_params
    from megatrain.train import train_step

    import deepspeed
    deepspeed.utils.logger.setLevel("ERROR")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    cfg = load_config(None, [
        f"--model.hidden_size={args.hidden}", f"--model.num_layers={args.layers}", "--model.num_heads=8",
        f"--model.intermediate_size={args.hidden * 8 // 3 // 64 * 64}", "--model.max_seq_len=64",
        "--train.micro_batch_size=1", "--train.steps=10", "--optim.warmup_steps=1",
        "--parallel.zero_stage=3", f"--precision={args.precision}"])
    world = init_world(1)
    tokenizer = Tokenizer(Path(args.tokenizer))
    torch.manual_seed(0)
    # The tokenizer's vocabulary (generated ids must decode): the embedding is a small share, as in large models.
    llama = family("llama")
    ids = TokenIds(tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
    model = parallelize.parallelize(llama.build(cfg.model, ids), llama, cfg, world.dims, world.rank)
    optimizer = build_optimizer(llama.param_groups(model, cfg.optim.weight_decay), cfg)
    # megatrain's DeepSpeed JSON, with ZeRO-3's cap on gathered parameters scaled to this model as
    # DeepSpeed's default (1e9 elements) stands to a 34B Llama: 1.5 of its 48 layers. At this size the
    # default would keep the whole model gathered through every forward, training and eval alike.
    ds = deepspeed_config(cfg, world.dims)
    live = int(1.5 * sum(p.numel() for p in model.model.layers[0].parameters()))
    ds["zero_optimization"].update(stage3_max_live_parameters=live, stage3_max_reuse_distance=live)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=build_scheduler(optimizer, cfg),
                                      config=ds)
    del model, optimizer
    params = list(engine.module.parameters())
    peak = {"gathered": 0}

    def sample(*_):
        peak["gathered"] = max(peak["gathered"], gathered_bytes(params))

    for module in engine.module.modules():  # after DeepSpeed's own pre-hooks, which fetch the module
        module.register_forward_pre_hook(sample)
    tokens = torch.randint(3, tokenizer.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": tokens, "labels": tokens.clone(), "attention_mask": torch.ones_like(tokens),
             "real_tokens": torch.tensor([32])}
    train_step(engine, [dict(batch)], 1, llama)  # the optimizer state exists from the first step on
    problems = [("m", f"What is {i} plus {i + 1}?", str(2 * i + 1)) for i in range(4 * world.world_size)]
    folder = Path(args.scratch)

    def deepspeed_save():
        engine.save_checkpoint(str(folder), tag="ds", save_latest=False)

    # Rank 0's shard buffer, scaled as the live-parameter cap above: export.SHARD_BYTES (5 GB) is 7.4% of a
    # 34B model's 68 GB of bf16. (With 5 GB here, rank 0 would buffer this whole small model on its host.)
    shard_bytes = int(sum(p.ds_numel * p.element_size() for p in params) * 5 / 68)

    def export_streamed():
        export_hf(engine, llama, folder / "streamed", world, None, max_shard_bytes=shard_bytes, on_gathered=sample)

    def export_whole():  # megatrain before: the whole model gathered on every rank, rank 0 saves it
        with gathered_params(engine.module):
            sample()
            if world.is_main:
                engine.module.save_pretrained(folder / "whole")

    def eval_sharded():
        evaluate(engine.module, tokenizer, problems, world, 4, 8, 64)

    def eval_whole():
        with gathered_params(engine.module):
            sample()
            evaluate(engine.module, tokenizer, problems, world, 4, 8, 64)
            # ZeRO-3 prefetched parameters during those forwards; the gather cannot end with them in flight.
            engine.optimizer.checkpoint_event_prologue()
        engine.optimizer.checkpoint_event_epilogue()

    # The training loop's order: an eval, then a checkpoint (DeepSpeed's files, then hf/) at the same step.
    phases = {"train": lambda: train_step(engine, [dict(batch)], 1, llama), "eval": eval_sharded,
              "deepspeed_save": deepspeed_save, "hf_export": export_streamed,
              "hf_export_whole_gather": export_whole, "eval_whole_gather": eval_whole}
    trim = ctypes.CDLL("libc.so.6").malloc_trim
    result = {}
    for name, run in phases.items():  # the whole-model gathers last: nothing they leave behind counts
        host.barrier()
        gc.collect()
        trim(0)  # what glibc kept of freed memory goes back, so the high-water mark starts at what is alive
        reset_peak_rss()
        peak["gathered"] = 0
        run()
        result[name] = {"rss": peak_rss(), "gathered": peak["gathered"]}
        host.barrier()
        if world.is_main:
            for tag in ("ds", "streamed", "whole"):
                shutil.rmtree(folder / tag, ignore_errors=True)
    everyone = host.all_gather_object(result)
    if world.is_main:
        n_params = sum(p.ds_numel for p in params)
        print(json.dumps({"ranks": everyone, "params": n_params}), flush=True)
    shutdown()


def measure_phases(args: argparse.Namespace, ranks: int, tokenizer: Path, scratch: Path) -> dict:
    """Start `ranks` local processes of phase_worker; the per-rank figures rank 0 gathered."""
    port = free_port()
    argv = [sys.executable, __file__, "--phase-worker", f"--precision={args.precision}", f"--hidden={args.hidden}",
            f"--layers={args.layers}", f"--vocab={args.vocab}", f"--tokenizer={tokenizer}", f"--scratch={scratch}"]
    env = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**rank_env(r, ranks, port, threads_per_rank=1), **env}) for r in range(ranks)]
    outs = [p.communicate(timeout=1800) for p in procs]
    if any(p.returncode for p in procs):
        err = next(o[1] for p, o in zip(procs, outs) if p.returncode)
        raise SystemExit(f"--phases on {ranks} ranks failed:\n{err[-3000:]}")
    return json.loads(outs[0][0].strip().splitlines()[-1])


def phases_main(args: argparse.Namespace) -> None:
    """The --phases table (or JSON): per phase, the largest rank's peaks and their ratio to the training step's."""
    from data_tools.tokenizer import train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="zero_memory-"))
    try:
        texts = [f"What is {i} plus {i + 1}? {2 * i + 1}" for i in range(2000)]
        tokenizer = train_tokenizer(texts, work / "tok", vocab_size=320)
        rows = []
        for ranks in args.ranks:
            result = measure_phases(args, ranks, tokenizer, work / f"ckpt{ranks}")
            per_rank = result["ranks"]
            for r in per_rank:  # a checkpoint is both: its peak is the larger one
                r["save"] = {k: max(r["deepspeed_save"][k], r["hf_export"][k]) for k in ("rss", "gathered")}
            for phase in ("train", "eval", "deepspeed_save", "hf_export", "save", "hf_export_whole_gather",
                          "eval_whole_gather"):
                others = [r[phase] for r in per_rank[1:]]
                row = {"ranks": ranks, "phase": phase, "params": result["params"],
                       "rss_rank0": per_rank[0][phase]["rss"], "rss_others": max(o["rss"] for o in others),
                       "gathered": max(r[phase]["gathered"] for r in per_rank)}
                row["rss_ratio_rank0"] = row["rss_rank0"] / per_rank[0]["train"]["rss"]
                row["rss_ratio_others"] = row["rss_others"] / max(r["train"]["rss"] for r in per_rank[1:])
                row["gathered_ratio"] = row["gathered"] / max(r["train"]["gathered"] for r in per_rank)
                rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(rows))
        return
    import deepspeed
    print(f"Llama hidden {args.hidden}, {args.layers} layers, vocab 320, {rows[0]['params'] / 1e6:.1f}M "
          f"parameters, {args.precision}, ZeRO-3; torch {torch.__version__}, deepspeed {deepspeed.__version__}; "
          "the largest rank's peaks per phase")
    print("\n| ranks | phase | peak RSS MiB, rank 0 | ratio to train | peak RSS MiB, other ranks | ratio to train "
          "| gathered params MiB | ratio to train |\n|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['ranks']} | {r['phase']} | {r['rss_rank0'] / 2**20:.0f} | {r['rss_ratio_rank0']:.3f} | "
              f"{r['rss_others'] / 2**20:.0f} | {r['rss_ratio_others']:.3f} | {r['gathered'] / 2**20:.1f} | "
              f"{r['gathered_ratio']:.3f} |", flush=True)


def measure(args: argparse.Namespace, ranks: int, zero: int, tp: int, precision: str) -> dict:
    """Start `ranks` local processes for one layout; the per-rank bytes rank 0 gathered."""
    port = free_port()
    argv = [sys.executable, __file__, "--worker", f"--zero={zero}", f"--tp={tp}", f"--precision={precision}",
            f"--bf16-grad-sums={args.bf16_grad_sums}", f"--hidden={args.hidden}", f"--layers={args.layers}", f"--vocab={args.vocab}",
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
    p.add_argument("--bf16-grad-sums", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 runs: accumulate and reduce gradients in fp32 (parallel.fp32_grad_reduce, the "
                        "default) or in bf16, to see what the fp32 sums cost")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--untied", action="store_true",
                   help="separate input embedding and LM head (AutoTP then splits only the head)")
    p.add_argument("--phases", action="store_true",
                   help="ZeRO-3 peaks of a save and an eval against a training step's (see the docstring)")
    p.add_argument("--json", action="store_true", help="--phases: print the rows as JSON")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--phase-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", default="", help=argparse.SUPPRESS)
    p.add_argument("--scratch", default="", help=argparse.SUPPRESS)
    p.add_argument("--zero", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.phase_worker:
        return phase_worker(args)
    if args.phases:
        if args.precision == "both":
            args.precision = "fp32"
        return phases_main(args)
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
