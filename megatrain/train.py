"""The training loop: build, resume, step, log, evaluate, checkpoint."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from megatrain.checkpoint import Checkpointer, check_compatible, check_elastic
from megatrain.config import Config, gradient_accumulation_steps, save_config, validate
from megatrain.data.loader import QALoader
from megatrain.data.mix_loader import MixtureLoader, open_mixture
from megatrain.data.packed import PackedDataset
from megatrain.data.released import read_split
from megatrain.data.shards import ShardSet
from megatrain.data.tokenizer import Tokenizer
from megatrain.errors import CheckpointError, DataError
from megatrain.evaluate import evaluate
from megatrain.metrics import Metrics, peak_flops
from megatrain.model.llama import build_model, flops_per_token, num_params
from megatrain.optim import build_optimizer, build_scheduler
from megatrain.parallel.checkpointing import apply_ac
from megatrain.parallel.dims import World, init_world, shutdown
from megatrain.parallel.launcher_env import export_rank_env
from megatrain.parallel.zero import wrap
from megatrain.preemption import StopRequest


Data = ShardSet | dict[str, PackedDataset]  # question/answer shards, or a pretraining mixture


def preflight(cfg: Config, world_size: int, resume: bool) -> Data:
    """Every check that can fail on the user's input, before any process group, engine or file is made."""
    validate(cfg, world_size)
    data = open_mixture(cfg.data.sources, cfg.model.max_seq_len) if cfg.data.sources else ShardSet(cfg.data.shards)
    checkpoints = Path(cfg.run.dir) / "checkpoints"
    has_checkpoint = (checkpoints / "latest").is_file()
    if resume and has_checkpoint:
        latest = checkpoints / (checkpoints / "latest").read_text().strip()
        check_compatible(latest, cfg)
        check_elastic(latest, cfg, world_size)
    if resume and not has_checkpoint:
        raise CheckpointError(f"--resume: no checkpoint in {checkpoints}; train without --resume first")
    if not resume and has_checkpoint:
        raise CheckpointError(f"{cfg.run.dir} already has checkpoints; pass --resume to continue that run, "
                              "or set --run.dir to a new folder (nothing was overwritten)")
    return data


def verify_data(data: Data, world: World, on_bad_shard: str) -> tuple[Data, list[str]]:
    """Hash-check every shard, spread over the ranks; every rank gets the same verdict.

    Returns:
        The data to train on (bad shards left out under on_bad_shard=skip) and the skipped shards.
    """
    work = [None] if isinstance(data, ShardSet) else [(n, i) for n in sorted(data) for i in range(len(data[n].shards))]
    found = []
    for item in work[world.rank::world.world_size]:
        try:
            if item is None:
                data.verify()
            else:
                if item[1] == 0:
                    data[item[0]].verify_tokenizer()
                found += [(item[0], *bad) for bad in data[item[0]].find_bad_shards([item[1]])]
        except DataError as e:
            found.append((None, str(e), "", ""))
    everyone = [found]
    if world.world_size > 1:
        everyone = [None] * world.world_size
        torch.distributed.all_gather_object(everyone, found)
    bad = sorted(b for part in everyone for b in part)
    fatal = [b for b in bad if b[0] is None]
    if fatal:
        raise DataError(fatal[0][1])
    if bad and on_bad_shard == "error":
        name, shard, expected, actual = bad[0]
        raise DataError(f"shard {shard} of data.sources.{name} ({data[name].path}): sha256 mismatch (expected "
                        f"{expected}, got {actual}); {len(bad)} bad shard(s) in all. Rebuild it with "
                        "`megatrain-data build` (a rerun keeps intact shards), or set data.on_bad_shard=skip")
    if not bad:
        return data, []
    skipped = [f"{name}/{shard}" for name, shard, _, _ in bad]
    if world.is_main:
        print(f"warning: skipping {len(bad)} shard(s) whose sha256 differs from the manifest: "
              f"{', '.join(skipped)}", flush=True)
    return {n: PackedDataset(d.path, exclude={s for m, s, _, _ in bad if m == n}) for n, d in data.items()}, skipped


def load_problems(cfg: Config, limit: int) -> list[tuple[str, str, str]]:
    pairs = read_split(cfg.data.eval_released, cfg.data.eval_module, [cfg.data.eval_split])
    return [(cfg.data.eval_module, q, a) for q, a in pairs[:limit]]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_ids(data: Data) -> tuple[Path, int, int, int | None, int]:
    """(tokenizer path, vocab size, pad, bos, eos) that the model and its HF export take."""
    if isinstance(data, ShardSet):
        tokenizer = Tokenizer(data.tokenizer_path)
        return data.tokenizer_path, tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id
    first = data[sorted(data)[0]]  # open_mixture checked that every source shares the tokenizer
    return first.tokenizer_path, first.vocab_size, first.pad_id, first.manifest.get("bos_id"), first.eos_id


def make_loader(cfg: Config, data: Data, world: World, accumulation: int, skipped: list[str]):
    if isinstance(data, ShardSet):
        return QALoader(data, cfg.run.seed, world.rank, world.world_size, cfg.train.micro_batch_size,
                        cfg.model.max_seq_len, cfg.data.num_workers)
    global_batch = cfg.train.micro_batch_size * world.world_size * accumulation
    return MixtureLoader(data, {n: s.weight for n, s in cfg.data.sources.items()}, cfg.run.seed, world.rank,
                         world.world_size, cfg.train.micro_batch_size, global_batch, cfg.data.mixture_window,
                         cfg.data.attention_reset, cfg.data.num_workers, skipped)


