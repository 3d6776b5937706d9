"""Peers: megatrain's training step against transformers' Trainer (DeepSpeed) and a plain DDP loop.

One run, three trainers, the same Llama, the same token batches, the same number of steps, on
`--nproc` CPU ranks over gloo (the script launches its own ranks):

1. megatrain: its DeepSpeed engine built as bench/trainer_overhead.py builds it (family build,
   build_optimizer, build_scheduler, parallel.zero.wrap) and stepped by megatrain.train.train_step.
2. trainer: transformers' `Trainer` with its DeepSpeed integration, `TrainingArguments(deepspeed=...)`
   given the very DeepSpeed JSON megatrain derives (parallel.zero.deepspeed_config: same ZeRO stage,
   buckets, micro batch, accumulation, clipping, precision); its own AdamW (`adamw_torch_fused`, the
   same lr, betas, eps and weight decay; the same decay groups: matrices decayed, norms not); megatrain's
   LR schedule (create_scheduler overridden, so the LR agrees step for step; its cost is the same).
3. ddp: a plain PyTorch loop, torch.nn.parallel.DistributedDataParallel over gloo, torch's fused
   AdamW on megatrain's param groups and schedule, clip_grad_norm_ at the same threshold
   (trainer_overhead.PlainTrainer with its model wrapped in DDP).

How the comparison is kept fair:

- Same FLOPs per step: one model, built once with the seed and copied (load_state_dict) into the
  other two before any wrapping, so the initial weights are identical; every side trains on rank r's
  same list of pre-built (micro batch x seq) token batches, step i on batch i (nothing cycles), with
  the same accumulation. The loss normalisation is each side's own (megatrain: its objective on the
  logits; Trainer and DDP: transformers' loss from `labels`); it does not change the FLOPs.
- The KV cache is off on all three sides (megatrain passes use_cache=False; the other two models get
  config.use_cache=False), so none of them copies keys and values into a cache it never reads.
- The Trainer's data: a torch Dataset of the same rows, read in order (`_get_train_sampler` returns a
  SequentialSampler, so no shuffling; accelerate shards batch i*nproc + r to rank r, which is checked
  against rank r's megatrain batches before training), `dataloader_num_workers=0`. Extra work is
  switched off: `report_to=[]`, `save_strategy="no"`, `eval_strategy="no"`, `logging_steps` past the
  end, `disable_tqdm=True`, `average_tokens_across_devices=False` (no all-gather of token counts),
  `logging_nan_inf_filter=False` (no isnan check of each loss), `dataloader_pin_memory=False`.
- Timing excludes startup for all sides. The Trainer is timed from outside by a TrainerCallback, from
  on_step_begin to on_step_end (forward, backward, DeepSpeed's reduce and step, scheduler, zero_grad,
  the Trainer's bookkeeping); megatrain and DDP are timed around each call of their step function,
  which also takes its batches. The Trainer fetches and collates its batches before on_step_begin:
  that time is not in its headline figure; its step_end-to-step_end time, which includes it, is
  printed beside it.
- Load drift: the sides run in alternating blocks inside one process-group lifetime. The Trainer
  drives (one `trainer.train()` call); before the first step of each of its blocks, its callback runs
  the megatrain and DDP blocks scheduled before it. After `--warmup` untimed steps per side, each of
  `--rounds` rounds runs `--steps` timed steps per side, in the order megatrain, ddp, trainer on even
  rounds and the reverse on odd ones. A side's figure: tokens per optimizer step (micro batch x seq x
  accumulation x ranks) / the median of its timed steps.

bf16: megatrain and the Trainer run DeepSpeed's bf16 (bf16 weights, fp32 master weights and
optimizer state; megatrain's JSON also accumulates and reduces gradients in fp32). The DDP loop keeps
the same recipe by hand (PlainTrainer's "master": bf16 model, fp32 master copy stepped by AdamW),
but DDP all-reduces the bf16 gradients (half the bytes).

Two things stock transformers 5.25 / accelerate 1.16 refuse on a CPU-only machine, worked around in
bookkeeping only: accelerate finds no backend for DeepSpeed on CPU and reports one process on every rank
(ranks_for_accelerate sets the process group's size and rank, handed to the Trainer through
`accelerator_config={"use_configured_state": True}`); and TrainingArguments refuses bf16 without a GPU
unless `use_cpu`, which would turn DeepSpeed off (that one check is bypassed while the arguments are
built; DeepSpeed's CPU accelerator runs bf16).

    python bench/peers.py                                   # fp32, ZeRO-2, hidden 256, 4 layers
    python bench/peers.py --zero-stage 1 --precision bf16

The last line printed is `peers: megatrain X tok/s, trainer Y tok/s, ddp Z tok/s, ratio_trainer A,
ratio_ddp B` (ratios of tokens/s, megatrain over the peer). Goals: ratio_trainer >= 1.0 and
ratio_ddp >= 0.98. CPU only (gloo, DS_ACCELERATOR=cpu).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed

# Run from a checkout without `pip install -e .`; bench/ for trainer_overhead's helpers.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from megatrain.config import validate  # noqa: E402
from megatrain.launch.local import rank_env  # noqa: E402
from megatrain.model import TokenIds, family, num_params  # noqa: E402
from megatrain.optim import build_optimizer, build_scheduler  # noqa: E402
from megatrain.parallel import host  # noqa: E402
from megatrain.parallel.dims import free_port, init_world, shutdown  # noqa: E402
from megatrain.parallel.zero import deepspeed_config, wrap  # noqa: E402
from megatrain.train import train_step  # noqa: E402
from trainer_overhead import BOS_ID, EOS_ID, PAD_ID, Batches, PlainTrainer, build_config, synthetic_batches  # noqa: E402

SIDES = ("megatrain", "ddp", "trainer")
GOAL_TRAINER, GOAL_DDP = 1.0, 0.98
REPORT_ENV = "MEGATRAIN_PEERS_REPORT"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=2)
    p.add_argument("--nproc", type=int, default=2, help="ranks (processes) to launch")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per side per round")
    p.add_argument("--rounds", type=int, default=4, help="rounds; the order of the sides flips every round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side before the first round")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=688, help="intermediate (MLP) size")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation (micro batches per optimizer step)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--grad-clip", type=float, default=None, help="default: megatrain's train.grad_clip")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


# ---------------------------------------------------------------- launcher (no RANK in the environment)

def launch(argv: list[str], args: argparse.Namespace) -> int:
    """Start args.nproc ranks of this script (the environment megatrain.launch.local gives them); print
    rank 0's report once all have ended. The ranks' own output (warnings) goes to stderr."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        report = Path(tmp) / "report.json"
        procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv],
                                  env={**rank_env(rank, args.nproc, port), REPORT_ENV: str(report)},
                                  stdout=sys.stderr)
                 for rank in range(args.nproc)]
        code = 0
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed:  # the others would wait for it in a collective
                code = failed[0]
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                break
            time.sleep(0.2)
        for p in procs:
            p.wait()
            code = code or p.returncode
        if code or not report.exists():
            print(f"peers: a rank failed (exit code {code})", file=sys.stderr)
            return code or 1
        result = json.loads(report.read_text())
    print(result["text"])
    print(result["line"])
    return 0


