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

from megatrain import objective, precision
from megatrain.checkpoint import Checkpointer, check_pickles, check_resume, pick_checkpoint, saved_config
from megatrain.config import Config, batch_plan, save_config, validate
from megatrain.data.training_data import TrainingData, open_data
from megatrain.errors import CheckpointError, DataError, TrainingError
from megatrain.eval import Evaluator
from megatrain.guard import NonFiniteGuard, injected_nan
from megatrain.heartbeat import Heartbeat
from megatrain.layout_conversion import prepare_resume
from megatrain.metrics import Metrics, peak_flops
from megatrain.model import ModelFamily, family
from megatrain.optim import build_optimizer, build_scheduler
from megatrain.parallel import parallelize
from megatrain.parallel.dims import BatchPlan, World, init_world, shutdown
from megatrain.parallel.host import all_gather_object, all_reduce_sum
from megatrain.parallel.launcher_env import export_rank_env
from megatrain.parallel.zero import wrap
from megatrain.plots import save_loss_plot
from megatrain.preemption import StopRequest
from megatrain.run_dir import RunDir


def preflight(cfg: Config, world_size: int, resume: bool) -> TrainingData:
    """Every check that can fail on the user's input, before any process group, engine or file is made."""
    dims = validate(cfg, world_size)
    data = open_data(cfg)
    family(cfg.model.family).check_pretrained(cfg.model, data.ids)
    parallelize.check(cfg, family(cfg.model.family), data.ids.vocab_size, dims)
    run = RunDir(cfg.run.dir)
    has_checkpoint = run.has_checkpoint()
    if resume and has_checkpoint:
        latest = pick_checkpoint(run)  # present and the sizes saved; setup() also checks the sha256 sums
        check_resume(latest, cfg, world_size, data.tokenizer_path)  # what may change: megatrain/resume_policy.py
    if resume and not has_checkpoint:
        raise CheckpointError(f"--resume: no checkpoint in {run.checkpoints}; train without --resume first")
    if not resume and has_checkpoint:
        raise CheckpointError(f"{cfg.run.dir} already has checkpoints; pass --resume to continue that run, "
                              "or set --run.dir to a new folder (nothing was overwritten)")
    return data


def resolve_precision(cfg: Config, world: World, resume_from: Path | None) -> tuple[Config, str]:
    """The config with `precision: auto` resolved (the same on every rank), and a line saying why.

    Rank 0 prints the line first thing; it also heads the run's config.yaml as a comment.
    """
    recorded = saved_config(resume_from).get("precision") if resume_from else None
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


@dataclass
class StepResult:
    """What one optimizer step reports to the metrics (this rank's share; the metrics sum the ranks')."""

    lm_loss_sum: float
    """Summed token loss over this rank's label tokens (the objective, objective.py, before scaling)."""
    label_tokens: int
    """Label tokens on this rank: those the loss is computed on."""
    tokens: int
    """Real (unpadded) tokens this rank trained on."""
    source_loss: list[float]
    """Per data source (the loader's source_names): summed token loss and, below, label tokens."""
    source_tokens: list[float]
    extra_loss: float = 0.0
    """The family's additions to the objective (ModelOutput.extra_loss), averaged over the micro-batches."""
    parts: dict[str, float] = dataclasses.field(default_factory=dict)
    """The family's named figures (ModelOutput.parts: loss terms, MoE expert load), averaged over the
    micro-batches."""
    grad_norm: float | None = None
    """Global gradient norm before clipping, as DeepSpeed computed it (None where it computes none)."""

    @property
    def loss(self) -> float:
        """This rank's objective: its token-mean loss plus the family's extra terms."""
        return self.lm_loss_sum / max(self.label_tokens, 1) + self.extra_loss


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


