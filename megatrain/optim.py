"""Optimizer and learning-rate schedules."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from megatrain.config import Config, OptimConfig


def lr_factor(step: int, total_steps: int, cfg: OptimConfig, anchor: tuple[int, float] | None = None) -> float:
    """Multiplier of cfg.lr after `step` optimizer steps: linear warmup, then cosine or linear decay.

    Pure function, so schedules are unit-tested without an optimizer. LLEMMA: 500 warmup steps, cosine
    to 1/30; CyberSolve: linear decay.

    Args:
        anchor: (step a, factor f) where a resumed run changed its horizon (train.steps) or floor
            (min_lr_ratio) after warmup: from step a on, the decay starts at f and reaches the floor at
            total_steps with the schedule's shape, so the LR does not jump at a (Schedule.load_state_dict).
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    start, peak = cfg.warmup_steps, 1.0
    if anchor is not None and step >= anchor[0]:
        if step == anchor[0]:
            return anchor[1]  # the LR the run had there, bit for bit
        start, peak = anchor
    progress = min(1.0, (step - start) / max(1, total_steps - start))
    if cfg.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        shape = 1.0 - progress
    return cfg.min_lr_ratio + (peak - cfg.min_lr_ratio) * shape


def build_optimizer(param_groups: list[dict], cfg: Config) -> torch.optim.Optimizer:
    """AdamW over the model family's parameter groups (ModelFamily.param_groups: weight decay on
    matrices only, as nanoGPT; an MoE family separates its experts).

    With optimizer offload the step runs on the CPU in DeepSpeedCPUAdam (DeepSpeed requires it);
    otherwise torch's fused AdamW, whose CPU kernel steps ~3.5x faster than the default one here
    (1.7 vs 5.9 ms a step on the 3M-parameter demo model, bench/trainer_overhead.py's profile).
    """
    o = cfg.optim
    groups = [g for g in param_groups if g["params"]]
    if cfg.parallel.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)


@dataclass(frozen=True)
class Horizon:
    """Where a schedule decays to after warmup: its end, its floor, and the anchor of its last change."""

    total_steps: int
    min_lr_ratio: float
    anchor: tuple[int, float] | None = None

    def factor(self, step: int, cfg: OptimConfig) -> float:
        return lr_factor(step, self.total_steps, dataclasses.replace(cfg, min_lr_ratio=self.min_lr_ratio), self.anchor)


class Schedule(torch.optim.lr_scheduler.LRScheduler):
    """cfg.optim.lr x lr_factor, for every parameter group; a resumed run continues it without a jump.

    Its state (saved by DeepSpeed with the engine's) records the horizon it ran with, as plain values
    (checkpoints are read with torch's weights_only loader). What megatrain/resume_policy.py lets a
    resume change takes effect here:

    - train.steps or optim.min_lr_ratio: the LR keeps its value at the resume step and decays from there
      to the (new) floor at the (new) end, with the same shape (Horizon.anchor); during warmup the warmup
      goes on and only the decay after it changes. A run resumed past its old end stays at the floor.
    - optim.lr, the peak: the schedule keeps its shape under it, so the LR changes by new/old at the
      resume step (the policy warns).

    DeepSpeed loads this state before the ZeRO optimizer's (engine.load_checkpoint), whose param groups
    bring back the checkpoint's LR (and weight decay, betas and eps, which the policy therefore refuses
    to change). So a resumed schedule sets every group's LR itself before each optimizer step (a step
    pre-hook): the first step after the resume already runs at the config's LR. It sets all groups it
    sees alike; ZeRO-1/2 show the optimizer one group at a time.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: Config):
        self.optim_cfg = cfg.optim
        self.peak_lr = cfg.optim.lr
        self.horizon = Horizon(cfg.train.steps, cfg.optim.min_lr_ratio)
        self._lr_hook = None
        super().__init__(optimizer)

    def lr(self, step: int) -> float:
        return self.peak_lr * self.horizon.factor(step, self.optim_cfg)

    def get_lr(self) -> list[float]:
        return [self.lr(self.last_epoch) for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        h = self.horizon
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count, "_last_lr": list(self._last_lr),
                "peak_lr": self.peak_lr, "total_steps": h.total_steps, "min_lr_ratio": h.min_lr_ratio,
                "anchor": list(h.anchor) if h.anchor else None}

    def load_state_dict(self, state: dict) -> None:
        """Continue a saved schedule from its step under this config's horizon, floor and peak.

        A state without a horizon (written by the LambdaLR megatrain used before) is taken to have run
        this config's.
        """
        step = int(state["last_epoch"])
        ours = self.horizon
        saved = Horizon(state.get("total_steps", ours.total_steps), state.get("min_lr_ratio", ours.min_lr_ratio),
                        tuple(state["anchor"]) if state.get("anchor") else None)
        anchor = None
        if step >= self.optim_cfg.warmup_steps:  # during warmup the decay has not started: nothing to anchor
            same = (saved.total_steps, saved.min_lr_ratio) == (ours.total_steps, ours.min_lr_ratio)
            anchor = saved.anchor if same else (step, saved.factor(step, self.optim_cfg))
        self.horizon = dataclasses.replace(ours, anchor=anchor)
        self.last_epoch, self._step_count = step, int(state.get("_step_count", step + 1))
        self._last_lr = self.get_lr()
        if self._lr_hook is None:
            self._lr_hook = self.optimizer.register_step_pre_hook(self._set_lr)

    def _set_lr(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        lr = self.lr(self.last_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> Schedule:
    return Schedule(optimizer, cfg)
