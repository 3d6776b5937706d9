"""Streaming question/answer batches from shards, partitioned by rank and DataLoader worker.

Which samples a rank's worker reads is decided by `order.py` alone; this module only reads them
and pads them into tensors. The position saved in checkpoints is the number of global samples
consumed by optimizer steps, not what workers prefetched, so a resume is exact.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megatrain.data.order import SampleOrder, micro_batch_indices, worker_micro_steps
from megatrain.data.shards import ShardSet
from megatrain.errors import CheckpointError

IGNORE_INDEX = -100  # labels that take no loss (question, separator, padding)


def qa_example(question: np.ndarray, answer: np.ndarray, ids: dict, max_seq_len: int) -> tuple[list, int]:
    """Token ids `<bos> question <sep> answer <eos>` and the position where the loss starts.

    A question too long for the model loses its oldest tokens, never the answer.
    """
    room = max_seq_len - len(answer) - 3
    if room < 1:
        raise ValueError(f"an answer of {len(answer)} tokens does not fit model.max_seq_len={max_seq_len}")
    question = question[-room:]
    tokens = [ids["bos"], *question.tolist(), ids["sep"], *answer.tolist(), ids["eos"]]
    return tokens, len(question) + 2


def collate(examples: list[tuple[list, int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; labels only on the answer and its <eos>."""
    width = max(len(t) for t, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (tokens, answer_start) in enumerate(examples):
        t = torch.tensor(tokens)
        input_ids[row, : len(t)] = t
        labels[row, answer_start: len(t)] = t[answer_start:]
        attention_mask[row, : len(t)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class MicroBatchStream(IterableDataset):
    """One rank's endless stream of micro-batches from `start_micro_step`; subclasses build batch i.

    Each DataLoader worker builds every num_workers-th micro-batch (`worker_micro_steps`); the
    DataLoader takes them round-robin, so the stream is the same for any worker count.
    """

    start_micro_step: int = 0

    def micro_batch(self, micro_step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        for micro_step in worker_micro_steps(self.start_micro_step, worker, num_workers):
            yield self.micro_batch(micro_step)


def iterate(stream: MicroBatchStream, num_workers: int):
    """The stream's batches through a DataLoader: whole batches built in `num_workers` processes."""
    return iter(DataLoader(stream, batch_size=None, num_workers=num_workers,
                           prefetch_factor=4 if num_workers else None))


class QAStream(MicroBatchStream):
    """An endless stream of one rank's micro-batches, starting at a given micro-step."""

    def __init__(self, shards: ShardSet, seed: int, rank: int, dp_size: int, micro_batch_size: int,
                 max_seq_len: int, start_micro_step: int = 0):
        self.shards = shards
        self.order = SampleOrder(shards.block_lengths, seed)
        self.rank, self.dp_size, self.micro_batch_size = rank, dp_size, micro_batch_size
        self.max_seq_len = max_seq_len
        self.start_micro_step = start_micro_step
        m = shards.manifest
        self.ids = {"bos": m["bos_id"], "sep": m["sep_id"], "eos": m["eos_id"], "pad": m["pad_id"]}
        self._blocks: OrderedDict[int, list] = OrderedDict()

    def _block(self, index: int) -> list:
        # Consecutive global indices fall in the same block, so a handful of blocks is enough cache.
        if index not in self._blocks:
            self._blocks[index] = self.shards.read_block(index)
            if len(self._blocks) > 4:
                self._blocks.popitem(last=False)
        return self._blocks[index]

    def micro_batch(self, micro_step: int) -> dict[str, torch.Tensor]:
        examples = []
        for g in micro_batch_indices(micro_step, self.rank, self.dp_size, self.micro_batch_size):
            block, inner = self.order.locate(g)
            question, answer = self._block(block)[inner]
            examples.append(qa_example(question, answer, self.ids, self.max_seq_len))
        return collate(examples, self.ids["pad"])


class QALoader:
    """Iterator over micro-batches that knows its exact position for checkpoints."""

    def __init__(self, shards: ShardSet, seed: int, rank: int, dp_size: int, micro_batch_size: int,
                 max_seq_len: int, num_workers: int):
        self._args = (shards, seed, rank, dp_size, micro_batch_size, max_seq_len)
        self.num_workers = num_workers
        self.micro_step = 0
        self._iter = None

    @property
    def samples_per_micro_step(self) -> int:
        return self._args[3] * self._args[4]

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            self._iter = iterate(QAStream(*self._args, start_micro_step=self.micro_step), self.num_workers)
        self.micro_step += 1
        return next(self._iter)

    def metrics(self) -> dict:
        """Nothing per source to report: one dataset."""
        return {}

    def state_dict(self) -> dict:
        return {"consumed_samples": self.micro_step * self.samples_per_micro_step, "seed": self._args[1],
                "num_samples": self._args[0].num_samples}

    def load_state_dict(self, state: dict) -> None:
        consumed = int(state["consumed_samples"])
        if state.get("seed") != self._args[1] or state.get("num_samples") != self._args[0].num_samples:
            raise CheckpointError(
                f"the checkpoint's data position was for seed {state.get('seed')} over {state.get('num_samples')} "
                f"samples, this run has seed {self._args[1]} over {self._args[0].num_samples}; resume with the "
                "same run.seed and data.shards, or start a new run.dir")
        if consumed % self.samples_per_micro_step:
            raise CheckpointError(
                f"the checkpoint consumed {consumed} samples, not a whole number of this run's micro-steps of "
                f"{self.samples_per_micro_step}; resume with the same global batch size")
        self.micro_step = consumed // self.samples_per_micro_step
        self._iter = None