def train_step(engine, batches: list[dict], num_sources: int, model_family: ModelFamily,
               loss_scale: float | None = None, poison: bool = False) -> StepResult:
    """One optimizer step over the micro-batches given; DeepSpeed steps on the last one.

    Args:
        loss_scale: objective.step_scale of the step's label tokens over every rank; None: this rank's
            micro-batches make the whole step (benchmarks, single-rank callers).
        poison: make the first micro-batch's loss NaN (fault injection, guard.py).

    What the step reports stays on the device until one transfer at its end (a sync per micro-batch
    would stall the GPU's queue every time).
    """
    task, device = model_family.task, engine.device
    counts = [objective.label_counts(b["labels"], task) for b in batches]  # host tensors: no sync
    label_tokens = int(sum(c.sum() for c in counts))
    if loss_scale is None:  # this rank's rows are the step: the token mean over them
        loss_scale = objective.step_scale(label_tokens, len(batches), 1)
    split_vocab = parallelize.vocab_parallel(engine.module)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # summed token loss, summed extra loss
    source_loss = torch.zeros(num_sources, dtype=torch.float64, device=device)
    source_tokens = torch.zeros(num_sources, dtype=torch.float64)
    parts: dict[str, torch.Tensor] = {}
    tokens = 0
    for batch, count in zip(batches, counts):
        tokens += int(batch.pop("real_tokens").sum())
        source = batch.pop("source", None)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        out = model_family.forward(engine, batch)
        token_loss = objective.token_loss(out.logits, batch["labels"], task, split_vocab)  # (B, T) fp32
        if poison:
            token_loss, poison = token_loss * float("nan"), False
        extra = torch.as_tensor(out.extra_loss if out.extra_loss is not None else 0.0, device=device)
        loss = token_loss.sum() * loss_scale + extra  # see objective.py
        engine.backward(loss)
        engine.step()
        row_loss = token_loss.detach().sum(1).double()  # (B,): summed in fp64 from here on, as the sources are
        sums += torch.stack([row_loss.sum(), extra.detach().double()])
        for name, value in out.parts.items():
            parts[name] = parts.get(name, 0.0) + torch.as_tensor(value, device=device).detach().double().reshape(())
        if source is not None:
            source_loss.index_add_(0, source.to(device), row_loss)
            source_tokens.index_add_(0, source, count.double())
    norm = engine.get_global_grad_norm()
    norm_on_device = isinstance(norm, torch.Tensor)
    values = [sums, source_loss, *(v.reshape(1) for v in parts.values())]
    if norm_on_device:
        values.append(norm.detach().double().reshape(1).to(device))
    host = torch.cat(values).tolist()  # the step's one device-to-host transfer
    lm_loss_sum, extra_sum = host[:2]
    part_values = host[2 + num_sources: 2 + num_sources + len(parts)]
    grad_norm = host[-1] if norm_on_device else (float(norm) if norm is not None else None)
    return StepResult(lm_loss_sum, label_tokens, tokens, host[2: 2 + num_sources], source_tokens.tolist(),
                      extra_sum / len(batches), {n: v / len(batches) for n, v in zip(parts, part_values)}, grad_norm)


def row_sources(batches: list[dict]) -> list[int]:
    """The data sources (indices into loader.source_names) of a step's rows on this rank."""
    return sorted({int(i) for b in batches if "source" in b for i in b["source"].tolist()})


def was_skipped(s: Session, step: int, result: StepResult, position: dict, sources: list[int]) -> bool:
    """Whether DeepSpeed skipped this step's update (a non-finite loss or gradient norm, guard.py): then
    logged with its data, and past train.max_skipped_steps a checkpoint of the last good weights and a
    stop (TrainingError)."""
    mean_loss = all_reduce_sum([result.loss])[0] / s.world.world_size  # NaN if any rank's is: all agree
    reason = s.guard.check(step, mean_loss, result.grad_norm, s.engine.was_step_applied())
    if reason is None:
        return False
    names = s.loader.source_names
    everyone = sorted({i for part in all_gather_object(sources) for i in part})
    s.metrics.skipped_step(step, reason, s.engine.skipped_steps, position,
                           [names[i] for i in everyone if i < len(names)])
    if s.guard.exceeded():  # the weights are still the last good ones: keep them
        saved = s.checkpointer.save(step, s.engine, s.loader.state_dict())
        raise TrainingError(s.guard.stop_message(step, saved.name if saved else "no checkpoint"))
    return True


def stop_or_fail(stop: StopRequest, data_error: str | None, label_tokens: int) -> tuple[bool, str | None, float]:
    """One collective per step: (any rank asked to stop, the first rank's DataLoader failure, the sum of
    every rank's label tokens for the step, which the objective divides by)."""
    stop_votes, failures, all_labels = all_reduce_sum([1.0 if stop.signal_name else 0.0, 1.0 if data_error else 0.0,
                                                       float(label_tokens)])
    if not failures:
        return stop_votes > 0, None, all_labels
    errors = all_gather_object(data_error)
    rank = next(r for r, e in enumerate(errors) if e)
    return True, f"rank {rank}: {errors[rank]}", all_labels


@dataclass
class Session:
    """Everything the loop steps with; setup() builds it."""

    cfg: Config
    world: World
    family: ModelFamily
    engine: object
    plan: BatchPlan
    loader: object
    checkpointer: Checkpointer
    metrics: Metrics
    evaluator: Evaluator
    guard: NonFiniteGuard
    heartbeat: Heartbeat
    start: int
    """The step the run continues after (0 for a fresh run)."""