# ---------------------------------------------------------------- ranks

def rank_batches(args: argparse.Namespace, rank: int, count: int) -> list[dict[str, torch.Tensor]]:
    """Rank `rank`'s `count` distinct micro batches (trainer_overhead's synthetic batches, seeded per rank)."""
    return synthetic_batches(argparse.Namespace(**{**vars(args), "seed": args.seed + 1000 * rank,
                                                   "num_batches": count}))


class Rows(torch.utils.data.Dataset):
    """The Trainer's dataset: the rows of every rank's micro batches, micro batch i of rank r at batch
    index i * nproc + r, which accelerate's BatchSamplerShard hands to rank r as its i-th batch."""

    def __init__(self, per_rank: list[list[dict[str, torch.Tensor]]]):
        self.rows = [{"input_ids": ids, "labels": ids, "attention_mask": mask}
                     for i in range(len(per_rank[0])) for batches in per_rank
                     for ids, mask in zip(batches[i]["input_ids"], batches[i]["attention_mask"])]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def ddp_step(plain: PlainTrainer, loader: Batches, accum: int) -> float:
    """PlainTrainer.step on a DDP model: accumulation under no_sync, the last micro batch all-reduces."""
    total = 0.0
    for i in range(accum):
        batch = {k: v.to(plain.device) for k, v in next(loader).items() if k != "real_tokens"}
        sync = i == accum - 1
        with contextlib.nullcontext() if sync else plain.model.no_sync():
            loss = plain.model(**batch).loss / accum
            loss.backward()
        total += loss.item()
    plain.apply_gradients()
    return total