def train_step(engine, loader, accumulation: int) -> tuple[float, int]:
    """One optimizer step over `accumulation` micro-batches; DeepSpeed steps on the last one."""
    loss_sum, tokens = 0.0, 0
    for _ in range(accumulation):
        batch = next(loader)
        real = batch.pop("real_tokens") if "real_tokens" in batch else batch["attention_mask"].sum()
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        # No KV cache in training: it costs memory, and with one transformers ignores the position
        # ids that reset attention at document boundaries (find_packed_sequence_indices).
        loss = engine(**batch, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        loss_sum += loss.item()
        tokens += int(real.sum())
    return loss_sum / accumulation, tokens


def train(cfg: Config, resume: bool = False, stop: StopRequest | None = None) -> dict:
    """Train cfg.train.steps optimizer steps (continuing a checkpoint with resume) and evaluate.

    SIGTERM or SIGUSR2 (the scheduler's preemption / time-limit warning) stops every rank at the
    next step boundary with a checkpoint there; a `--resume` continues from it.

    Args:
        stop: the stop flag to watch; None installs one for the duration of this call.

    Returns:
        The final evaluation summary (also written to <run.dir>/eval.json); after a stop signal
        {"stopped_at": step, "signal": name} instead. A finished run also leaves <run.dir>/DONE.
    """
    if stop is None:
        with StopRequest() as stop:
            return train(cfg, resume, stop)
    data = preflight(cfg, export_rank_env(), resume)
    world = init_world()
    skipped = []
    if cfg.data.verify:
        data, skipped = verify_data(data, world, cfg.data.on_bad_shard)
    seed_everything(cfg.run.seed)
    tokenizer_path, vocab_size, pad_id, bos_id, eos_id = model_ids(data)
    if world.is_main:
        Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.run.dir) / "config.yaml")
        (Path(cfg.run.dir) / "DONE").unlink(missing_ok=True)  # continued past its old end: not done any more

    model = build_model(cfg.model, vocab_size, pad_id, bos_id, eos_id, world.device_type)
    apply_ac(model, cfg.parallel.activation_checkpointing)
    optimizer = build_optimizer(model, cfg)
    checkpointer = Checkpointer(cfg, world, tokenizer_path)
    universal = resume and checkpointer.prepare_resume()  # resuming on another number of ranks
    engine = wrap(model, optimizer, build_scheduler(optimizer, cfg), cfg, world.world_size, universal)
    accumulation = gradient_accumulation_steps(cfg, world.world_size)
    loader = make_loader(cfg, data, world, accumulation, skipped)
    start = checkpointer.load(engine, loader) if resume else 0

    metrics = Metrics(cfg.run.dir, cfg.log.interval, world, cfg.train.steps, start,
                      flops_per_token(cfg.model, num_params(model), cfg.model.max_seq_len),
                      peak_flops(world.device_type, cfg.precision), cfg.log.tensorboard, cfg.log.progress,
                      counters=loader.metrics,
                      restarts=int(os.environ.get("SLURM_RESTART_COUNT", 0)))  # SLURM's count of requeues
    eval_problems = load_problems(cfg, cfg.eval.limit) if cfg.eval.interval else []

    eval_tokenizer = Tokenizer(tokenizer_path) if cfg.eval.interval or cfg.eval.final_limit else None

    def run_eval(problems):
        return evaluate(engine.module, eval_tokenizer, problems, world, cfg.eval.batch_size,
                        cfg.eval.max_new_tokens, cfg.model.max_seq_len)

    last = cfg.train.steps if not cfg.train.exit_interval else min(cfg.train.steps, start + cfg.train.exit_interval)
    for step in range(start + 1, last + 1):
        loss, tokens = train_step(engine, loader, accumulation)
        extra = None
        if cfg.eval.interval and step % cfg.eval.interval == 0:
            result = run_eval(eval_problems)
            extra = {f"eval/{k}": result[k] for k in ("exact_match", "numeric_match", "teacher_forced_exact_match")}
        metrics.step(step, loss, tokens, engine.get_lr()[0], extra)
        stopping = stop.requested()
        if checkpointer.due(step, last) or stopping:
            checkpointer.save(step, engine, loader)
        if stopping:
            metrics.close()
            shutdown()
            return {"stopped_at": step, "signal": stop.signal_name or "a signal on another rank"}
    metrics.close()
    summary = {}
    # After an exit_interval stop the final eval belongs to the run's real end, not here.
    if last == cfg.train.steps and cfg.eval.final_limit:
        summary = run_eval(load_problems(cfg, cfg.eval.final_limit))
        if world.is_main:
            (Path(cfg.run.dir) / "eval.json").write_text(json.dumps({"step": last, **summary}, indent=2))
    if last == cfg.train.steps and world.is_main:
        (Path(cfg.run.dir) / "DONE").write_text(json.dumps({"step": last}) + "\n")
    shutdown()
    return summary
