"""The training loop: build, resume, step, log, evaluate, checkpoint."""

from __future__ import annotations

import copy
import dataclasses
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatrain import precision
from megatrain.checkpoint import Checkpointer, check_compatible, check_elastic, saved_config
from megatrain.config import Config, batch_plan, save_config, validate
from megatrain.data.loader import IGNORE_INDEX, QALoader
from megatrain.data.mix_loader import MixtureLoader, open_mixture
from megatrain.data.packed import PackedDataset
from megatrain.data.shards import ShardSet
from megatrain.data.tokenizer import Tokenizer
from megatrain.errors import CheckpointError, DataError
from megatrain.evaluate import Evaluator
from megatrain.metrics import Metrics, peak_flops
from megatrain.model import ModelFamily, TokenIds, family
from megatrain.optim import build_optimizer, build_scheduler
from megatrain.parallel import parallelize
from megatrain.parallel.dims import BatchPlan, World, all_reduce_sum, init_world, shutdown
from megatrain.parallel.launcher_env import export_rank_env
from megatrain.parallel.zero import wrap
from megatrain.plots import save_loss_plot
from megatrain.preemption import StopRequest
from megatrain.run_dir import RunDir


Data = ShardSet | dict[str, PackedDataset]  # question/answer shards, or a pretraining mixture


def preflight(cfg: Config, world_size: int, resume: bool) -> Data:
    """Every check that can fail on the user's input, before any process group, engine or file is made."""
    dims = validate(cfg, world_size)
    data = open_mixture(cfg.data.sources, cfg.model.max_seq_len) if cfg.data.sources else ShardSet(cfg.data.shards)
    parallelize.check(cfg, family(cfg.model.family), model_ids(data)[1].vocab_size, dims)
    run = RunDir(cfg.run.dir)
    has_checkpoint = run.has_checkpoint()
    if resume and has_checkpoint:
        latest = run.latest()
        check_compatible(latest, cfg)
        check_elastic(latest, cfg, world_size)
    if resume and not has_checkpoint:
        raise CheckpointError(f"--resume: no checkpoint in {run.checkpoints}; train without --resume first")
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


def resolve_precision(cfg: Config, world: World, resume: bool) -> tuple[Config, str]:
    """The config with `precision: auto` resolved (the same on every rank), and a line saying why.

    Rank 0 prints the line first thing; it also heads the run's config.yaml as a comment.
    """
    latest = RunDir(cfg.run.dir).latest()
    recorded = saved_config(latest).get("precision") if resume and latest else None
    choice = precision.choose(cfg.precision, world.device_type, cfg.parallel.zero_stage, recorded)
    all_native = all_reduce_sum([1.0 if choice.native_bf16 else 0.0])[0] == world.world_size
    choice = precision.agree(choice, all_native)
    note = f"precision: {choice.precision} ({choice.reason})"
    cfg = dataclasses.replace(cfg, precision=choice.precision)
    validate(cfg, world.world_size)  # e.g. bf16 kept from a checkpoint onto ZeRO-0
    if world.is_main:
        print(note, flush=True)
        warning = precision.emulation_warning(choice, world.device_type)
        if warning:
            print(warning, flush=True)
    return cfg, note


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_ids(data: Data) -> tuple[Path, TokenIds]:
    """The tokenizer's path and the ids that the model and its HF export take."""
    if isinstance(data, ShardSet):
        tokenizer = Tokenizer(data.tokenizer_path)
        return data.tokenizer_path, TokenIds(tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id,
                                             tokenizer.eos_id)
    first = data[sorted(data)[0]]  # open_mixture checked that every source shares the tokenizer
    return first.tokenizer_path, TokenIds(first.vocab_size, first.pad_id, first.manifest.get("bos_id"), first.eos_id)