def schedule(args: argparse.Namespace) -> list[tuple[str, int, bool]]:
    """(side, steps, timed) blocks in the order they run."""
    blocks = [(side, args.warmup, False) for side in SIDES if args.warmup]
    for r in range(args.rounds):
        blocks += [(side, args.steps, True) for side in (SIDES if r % 2 == 0 else SIDES[::-1])]
    return blocks


def build_trainer(model, cfg, dims, args, per_rank, total_steps: int, on_trainer_step, out_dir: str):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class PeerTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(self.train_dataset if train_dataset is None else train_dataset)

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = build_scheduler(optimizer if optimizer is not None else self.optimizer, cfg)
            return self.lr_scheduler

    class Clock(TrainerCallback):
        """Per-step wall time from outside the Trainer; runs the other sides' blocks before its own."""

        def __init__(self):
            self.begin, self.last_end, self.others_ran = 0.0, None, False
            self.step_s, self.cycle_s = [], []  # (step index, seconds)

        def on_step_begin(self, a, state, control, **kw):
            self.others_ran = on_trainer_step(state.global_step)
            self.begin = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            now, step = time.perf_counter(), state.global_step - 1
            self.step_s.append((step, now - self.begin))
            if self.last_end is not None and not self.others_ran:
                self.cycle_s.append((step, now - self.last_end))
            self.last_end = now

    o = cfg.optim
    ranks_for_accelerate()
    # transformers refuses bf16 without a GPU unless use_cpu, and use_cpu turns DeepSpeed off; DeepSpeed's
    # CPU accelerator runs bf16, so that check alone is bypassed while the arguments are built.
    bf16_check = mock.patch("transformers.training_args.is_torch_bf16_gpu_available", return_value=True)
    with bf16_check if cfg.precision == "bf16" else contextlib.nullcontext():
        targs = TrainingArguments(
            output_dir=out_dir, deepspeed=deepspeed_config(cfg, dims),
            per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=args.accum,
            max_steps=total_steps, learning_rate=o.lr, weight_decay=o.weight_decay, adam_beta1=o.beta1,
            adam_beta2=o.beta2, adam_epsilon=o.eps, optim="adamw_torch_fused",
            max_grad_norm=cfg.train.grad_clip, bf16=cfg.precision == "bf16", seed=args.seed,
            report_to=[], save_strategy="no", eval_strategy="no", logging_strategy="steps",
            logging_steps=total_steps + 1, disable_tqdm=True, dataloader_num_workers=0,
            average_tokens_across_devices=False, logging_nan_inf_filter=False, dataloader_pin_memory=False,
            log_level="warning", log_level_replica="error", accelerator_config={"use_configured_state": True})
    assert (targs.world_size, targs.process_index) == (dims.world_size, torch.distributed.get_rank())
    clock = Clock()
    trainer = PeerTrainer(model=model, args=targs, train_dataset=Rows(per_rank), callbacks=[clock])
    return trainer, clock


