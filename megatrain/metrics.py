"""Throughput, MFU and loss: metrics.jsonl, TensorBoard events and a tqdm bar, from rank 0."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from megatrain.parallel.dims import World
from megatrain.parallel.host import all_reduce_sum
from megatrain.run_dir import RunDir

# Dense bf16 peak FLOP/s per device, from the vendors' datasheets (as torchtitan's get_peak_flops).
# CPUs are absent on purpose: their peak depends on cores, clocks and ISA, so no MFU is reported.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L40S": 362e12,
                   "L4": 121e12, "V100": 125e12}


def peak_flops(device_type: str, precision: str) -> float | None:
    """The device's peak for MFU, or None where it is not known (CPUs, fp32, unlisted GPUs)."""
    if device_type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


class Metrics:
    """Collects per-step numbers on every rank and writes one line per `log.interval` steps on rank 0.

    Loss is averaged over ranks and over the steps since the last line; tokens/s counts the real
    (unpadded) tokens of all ranks, so padding does not inflate it. With several data sources, each
    line also has `loss/<source>`: that source's token-weighted loss over the same steps. A family whose
    model reports named figures (ModelOutput.parts: an MoE's `loss_part/aux`, `moe/layer1/load_e0`) gets
    their averages too. Tokens of a tensor-parallel group count once.
    """

    def __init__(self, run_dir: str, log_interval: int, world: World, total_steps: int, start_step: int,
                 flops_per_token: float, peak: float | None, tensorboard: bool, progress: bool,
                 counters=None, restarts: int = 0, source_names: list[str] = ()):
        self.log_interval, self.world, self.restarts = log_interval, world, restarts
        self.counters = counters  # e.g. the loader's per-source token counts, added to every line
        self.flops_per_token, self.peak = flops_per_token, peak
        self.source_names = list(source_names)
        self._lm_sum, self._labels, self._extra_sum, self._tokens, self._steps = 0.0, 0.0, 0.0, 0.0, 0
        self._parts: dict[str, float] = {}  # the family's named figures (an MoE aux loss, ...), summed
        self._source_sums = [0.0] * (2 * len(self.source_names))  # loss sums, then label tokens
        self._t0 = time.perf_counter()
        self.skipped_steps = 0  # DeepSpeed's count (engine.skipped_steps, kept in checkpoints)
        self.last: dict = {}
        self._jsonl = self._tb = self._bar = None
        if world.is_main:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self._jsonl = open(RunDir(run_dir).metrics, "a", buffering=1)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(RunDir(run_dir).tensorboard))
            if progress:
                from tqdm import tqdm
                self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def step(self, step: int, result, lr: float, extra: dict | None = None) -> dict | None:
        """Count one optimizer step's StepResult; log a line every log.interval steps (or with `extra`)."""
        self._lm_sum += result.lm_loss_sum
        self._labels += result.label_tokens
        self._extra_sum += result.extra_loss
        self._tokens += result.tokens
        self._steps += 1
        for name, value in result.parts.items():
            self._parts[name] = self._parts.get(name, 0.0) + value
        if len(result.source_loss) == len(self.source_names):
            for i, value in enumerate([*result.source_loss, *result.source_tokens]):
                self._source_sums[i] += value
        if self._bar is not None:
            self._bar.update(1)
        if step % self.log_interval and not extra:
            return None
        part_names = sorted(self._parts)  # the same on every rank: the family names them
        lm_sum, labels, extra_sum, token_sum, *sums = all_reduce_sum([
            self._lm_sum, self._labels, self._extra_sum, self._tokens, *self._source_sums,
            *(self._parts[p] for p in part_names)])
        source_sums, part_sums = sums[: len(self._source_sums)], sums[len(self._source_sums):]
        elapsed = time.perf_counter() - self._t0
        token_sum /= self.world.tp  # the ranks of a tensor-parallel group train on the same tokens
        # The objective (objective.py): every label token of the interval weighs the same, plus the
        # family's extra terms averaged over steps and ranks. (TP ranks count their shared tokens alike.)
        lm_loss = lm_sum / max(labels, 1.0)
        record = {"step": step, "loss": lm_loss + extra_sum / (self._steps * self.world.world_size), "lr": lr,
                  "tokens_per_s": token_sum / elapsed, "restarts": self.restarts,
                  "train/skipped_steps": self.skipped_steps}
        if any(name.startswith("loss_part/") for name in part_names):
            record["loss_part/lm"] = lm_loss
        record.update({name: value / (self._steps * self.world.world_size)
                       for name, value in zip(part_names, part_sums)})
        if result.grad_norm is not None:  # the same on every rank: the norm is global
            record["grad_norm"] = result.grad_norm
        n = len(self.source_names)
        if n > 1:
            record.update({f"loss/{name}": source_sums[i] / source_sums[n + i]
                           for i, name in enumerate(self.source_names) if source_sums[n + i]})
            # The tokens those means are over (the loss weighs them alike); TP ranks count theirs alike.
            record.update({f"label_tokens/{name}": source_sums[n + i] / self.world.tp
                           for i, name in enumerate(self.source_names)})
        if self.peak:
            record["mfu"] = self.flops_per_token * record["tokens_per_s"] / (self.peak * self.world.world_size)
        record.update(self.counters() if self.counters else {})
        record.update(extra or {})
        self._lm_sum, self._labels, self._extra_sum, self._tokens, self._steps = 0.0, 0.0, 0.0, 0.0, 0
        self._t0 = time.perf_counter()
        self._parts = {}
        self._source_sums = [0.0] * (2 * n)
        self.write(record)
        return record

    def skipped_step(self, step: int, reason: str, total: int, data: dict, sources: list[str]) -> None:
        """A line for a step whose update was skipped (non-finite loss or gradient norm, see guard.py),
        with the data position before it and the sources its rows came from; its loss counts nowhere."""
        self.skipped_steps = total
        if self._bar is not None:
            self._bar.update(1)
        self.write({"step": step, "skipped": reason, "train/skipped_steps": total, "data": data, "sources": sources})

    def write(self, record: dict) -> None:
        self.last = record
        if not self.world.is_main:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])
        if self._bar is not None and "loss" in record:
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")

    def close(self) -> None:
        for handle in (self._bar, self._tb, self._jsonl):
            if handle is not None:
                handle.close()