def setup(cfg: Config, resume: bool) -> Session:
    """Check, join the world, verify the data, build model, engine, loader and collaborators, resume.

    The order is fixed: single-device model, then parallelize (TP, activation checkpointing), then
    the ZeRO engine, then the loader and the checkpoint that positions both.
    """
    data = preflight(cfg, export_rank_env(), resume)
    world = init_world(cfg.parallel.tp_degree, cfg.parallel.ep_degree, cfg.parallel.collective_timeout_s)
    run = RunDir(cfg.run.dir)
    resume_from = pick_checkpoint(run, world) if resume else None  # sha256-checked
    if resume_from is not None:
        check_pickles(resume_from, world)  # before anything unpickles it (DeepSpeed, ds_to_universal)
        # Again (an older checkpoint than preflight's, after a damaged one); rank 0 says what changes.
        check_resume(resume_from, cfg, world.world_size, data.tokenizer_path, announce=world.is_main)
    cfg, precision_note = resolve_precision(cfg, world, resume_from)
    if cfg.data.verify:
        data.verify(world)
    seed_everything(cfg.run.seed)
    if world.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.config, precision_note)
        run.done.unlink(missing_ok=True)  # continued past its old end: not done any more

    model_family = family(cfg.model.family)
    model = parallelize.parallelize(model_family.build(cfg.model, data.ids, world.device_type), model_family, cfg,
                                    world.dims, world.rank)
    flops = model_family.flops_per_token(cfg.model, model)  # of the whole model (AutoTP splits it later)
    optimizer = build_optimizer(model_family.param_groups(model, cfg.optim.weight_decay), cfg)
    checkpointer = Checkpointer(cfg, world, data.tokenizer_path, precision_note)
    universal = resume and prepare_resume(resume_from, cfg, world)  # onto another layout: a collective
    engine = wrap(model, optimizer, build_scheduler(optimizer, cfg), cfg, world.dims, universal)
    plan = batch_plan(cfg, world.dims)
    loader = data.loader(world, plan)
    start = checkpointer.load(engine, loader, resume_from) if resume else 0
    metrics = Metrics(cfg.run.dir, cfg.log.interval, world, cfg.train.steps, start, flops,
                      peak_flops(world.device_type, cfg.precision), cfg.log.tensorboard, cfg.log.progress,
                      counters=loader.metrics, source_names=loader.source_names,
                      restarts=int(os.environ.get("SLURM_RESTART_COUNT", 0)))  # SLURM's count of requeues
    return Session(cfg, world, model_family, engine, plan, loader, checkpointer, metrics,
                   Evaluator(cfg, engine, world, data.tokenizer_path),
                   NonFiniteGuard(cfg.train.max_skipped_steps, cfg.train.skip_window),
                   Heartbeat(cfg.run.dir, world.rank), start)


def stop_at_boundary(s: Session, step: int, saved: int, position: dict, failure: str | None,
                     signal_name: str | None) -> dict:
    """A checkpoint at the boundary after `step` (unless one is there), then out: DataError for a dead
    DataLoader worker, else the stop summary (the CLI exits 143 and the scheduler requeues)."""
    if step > saved:
        s.checkpointer.save(step, s.engine, position)
        saved = step
    if failure:
        where = (f"the run saved a checkpoint at step {step}: continue with --resume (or --auto-resume)"
                 if saved else "no step had finished: start the run again")
        raise DataError(f"a DataLoader worker died ({failure}); {where}")
    s.metrics.close()
    shutdown()
    return {"stopped_at": step, "signal": signal_name or "a signal on another rank"}


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
    s = setup(cfg, resume)
    steps, exit_interval = s.cfg.train.steps, s.cfg.train.exit_interval
    last = min(steps, s.start + exit_interval) if exit_interval else steps
    saved = s.start
    s.heartbeat.beat(s.start, force=True)
    try:
        for step in range(s.start + 1, last + 1):
            position = copy.deepcopy(s.loader.state_dict())  # where the data stands after step - 1
            batches, data_error = fetch(s.loader, s.plan.accumulation)
            stopping, failure, all_labels = stop_or_fail(stop, data_error,
                                                         objective.label_tokens(batches, s.family.task))
            if stopping:
                return stop_at_boundary(s, step - 1, saved, position, failure, stop.signal_name)
            sources = row_sources(batches)  # read before train_step takes the batches apart
            # The ranks of a tensor-parallel group read the same rows: count them once.
            scale = objective.step_scale(all_labels / s.world.tp, s.plan.accumulation, s.plan.dp)
            result = train_step(s.engine, batches, len(s.loader.source_names), s.family, scale,
                                poison=injected_nan(step, s.world.rank))
            if not was_skipped(s, step, result, position, sources):
                s.metrics.step(step, result, s.engine.get_lr()[0], s.evaluator.maybe_run(step))
            if s.checkpointer.due(step, last) and s.checkpointer.save(step, s.engine, s.loader.state_dict(), step == last):
                saved = step
            s.heartbeat.beat(step)
    finally:
        s.loader.close()  # workers ignore SIGTERM, so they are stopped here, not by a signal
    s.metrics.close()
    summary = {}
    if last == steps:  # after an exit_interval stop the final eval belongs to the run's real end
        summary = s.evaluator.final(last)
        if s.world.is_main:
            save_loss_plot(RunDir(s.cfg.run.dir).root)
            RunDir(s.cfg.run.dir).mark_done(last)
    elif s.world.is_main:
        print(f"stopped at step {last} of {steps} (train.exit_interval={exit_interval}) with a checkpoint there; "
              "continue with --resume (or --auto-resume)", flush=True)
    shutdown()
    return summary