def ranks_for_accelerate() -> None:
    """Make accelerate's process state (which the Trainer then uses: `use_configured_state`) see the process
    group DeepSpeed runs in. accelerate 1.16 has no CPU DeepSpeed path: on a CPU-only torch PartialState
    finds no accelerator backend, so with DeepSpeed it reports one process (rank 0 on every rank) while
    DeepSpeed runs on all of them; the Trainer's DeepSpeed batch check then fails (train_batch_size) and its
    data loader would not shard. Only that bookkeeping is set here, what PartialState fills in when it has
    a backend; no work is added to or removed from any step."""
    from accelerate.state import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # as TrainingArguments._setup_devices does
    try:
        PartialState()
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    PartialState._shared_state.update(num_processes=torch.distributed.get_world_size(),
                                      process_index=torch.distributed.get_rank(),
                                      local_process_index=int(os.environ.get("LOCAL_RANK", 0)),
                                      backend=torch.distributed.get_backend())


def check_trainer_batches(trainer, mine: list[dict[str, torch.Tensor]], n: int = 2) -> bool:
    """Whether the Trainer's first n batches on this rank are this rank's megatrain batches."""
    it = iter(trainer.get_train_dataloader())
    return all(torch.equal(next(it)["input_ids"].cpu(), mine[i]["input_ids"]) for i in range(n))


def run_rank(args: argparse.Namespace) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    world = init_world()
    total_steps = args.warmup + args.rounds * args.steps
    cfg = build_config(args, total_steps)
    if args.accum > 1:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, global_batch_size=args.micro_batch * args.accum * world.world_size))
    dims = validate(cfg, world.world_size)
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)

    torch.manual_seed(cfg.run.seed)
    llama, ids = family("llama"), TokenIds(args.vocab, PAD_ID, BOS_ID, EOS_ID)
    model = llama.build(cfg.model, ids, world.device_type)
    peers = {}
    for side in ("trainer", "ddp"):  # identical initial weights, taken before any wrapping
        peers[side] = llama.build(cfg.model, ids, world.device_type)
        peers[side].load_state_dict(model.state_dict())
        peers[side].config.use_cache = False  # as megatrain's forward (ModelFamily.inputs)
    n_params = num_params(model, exclude_embeddings=False)

    per_rank = [rank_batches(args, r, total_steps * args.accum) for r in range(world.world_size)]
    mine = per_rank[world.rank]

    optimizer = build_optimizer(llama.param_groups(model, cfg.optim.weight_decay), cfg)
    engine = wrap(model, optimizer, build_scheduler(optimizer, cfg), cfg, dims)
    mt_loader = Batches(mine)

    plain = PlainTrainer(peers["ddp"], cfg, mine, engine.device, "master")
    plain.model = torch.nn.parallel.DistributedDataParallel(plain.model)  # after the bf16 cast: its buckets' dtype
    ddp_loader = Batches(mine)

    times: dict[str, list[float]] = {s: [] for s in SIDES}  # timed steps, seconds
    losses: dict[str, list[float]] = {s: [] for s in SIDES}
    steppers = {
        "megatrain": lambda: train_step(engine, [next(mt_loader) for _ in range(args.accum)], 1, llama).loss,
        "ddp": lambda: ddp_step(plain, ddp_loader, args.accum),
    }

    def run_block(side: str, n: int, timed: bool) -> None:
        for _ in range(n):
            start = time.perf_counter()
            losses[side].append(steppers[side]())
            if timed:
                times[side].append(time.perf_counter() - start)

    # Which trainer steps start a block, and the other sides' blocks that run just before each.
    blocks = schedule(args)
    before: dict[int, list[tuple[str, int, bool]]] = {}
    pending, trainer_step = [], 0
    timed_trainer_steps: set[int] = set()
    for side, n, timed in blocks:
        if side != "trainer":
            pending.append((side, n, timed))
            continue
        before[trainer_step], pending = pending, []
        if timed:
            timed_trainer_steps.update(range(trainer_step, trainer_step + n))
        trainer_step += n
    after = pending

    def on_trainer_step(step: int) -> bool:
        todo = before.pop(step, [])
        for block in todo:
            run_block(*block)
        return bool(todo)

    with tempfile.TemporaryDirectory(prefix="peers-trainer-") as out_dir:
        trainer, clock = build_trainer(peers["trainer"], cfg, dims, args, per_rank, total_steps, on_trainer_step,
                                       out_dir)
        same_batches = check_trainer_batches(trainer, mine)
        out = trainer.train()
    for block in after:
        run_block(*block)
    times["trainer"] = [s for step, s in clock.step_s if step in timed_trainer_steps]
    cycle = [s for step, s in clock.cycle_s if step in timed_trainer_steps]
    trainer_mean_loss = out.training_loss

    agree = all(host.all_gather_object(same_batches))  # host-side, as every vote (megatrain/parallel/host.py)
    if world.is_main:
        write_report(args, cfg, n_params, times, losses, trainer_mean_loss, cycle, agree,
                     total_steps, world.world_size, deepspeed.__version__)
    shutdown()


