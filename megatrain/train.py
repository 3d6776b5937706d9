"""The training loop: build, resume, step, log, evaluate, checkpoint."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from megatrain.checkpoint import Checkpointer, check_compatible
from megatrain.config import Config, gradient_accumulation_steps, save_config, validate
from megatrain.data.loader import QALoader
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


def preflight(cfg: Config, world_size: int, resume: bool) -> ShardSet:
    """Every check that can fail on the user's input, before any process group, engine or file is made."""
    validate(cfg, world_size)
    shards = ShardSet(cfg.data.shards)
    checkpoints = Path(cfg.run.dir) / "checkpoints"
    has_checkpoint = (checkpoints / "latest").is_file()
    if resume and has_checkpoint:
        check_compatible(checkpoints / (checkpoints / "latest").read_text().strip(), cfg)
    if resume and not has_checkpoint:
        raise CheckpointError(f"--resume: no checkpoint in {checkpoints}; train without --resume first")
    if not resume and has_checkpoint:
        raise CheckpointError(f"{cfg.run.dir} already has checkpoints; pass --resume to continue that run, "
                              "or set --run.dir to a new folder (nothing was overwritten)")
    return shards


def verify_shards(shards: ShardSet, world: World) -> None:
    """Hash-check the shards once, rank 0 only, and stop every rank with rank 0's message."""
    message = [None]
    if world.is_main:
        try:
            shards.verify()
        except DataError as e:
            message[0] = str(e)
    if world.world_size > 1:
        torch.distributed.broadcast_object_list(message, src=0)
    if message[0]:
        raise DataError(message[0])


def load_problems(cfg: Config, limit: int) -> list[tuple[str, str, str]]:
    pairs = read_split(cfg.data.eval_released, cfg.data.eval_module, [cfg.data.eval_split])
    return [(cfg.data.eval_module, q, a) for q, a in pairs[:limit]]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_step(engine, loader: QALoader, accumulation: int) -> tuple[float, int]:
    """One optimizer step over `accumulation` micro-batches; DeepSpeed steps on the last one."""
    loss_sum, tokens = 0.0, 0
    for _ in range(accumulation):
        batch = {k: v.to(engine.device) for k, v in next(loader).items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        loss_sum += loss.item()
        tokens += int(batch["attention_mask"].sum())
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
    shards = preflight(cfg, export_rank_env(), resume)
    world = init_world()
    if cfg.data.verify:
        verify_shards(shards, world)
    seed_everything(cfg.run.seed)
    tokenizer = Tokenizer(shards.tokenizer_path)
    if world.is_main:
        Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.run.dir) / "config.yaml")
        (Path(cfg.run.dir) / "DONE").unlink(missing_ok=True)  # continued past its old end: not done any more

    model = build_model(cfg.model, tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id,
                        world.device_type)
    apply_ac(model, cfg.parallel.activation_checkpointing)
    optimizer = build_optimizer(model, cfg)
    engine = wrap(model, optimizer, build_scheduler(optimizer, cfg), cfg, world.world_size)
    accumulation = gradient_accumulation_steps(cfg, world.world_size)
    loader = QALoader(shards, cfg.run.seed, world.rank, world.world_size, cfg.train.micro_batch_size,
                      cfg.model.max_seq_len, cfg.data.num_workers)
    checkpointer = Checkpointer(cfg, world, shards.tokenizer_path)
    start = checkpointer.load(engine, loader) if resume else 0

    metrics = Metrics(cfg.run.dir, cfg.log.interval, world, cfg.train.steps, start,
                      flops_per_token(cfg.model, num_params(model), cfg.model.max_seq_len),
                      peak_flops(world.device_type, cfg.precision), cfg.log.tensorboard, cfg.log.progress,
                      restarts=int(os.environ.get("SLURM_RESTART_COUNT", 0)))  # SLURM's count of requeues
    eval_problems = load_problems(cfg, cfg.eval.limit) if cfg.eval.interval else []

    def run_eval(problems):
        return evaluate(engine.module, tokenizer, problems, world, cfg.eval.batch_size, cfg.eval.max_new_tokens,
                        cfg.model.max_seq_len)

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
