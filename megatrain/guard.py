"""Non-finite steps: skipped on every rank, counted, logged with their data, and a stop when they pile up.

DeepSpeed's ZeRO optimizers (stages 1-3, fp32 and bf16 with `bf16.check_grad_overflow`) already
refuse to apply a step whose global gradient norm is inf or NaN: the norm is all-reduced, so every
rank skips the same step, and the LR schedule does not advance (engine._take_model_step). A NaN loss
on one rank makes NaN gradients there, which the gradient all-reduce spreads, so it is caught the
same way. This module reads that verdict (`engine.was_step_applied()`), records each skipped step in
metrics.jsonl with the samples it read, and stops the run when more than train.max_skipped_steps
fall within train.skip_window steps: a run that keeps producing NaN needs a person (a lower LR, or
skipping a data range), not a loop. ZeRO-0 in fp32 has no such check in DeepSpeed (its optimizer
steps whatever the gradients), so there a non-finite step stops the run at once.

Fault injection (for tests/faults/ and drills; docs/reliability.md): MEGATRAIN_INJECT_NAN_LOSS="3,5@1"
makes the loss NaN at steps 3 and 5 on rank 1 ("3,5" alone: on every rank).
"""

from __future__ import annotations

import math
import os
from collections import deque

from megatrain.errors import TrainingError

INJECT_NAN_LOSS = "MEGATRAIN_INJECT_NAN_LOSS"


def injected_nan(step: int, rank: int) -> bool:
    """Whether the fault-injection variable asks for a NaN loss at this step on this rank."""
    spec = os.environ.get(INJECT_NAN_LOSS, "")
    if not spec:
        return False
    steps, _, ranks = spec.partition("@")
    return step in {int(s) for s in steps.split(",")} and (not ranks or rank in {int(r) for r in ranks.split(",")})


class NonFiniteGuard:
    """Owns the skipped-step window; the loop calls `check` after every optimizer step."""

    def __init__(self, max_skipped: int, window: int):
        self.max_skipped, self.window = max_skipped, window
        self.recent: deque[int] = deque()

    def check(self, step: int, loss: float, grad_norm: float | None, applied: bool) -> str | None:
        """None for a good step; else why it was skipped ("loss=nan, grad_norm=inf"). Raises
        TrainingError when the step could not be skipped (then the weights are already damaged)."""
        finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
        if applied and finite:
            return None
        reason = f"loss={loss:.4g}, grad_norm={grad_norm:.4g}" if grad_norm is not None else f"loss={loss:.4g}"
        if applied:  # ZeRO-0 in fp32: DeepSpeed applied it
            raise TrainingError(f"step {step} had a non-finite {reason} and ZeRO-0 in fp32 cannot skip a step (only "
                                "DeepSpeed's ZeRO and bf16 optimizers check gradients), so the weights are damaged; "
                                "resume from the last checkpoint with --resume, with parallel.zero_stage >= 1 or a "
                                "lower optim.lr")
        self.recent.append(step)
        while self.recent and self.recent[0] <= step - self.window:
            self.recent.popleft()
        return reason

    def exceeded(self) -> bool:
        return len(self.recent) > self.max_skipped

    def stop_message(self, step: int, saved: str) -> str:
        return (f"steps {', '.join(map(str, self.recent))} had a non-finite loss or gradient norm and were skipped: "
                f"{len(self.recent)} within {self.window} steps, more than train.max_skipped_steps="
                f"{self.max_skipped}. {saved} holds the weights from before them, the data after step {step}; "
                "resume with --resume and a lower --optim.lr (metrics.jsonl names each skipped step's samples)")