def write_report(args, cfg, n_params, times, losses, trainer_mean_loss, cycle, same_batches, total_steps,
                 nproc, ds_version) -> None:
    import transformers

    tokens_per_step = args.micro_batch * args.seq * args.accum * nproc
    median = {s: statistics.median(times[s]) for s in SIDES}
    tok_s = {s: tokens_per_step / median[s] for s in SIDES}
    ratio_trainer, ratio_ddp = tok_s["megatrain"] / tok_s["trainer"], tok_s["megatrain"] / tok_s["ddp"]
    lines = [
        f"model: llama {n_params / 1e6:.2f}M params (hidden {args.hidden}, {args.layers} layers, heads {args.heads}, "
        f"ffn {args.ffn}, vocab {args.vocab}); {nproc} ranks x micro batch {args.micro_batch} x seq {args.seq} x "
        f"accumulation {args.accum} = {tokens_per_step} tokens/step",
        f"precision {cfg.precision}, ZeRO-{cfg.parallel.zero_stage}, grad_clip {cfg.train.grad_clip}, "
        f"{args.rounds} rounds x {args.steps} timed steps per side (+{args.warmup} warmup), torch threads per rank "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}, "
        f"deepspeed {ds_version}, transformers {transformers.__version__}",
        f"Trainer batches on every rank = megatrain's: {'yes' if same_batches else 'NO'}",
        "ms/step per timed step:",
    ]
    for s in SIDES:
        lines.append(f"  {s:<10} " + " ".join(f"{t * 1e3:7.0f}" for t in times[s]))
    lines += ["| side      | median ms/step | min ms/step | tokens/s | mean loss (rank 0, all steps) |",
              "|-----------|---------------:|------------:|---------:|------------------------------:|"]
    mean_loss = {"megatrain": statistics.fmean(losses["megatrain"]), "ddp": statistics.fmean(losses["ddp"]),
                 "trainer": trainer_mean_loss}
    for s in SIDES:
        lines.append(f"| {s:<9} | {median[s] * 1e3:14.1f} | {min(times[s]) * 1e3:11.1f} | {tok_s[s]:8.0f} | "
                     f"{mean_loss[s]:29.6f} |")
    if cycle:
        c = statistics.median(cycle)
        lines.append(f"trainer step_end to step_end (with its batch fetch): median {c * 1e3:.1f} ms/step, "
                     f"{tokens_per_step / c:.0f} tokens/s")

    def verdict(ratio: float, goal: float) -> str:
        return f"{ratio:.3f} (goal >= {goal}: {'met' if ratio >= goal else 'MISSED'})"

    lines.append(f"megatrain / trainer: {verdict(ratio_trainer, GOAL_TRAINER)}; "
                 f"megatrain / ddp: {verdict(ratio_ddp, GOAL_DDP)}")
    line = (f"peers: megatrain {tok_s['megatrain']:.0f} tok/s, trainer {tok_s['trainer']:.0f} tok/s, "
            f"ddp {tok_s['ddp']:.0f} tok/s, ratio_trainer {ratio_trainer:.3f}, ratio_ddp {ratio_ddp:.3f}")
    if REPORT_ENV in os.environ:  # launched by launch()
        Path(os.environ[REPORT_ENV]).write_text(json.dumps({"text": "\n".join(lines), "line": line}))
    else:  # ranks started by another launcher (torchrun)
        print("\n".join(lines) + "\n" + line, flush=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if "RANK" not in os.environ:
        return launch(argv, args)
    run_rank(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
