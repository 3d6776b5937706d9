"""Trainer overhead: megatrain's training step (DeepSpeed engine) against a plain PyTorch loop.

Both sides train the same model (identical initial weights) on the same fixed list of synthetic
batches with the same AdamW hyper-parameters, param groups, LR schedule and gradient clipping. They
are timed in alternating blocks in one process (which side goes first flips every round), so a
change in the machine's load hits both; each side's time is the median over rounds.

    python bench/trainer_overhead.py                       # fp32, ZeRO-2
    python bench/trainer_overhead.py --zero-stage 0 --precision bf16

The last line printed is `overhead ratio: X.XX` (median megatrain ms/step / median plain ms/step).
Goal: <= 1.05. Each side's peak memory is reported too (CUDA: the allocator's peak; CPU: the peak
resident set, reset per block after returning freed heap to the system).

    python bench/trainer_overhead.py --per-source --vocab 32000 --seq 1024 --micro-batch 4

compares megatrain's step with per-source loss metrics (two sources) against the same step without
(`per-source ratio: X.XX`: the median of the rounds' time ratios, and the peak memory ratio); goal <= 1.02
for both.

bf16: DeepSpeed runs forward/backward in bf16 and keeps fp32 master weights and optimizer state.
`--plain-bf16 master` (default) gives the plain loop the same recipe by hand (bf16 model, fp32
master copy stepped by AdamW, copied back); `--plain-bf16 pure` steps AdamW on the bf16 weights,
cheaper and numerically different.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import statistics
import sys
import time
from pathlib import Path

# Run from a checkout without `pip install -e .`; with it, this is the same folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatrain.config import load_config, validate  # noqa: E402
from megatrain.model import TokenIds, family, num_params  # noqa: E402
from megatrain.optim import build_optimizer, build_scheduler  # noqa: E402
from megatrain.parallel.dims import init_world  # noqa: E402  (sets DS_ACCELERATOR before deepspeed loads)
from megatrain.parallel.zero import wrap  # noqa: E402
from megatrain.train import train_step  # noqa: E402

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=2)
    p.add_argument("--steps", type=int, default=20, help="timed steps per side per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side before the first round")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=688, help="intermediate (MLP) size")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--grad-clip", type=float, default=None, help="default: megatrain's train.grad_clip")
    p.add_argument("--num-batches", type=int, default=4, help="distinct synthetic batches, cycled")
    p.add_argument("--plain-bf16", choices=("master", "pure"), default="master")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--per-source", action="store_true",
                   help="megatrain with per-source metrics against megatrain without, instead of the plain loop")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads; 0 keeps torch's default. On a machine whose cores are busy "
                        "with other jobs, 1 avoids timing OpenMP threads waiting for descheduled peers")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace, total_steps: int):
    overrides = [
        f"--model.hidden_size={args.hidden}", f"--model.num_layers={args.layers}",
        f"--model.num_heads={args.heads}", f"--model.intermediate_size={args.ffn}",
        f"--model.max_seq_len={args.seq}", f"--train.micro_batch_size={args.micro_batch}",
        f"--train.steps={total_steps}", f"--optim.warmup_steps={max(1, total_steps // 10)}",
        f"--parallel.zero_stage={args.zero_stage}", f"--precision={args.precision}",
        f"--run.seed={args.seed}",
    ]
    if args.grad_clip is not None:
        overrides.append(f"--train.grad_clip={args.grad_clip}")
    return load_config(None, overrides)


def synthetic_batches(args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(args.seed)
    batches = []
    for _ in range(args.num_batches):
        input_ids = torch.randint(3, args.vocab, (args.micro_batch, args.seq), generator=g)  # (B, T)
        batches.append({"input_ids": input_ids, "labels": input_ids.clone(),
                        "attention_mask": torch.ones_like(input_ids),
                        "real_tokens": torch.full((args.micro_batch,), args.seq)})
    return batches


class Batches:
    """The `next(loader)` that train_step calls, cycling over a fixed list."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]):
        self.batches, self.i = batches, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return dict(batch)  # train_step pops real_tokens from what it is given


