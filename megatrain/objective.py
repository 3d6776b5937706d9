"""The training objective: the mean cross entropy over every label token of an optimizer step.

Every answer (or document) token weighs the same, however the step's rows are split into
micro-batches and data-parallel ranks: the loss of a micro-batch is its *summed* token loss divided
by the label tokens of the whole step (all micro-batches, all DP ranks), as Megatron-LM's per-token
loss and transformers' `num_items_in_batch` do. A mean of per-micro-batch means would weigh a short
answer's tokens more when it shares a micro-batch with few others, so the gradient would depend on
micro_batch_size, the accumulation steps and the DP size.

DeepSpeed divides each micro-batch's loss by the accumulation steps (engine.backward, scale_wrt_gas)
and averages gradients over the data-parallel ranks, so the loss handed to it is scaled back up by
accumulation x dp (`step_scale`).

The per-token loss is computed once, in fp32 (as transformers' ForCausalLMLoss and Megatron's
`output.float()` do: bf16 logits would give each token's loss ~3 significant digits), and serves both
the objective and the per-source sums, so the logits are never copied twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatrain.data.loader import IGNORE_INDEX
from megatrain.parallel import parallelize


def targets(labels: torch.Tensor, task: str) -> torch.Tensor:
    """The label each logit position is scored against (B, T): a decoder's position t predicts label t+1
    (shifted by padding the labels, not by slicing the logits, which would copy them); a seq2seq
    decoder's logits line up with its labels."""
    if task == "causal_lm":
        return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return labels


def label_counts(labels: torch.Tensor, task: str) -> torch.Tensor:
    """Label tokens per row (B,), from the host-side labels: no device sync."""
    return (targets(labels, task) != IGNORE_INDEX).sum(1)


def label_tokens(batches: list[dict], task: str) -> int:
    """Label tokens of a step's micro-batches on this rank (host tensors: no sync)."""
    return sum(int(label_counts(b["labels"], task).sum()) for b in batches)


def step_scale(step_label_tokens: float, accumulation: int, dp: int) -> float:
    """What a micro-batch's summed token loss is multiplied by before engine.backward, so that the
    step's gradient is that of the mean over its `step_label_tokens` (all micro-batches, all DP ranks)."""
    return accumulation * dp / max(step_label_tokens, 1.0)


def token_loss(logits: torch.Tensor, labels: torch.Tensor, task: str, split_vocab: bool) -> torch.Tensor:
    """Per-token cross entropy (B, T) in fp32, 0 where the label is ignored. split_vocab: the logits are
    this tensor-parallel rank's slice of the vocabulary (a TP collective then combines them)."""
    return parallelize.token_cross_entropy(logits, targets(labels, task), IGNORE_INDEX, split_vocab)