def make_loader(cfg: Config, data: Data, world: World, plan: BatchPlan, skipped: list[str]):
    """The rank's loader: ranks of one tensor-parallel group read the same batches (their DP rank's)."""
    if isinstance(data, ShardSet):
        return QALoader(data, cfg.run.seed, world.dp_rank, world.dp_size, plan.micro_batch_size,
                        cfg.model.max_seq_len, cfg.data.num_workers, plan.global_batch_size)
    return MixtureLoader(data, {n: s.weight for n, s in cfg.data.sources.items()}, cfg.run.seed, world.dp_rank,
                         world.dp_size, plan.micro_batch_size, plan.global_batch_size, cfg.data.mixture_window,
                         cfg.data.attention_reset, cfg.data.num_workers, skipped)


@dataclass
class StepResult:
    """What one optimizer step reports to the metrics."""

    loss: float
    """Mean loss over the step's micro-batches (each the model's own mean over its label tokens)."""
    tokens: int
    """Real (unpadded) tokens this rank trained on."""
    source_loss: list[float]
    """Per data source (the loader's source_names): summed token loss and, below, label tokens."""
    source_tokens: list[float]
    parts: dict[str, float] = dataclasses.field(default_factory=dict)
    """The loss's named parts (the family's ModelOutput.parts), averaged over the micro-batches."""


def fetch(loader, accumulation: int) -> tuple[list[dict], str | None]:
    """The step's micro-batches, or (what was read, why not) when a DataLoader worker died."""
    batches = []
    try:
        for _ in range(accumulation):
            batches.append(next(loader))
    except RuntimeError as e:  # torch's "DataLoader worker (pid N) is killed by signal: ..." / "exited unexpectedly"
        if "DataLoader worker" not in str(e):
            raise
        return batches, str(e).splitlines()[0]
    return batches, None