class PlainTrainer:
    """nanoGPT-style loop: forward, backward, clip, AdamW, LambdaLR, zero_grad."""

    def __init__(self, model: torch.nn.Module, cfg, batches, device: str, plain_bf16: str):
        self.model, self.cfg, self.device = model.to(device).train(), cfg, device
        self.loader = Batches(batches)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = None  # fp32 copies of the bf16 weights, in self.params order
        if cfg.precision == "bf16":
            # Parameters only, as DeepSpeed's engine does: buffers (rotary inv_freq) stay fp32.
            for p in self.params:
                p.data = p.data.to(torch.bfloat16)
            if plain_bf16 == "master":  # from the bf16 values, as DeepSpeed builds its fp32 partitions
                self.master = [p.detach().float().requires_grad_(True) for p in self.params]
        self.stepped = self.master if self.master is not None else self.params
        o = cfg.optim
        # As build_optimizer: weight decay on matrices only, torch's fused AdamW kernel.
        groups = [{"params": [p for p in self.stepped if p.dim() >= 2], "weight_decay": o.weight_decay},
                  {"params": [p for p in self.stepped if p.dim() < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                           fused=True)
        self.scheduler = build_scheduler(self.optimizer, cfg)

    def step(self) -> float:
        batch = {k: v.to(self.device) for k, v in next(self.loader).items() if k != "real_tokens"}
        loss = self.model(**batch).loss
        loss.backward()
        self.apply_gradients()
        return loss.item()

    def apply_gradients(self) -> None:
        """The optimizer step on the gradients backward left: clip, AdamW (on the fp32 master copy under
        bf16, copied back), the LR schedule."""
        if self.master is not None:
            for m, p in zip(self.master, self.params):
                m.grad = p.grad.float()
                p.grad = None
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.stepped, self.cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.master is not None:
            with torch.no_grad():
                for m, p in zip(self.master, self.params):
                    p.copy_(m)


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the system, so the RSS is what is alive
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0, proc(5))


def peak_memory() -> int:
    """Bytes at the peak since reset_peak_memory()."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def timed(run_step, n: int, losses: list[float]) -> float:
    """Seconds for n steps of run_step; each step's loss is appended to `losses`."""
    start = time.perf_counter()
    for _ in range(n):
        losses.append(run_step())
    return time.perf_counter() - start


def loss_agreement(a: list[float], b: list[float]) -> tuple[float, int]:
    """Largest relative difference |a-b|/|b| over steps, and the step (1-based) where it occurs."""
    worst, where = 0.0, 0
    for i, (x, y) in enumerate(zip(a, b)):
        rel = abs(x - y) / max(abs(y), 1e-12)
        if rel > worst:
            worst, where = rel, i + 1
    return worst, where


def main(argv=None) -> float:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    total_steps = args.warmup + args.rounds * args.steps
    cfg = build_config(args, total_steps)
    world = init_world()
    dims = validate(cfg, world.world_size)
    import deepspeed
    deepspeed.utils.logger.setLevel(logging.WARNING)  # engine-build INFO lines would bury the table

    torch.manual_seed(cfg.run.seed)
    llama, ids = family("llama"), TokenIds(args.vocab, PAD_ID, BOS_ID, EOS_ID)
    model = llama.build(cfg.model, ids, world.device_type)
    plain_model = llama.build(cfg.model, ids, world.device_type)
    plain_model.load_state_dict(model.state_dict())  # identical initial weights, taken before wrapping
    n_params = num_params(model, exclude_embeddings=False)

    optimizer = build_optimizer(llama.param_groups(model, cfg.optim.weight_decay), cfg)
    engine = wrap(model, optimizer, build_scheduler(optimizer, cfg), cfg, dims)
    batches = synthetic_batches(args)
    loader = Batches(batches)
    plain = PlainTrainer(plain_model, cfg, batches, engine.device, args.plain_bf16)

    sides = {"megatrain": lambda: train_step(engine, [next(loader)], 1, llama).loss, "plain": plain.step}
    if args.per_source:  # the same engine steps both sides: only the metrics differ
        sourced = Batches([dict(b, source=torch.arange(args.micro_batch) % 2) for b in batches])
        sides = {"per_source": lambda: train_step(engine, [next(sourced)], 2, llama).loss,
                 "no_source": sides["megatrain"]}
    losses = {name: [] for name in sides}
    times = {name: [] for name in sides}
    peaks = {name: 0 for name in sides}
    for name, run_step in sides.items():
        timed(run_step, args.warmup, losses[name])
    order = list(sides)
    for r in range(args.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            reset_peak_memory()
            times[name].append(timed(sides[name], args.steps, losses[name]) / args.steps)
            peaks[name] = max(peaks[name], peak_memory())

    tokens_per_step = args.micro_batch * args.seq
    print(f"\nmodel: {n_params / 1e6:.2f}M params (hidden {args.hidden}, {args.layers} layers, ffn {args.ffn}, "
          f"vocab {args.vocab}); batch {args.micro_batch}x{args.seq} = {tokens_per_step} tokens/step")
    plain_recipe = f", plain bf16: {args.plain_bf16}" if args.precision == "bf16" else ""
    print(f"precision {cfg.precision}{plain_recipe}, ZeRO-{cfg.parallel.zero_stage}, grad_clip {cfg.train.grad_clip}, "
          f"{args.rounds} rounds x {args.steps} steps (+{args.warmup} warmup), torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}, "
          f"deepspeed {deepspeed.__version__}")
    print("ms/step per round:")
    for name in sides:
        print(f"  {name:<10} " + " ".join(f"{t * 1e3:8.1f}" for t in times[name]))
    print("| side       | median ms/step | min ms/step | tokens/s | peak memory MiB |")
    print("|------------|---------------:|------------:|---------:|----------------:|")
    median = {name: statistics.median(times[name]) for name in sides}
    for name in sides:
        print(f"| {name:<10} | {median[name] * 1e3:14.1f} | {min(times[name]) * 1e3:11.1f} | "
              f"{tokens_per_step / median[name]:8.0f} | {peaks[name] / 2**20:15.0f} |")
    if args.per_source:
        # Paired by round (the two sides ran back to back): a drift of the machine's speed over the run
        # cancels out of each round's ratio, where it would not out of the two medians.
        ratio = statistics.median(a / b for a, b in zip(times["per_source"], times["no_source"]))
        print(f"per-source ratio: {ratio:.3f} time (median of the rounds' ratios), "
              f"{peaks['per_source'] / peaks['no_source']:.3f} peak memory")
        return ratio
    worst, where = loss_agreement(losses["megatrain"], losses["plain"])
    # The two sides differ only in the rounding of gradient clipping: DeepSpeed takes the global norm
    # as sum(norm_i ** 2) ** 0.5 and scales by 1 / ((norm + 1e-6) / clip), torch by the norm of the
    # stacked norm_i and clip / (norm + 1e-6). With --grad-clip 0 both precisions are bitwise equal;
    # bf16 amplifies the last-bit differences whenever a master weight rounds to the other bf16 value.
    tolerance = 1e-4 if cfg.precision == "fp32" else 5e-2
    verdict = "agree" if worst <= tolerance else "DIFFER"
    difference = (f"max relative difference {worst:.2e} at step {where}" if worst
                  else "identical at every step")
    print(f"losses over {len(losses['plain'])} steps: megatrain {losses['megatrain'][0]:.6f} -> "
          f"{losses['megatrain'][-1]:.6f}, plain {losses['plain'][0]:.6f} -> {losses['plain'][-1]:.6f}; "
          f"{difference} ({verdict}, tolerance {tolerance:g})")
    ratio = median["megatrain"] / median["plain"]
    print(f"overhead ratio: {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