@torch.no_grad()
def loss_by_source(logits: torch.Tensor, labels: torch.Tensor, source: torch.Tensor,
                   num_sources: int, split_vocab: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss and label-token count per source, from a batch's logits (B, T, V); with
    split_vocab, V is this tensor-parallel rank's slice of the vocabulary."""
    shifted = labels[:, 1:]  # position t predicts token t+1, as the model's own loss
    token_loss = parallelize.token_cross_entropy(logits[:, :-1].float(), shifted, IGNORE_INDEX,
                                                 split_vocab)  # (B, T-1)
    counted = (shifted != IGNORE_INDEX).float()
    zeros = torch.zeros(num_sources, dtype=torch.float64)
    return (zeros.index_add(0, source, (token_loss * counted).sum(1).double().cpu()),
            zeros.index_add(0, source, counted.sum(1).double().cpu()))


def train_step(engine, batches: list[dict], num_sources: int, model_family: ModelFamily) -> StepResult:
    """One optimizer step over the micro-batches given; DeepSpeed steps on the last one."""
    loss_sum, tokens, parts = 0.0, 0, {}
    source_loss = torch.zeros(num_sources, dtype=torch.float64)
    source_tokens = torch.zeros(num_sources, dtype=torch.float64)
    split_vocab = parallelize.vocab_parallel(engine.module)
    for batch in batches:
        real = batch.pop("real_tokens")
        source = batch.pop("source", None)
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        out = model_family.forward(engine, batch)
        engine.backward(out.loss)
        engine.step()
        loss_sum += out.loss.item()
        for name, value in out.parts.items():
            parts[name] = parts.get(name, 0.0) + value.item() / len(batches)
        tokens += int(real.sum())
        if source is not None:
            by_source = loss_by_source(out.logits.detach(), batch["labels"], source, num_sources, split_vocab)
            source_loss += by_source[0]
            source_tokens += by_source[1]
    return StepResult(loss_sum / len(batches), tokens, source_loss.tolist(), source_tokens.tolist(), parts)


def stop_or_fail(stop: StopRequest, data_error: str | None, world: World) -> tuple[bool, str | None]:
    """One collective per step: (any rank asked to stop, the first rank's DataLoader failure)."""
    stop_votes, failures = all_reduce_sum([1.0 if stop.signal_name else 0.0, 1.0 if data_error else 0.0])
    if not failures:
        return stop_votes > 0, None
    errors = [data_error]
    if world.world_size > 1:
        errors = [None] * world.world_size
        torch.distributed.all_gather_object(errors, data_error)
    rank = next(r for r, e in enumerate(errors) if e)
    return True, f"rank {rank}: {errors[rank]}"


def train(cfg: Config, resume: bool = False, stop: StopRequest | None = None) -> dict:
    """Train cfg.train.steps optimizer steps (continuing a checkpoint with resume) and evaluate.

    SIGTERM or SIGUSR2 (the scheduler's preemption / time-limit warning) stops every rank at the
    next step boundary with a checkpoint there; a `--resume` continues from it. A DataLoader worker
    that dies (DataLoader workers ignore those signals, see data/loader.py) does the same, then
    raises DataError naming the rank.

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
    world = init_world(cfg.parallel.tp_degree)
    cfg, precision_note = resolve_precision(cfg, world, resume)
    skipped = []
    if cfg.data.verify:
        data, skipped = verify_data(data, world, cfg.data.on_bad_shard)
    seed_everything(cfg.run.seed)
    tokenizer_path, ids = model_ids(data)
    run = RunDir(cfg.run.dir)
    if world.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.config, precision_note)
        run.done.unlink(missing_ok=True)  # continued past its old end: not done any more

    model_family = family(cfg.model.family)
    model = parallelize.parallelize(model_family.build(cfg.model, ids, world.device_type), cfg, world.dims)
    flops = model_family.flops_per_token(cfg.model, model)  # of the whole model, before any split
    optimizer = build_optimizer(model_family.param_groups(model, cfg.optim.weight_decay), cfg)
    checkpointer = Checkpointer(cfg, world, tokenizer_path, precision_note)
    universal = resume and checkpointer.prepare_resume()  # resuming on another number of ranks
    engine = wrap(model, optimizer, build_scheduler(optimizer, cfg), cfg, world.dims, universal)
    plan = batch_plan(cfg, world.dims)
    loader = make_loader(cfg, data, world, plan, skipped)
    start = checkpointer.load(engine, loader) if resume else 0

    metrics = Metrics(cfg.run.dir, cfg.log.interval, world, cfg.train.steps, start, flops,
                      peak_flops(world.device_type, cfg.precision), cfg.log.tensorboard, cfg.log.progress,
                      counters=loader.metrics, source_names=loader.source_names,
                      restarts=int(os.environ.get("SLURM_RESTART_COUNT", 0)))  # SLURM's count of requeues
    evaluator = Evaluator(cfg, engine, world, tokenizer_path)

    last = cfg.train.steps if not cfg.train.exit_interval else min(cfg.train.steps, start + cfg.train.exit_interval)
    saved = start
    try:
        for step in range(start + 1, last + 1):
            position = copy.deepcopy(loader.state_dict())  # where the data stands after step - 1
            batches, data_error = fetch(loader, plan.accumulation)
            stopping, failure = stop_or_fail(stop, data_error, world)
            if stopping:  # a checkpoint at the boundary before this step, unless one is there
                if step - 1 > saved:
                    checkpointer.save(step - 1, engine, position)
                    saved = step - 1
                if failure:
                    where = (f"the run saved a checkpoint at step {step - 1}: continue with --resume (or "
                             "--auto-resume)") if saved else "no step had finished: start the run again"
                    raise DataError(f"a DataLoader worker died ({failure}); {where}")
                metrics.close()
                shutdown()
                return {"stopped_at": step - 1, "signal": stop.signal_name or "a signal on another rank"}
            result = train_step(engine, batches, len(loader.source_names), model_family)
            metrics.step(step, result, engine.get_lr()[0], evaluator.maybe_run(step))
            if checkpointer.due(step, last):
                checkpointer.save(step, engine, loader.state_dict())
                saved = step
    finally:
        loader.close()  # workers ignore SIGTERM, so they are stopped here, not by a signal
    metrics.close()
    summary = {}
    # After an exit_interval stop the final eval belongs to the run's real end, not here.
    if last == cfg.train.steps:
        summary = evaluator.final(last)
        if world.is_main:
            save_loss_plot(run.root)
            run.mark_done(last)
    shutdown()
    return summary
