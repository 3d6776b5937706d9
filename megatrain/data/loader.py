"""Streaming question/answer batches from shards, partitioned by rank and DataLoader worker.

Which samples a rank's worker reads is decided by `order.py` alone; this module only reads them
and pads them into tensors. The position saved in checkpoints is the number of global samples
consumed by optimizer steps, not what workers prefetched, so a resume is exact.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections import OrderedDict

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megatrain.data.mixture import Mixture, Stage, quotas, source_seed
from megatrain.data.order import SampleOrder, micro_batch_indices, worker_micro_steps
from megatrain.data.shards import ShardSet
from megatrain.errors import CheckpointError, ConfigError, DataError

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


def seq2seq_example(question: np.ndarray, answer: np.ndarray, ids: dict, max_seq_len: int) -> tuple[list, list]:
    """Encoder ids `question <eos>` and decoder labels `answer <eos>` (T5's format: no bos, no separator).

    A question too long for the model loses its oldest tokens; an answer too long is refused.
    """
    if len(answer) + 1 > max_seq_len:
        raise ValueError(f"an answer of {len(answer)} tokens does not fit model.max_seq_len={max_seq_len}")
    return [*question[-(max_seq_len - 1):].tolist(), ids["eos"]], [*answer.tolist(), ids["eos"]]


def collate_seq2seq(examples: list[tuple[list, list]], pad_id: int,
                    sources: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad questions (input_ids, attention_mask) and answers (labels, -100 past the end); the
    model shifts the labels right behind its decoder_start_token_id to make the decoder's inputs."""
    rows, width, label_width = len(examples), max(len(q) for q, _ in examples), max(len(a) for _, a in examples)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)  # (B, T_question)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    labels = torch.full((rows, label_width), IGNORE_INDEX, dtype=torch.long)  # (B, T_answer)
    for row, (question, answer) in enumerate(examples):
        input_ids[row, : len(question)] = torch.tensor(question)
        attention_mask[row, : len(question)] = 1
        labels[row, : len(answer)] = torch.tensor(answer)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
             "real_tokens": attention_mask.sum(1) + (labels != IGNORE_INDEX).sum(1)}
    if sources is not None:
        batch["source"] = torch.tensor(sources, dtype=torch.long)
    return batch


def collate(examples: list[tuple[list, int]], pad_id: int, sources: list[int] | None = None,
            width: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example (or to `width`); labels only on the answer and its <eos>.

    `real_tokens` (B,) counts each row's unpadded tokens (as packed rows report theirs). `sources`
    (each example's subset index) comes back as `source` (B,) for per-subset loss.
    """
    width = max(width, *(len(t) for t, _ in examples))
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (tokens, answer_start) in enumerate(examples):
        t = torch.tensor(tokens)
        input_ids[row, : len(t)] = t
        labels[row, answer_start: len(t)] = t[answer_start:]
        attention_mask[row, : len(t)] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
             "real_tokens": attention_mask.sum(1)}
    if sources is not None:
        batch["source"] = torch.tensor(sources, dtype=torch.long)
    return batch


class MicroBatchStream(IterableDataset):
    """One rank's endless stream of micro-batches from `start_micro_step`; subclasses build batch i.

    Each DataLoader worker builds every num_workers-th micro-batch (`worker_micro_steps`); the
    DataLoader takes them round-robin, so the stream is the same for any worker count.
    """

    start_micro_step: int = 0

    def micro_batch(self, micro_step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def shard_files(self, micro_step: int) -> list[str]:
        """The shard files micro-batch `micro_step` reads (for the line of a worker that died on it)."""
        raise NotImplementedError

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        for micro_step in worker_micro_steps(self.start_micro_step, worker, num_workers):
            yield self.micro_batch(micro_step)


SCHEDULER_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


def ignore_scheduler_signals(_worker_id: int) -> None:
    """DataLoader worker init: outlive the scheduler's signals, but not the trainer's.

    On preemption, a time limit or a node drain, SLURM signals every process of the job step,
    workers included; torch's worker handler dies of a SIGTERM that does not come from its parent,
    and the rank would then fail mid-step instead of checkpointing at the step boundary. So the
    signals are blocked here and taken by a thread that reads who sent each (sigwaitinfo): one from
    the trainer (its DataLoader shutting workers down) or one arriving after the trainer is gone
    ends the worker, as torch's handler would; any other is left to the trainer, which got it too,
    stops at the step boundary and then stops its workers itself.
    """
    trainer = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, SCHEDULER_SIGNALS)  # threads started later inherit it

    def watch() -> None:
        while True:
            info = signal.sigwaitinfo(SCHEDULER_SIGNALS)
            if info.si_pid == trainer or os.getppid() != trainer:
                os._exit(0)

    threading.Thread(target=watch, name="scheduler-signals", daemon=True).start()


def iterate(stream: MicroBatchStream, num_workers: int):
    """The stream's batches through a DataLoader: whole batches built in `num_workers` processes.

    A worker that dies shows as a RuntimeError from `next()` ("DataLoader worker (pid(s) N) exited
    unexpectedly", within 5 s of the batch it owed), where the trainer can still checkpoint with
    every rank. torch's own SIGCHLD handler would raise it wherever this process happens to be,
    usually inside a collective that the other ranks then wait in forever; it is switched off.
    """
    if not num_workers:  # in this process: the stream itself (a DataLoader would only re-wrap each batch)
        return iter(stream)
    batches = iter(DataLoader(stream, batch_size=None, num_workers=num_workers, prefetch_factor=4,
                              worker_init_fn=ignore_scheduler_signals))
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    return _from_workers(batches, stream, num_workers)


def _from_workers(batches, stream: MicroBatchStream, num_workers: int):
    """The DataLoader's batches; a worker that died is named with the micro-batch it owed and the shard
    files that batch reads.

    A batch's tensors come over a socket of the worker's (their file descriptors); a worker killed at
    that moment surfaces as ConnectionResetError / EOFError here, before torch notices the death
    (seen once in a full test run, 2026-12-02): it is reported as torch reports a dead worker.
    """
    for micro_step in itertools.count(stream.start_micro_step):
        try:
            batch = next(batches)
        except (ConnectionError, EOFError, RuntimeError) as error:
            if isinstance(error, RuntimeError):
                if "DataLoader worker" not in str(error):
                    raise
                what = str(error).splitlines()[0].rstrip(". ")
            else:
                deadline, dead = time.monotonic() + 5, []
                while not dead and time.monotonic() < deadline:
                    dead = [str(w.pid) for w in batches._workers if not w.is_alive()]  # torch's own check
                    time.sleep(0.05)
                what = f"DataLoader worker (pid(s) {', '.join(dead) or '?'}) exited unexpectedly"
            worker = (micro_step - stream.start_micro_step) % num_workers  # worker_micro_steps: round-robin
            raise RuntimeError(f"{what}: worker {worker} of {num_workers} owed micro-batch {micro_step}, read from "
                               f"{', '.join(stream.shard_files(micro_step))}") from error
        yield batch


class QAOrder:
    """Global sample index -> (block, sample inside the block) of a Q/A shard set; pure and picklable.

    A set of one subset is read in its `SampleOrder` (a shuffled block order: a global batch comes
    from one or two blocks). A set of several subsets (one per DeepMind module, each in shards of its
    own) is a stratified `Mixture` of them, weighted by their sizes, with a window of one global batch:
    every optimizer step holds each module in proportion. A plain block order would fill each step
    from one module.
    """

    def __init__(self, shards: ShardSet, seed: int, window_samples: int):
        lengths = np.asarray(shards.block_lengths)
        if len(shards.source_names) == 1:
            self.mixture, self.orders = None, [SampleOrder(lengths, seed)]
            return
        source = np.asarray(shards.block_source)
        by_name = {name: np.flatnonzero(source == i) for i, name in enumerate(shards.source_names)}
        sizes = {name: int(lengths[blocks].sum()) for name, blocks in by_name.items()}
        try:
            share = quotas(sizes, window_samples)
        except ConfigError:
            raise DataError(f"{shards.path}: a global batch of {window_samples} samples has no room for every one "
                            f"of its {len(sizes)} subsets in proportion to their sizes {sizes}; raise "
                            "train.global_batch_size or rebuild with fewer or more even modules") from None
        self.mixture = Mixture(Stage(0, window_samples, share, {}), seed)
        self.block_ids = [by_name[name] for name in self.mixture.names]
        self.orders = [SampleOrder(lengths[by_name[name]], source_seed(seed, name)) for name in self.mixture.names]

    def locate_many(self, global_indices) -> tuple[np.ndarray, np.ndarray]:
        """(global block index, sample inside the block), both int64 arrays."""
        if self.mixture is None:
            return self.orders[0].locate_many(global_indices)
        sources, source_indices = self.mixture.locate(global_indices)
        blocks, inner = np.empty_like(sources), np.empty_like(sources)
        for s in np.unique(sources):
            here = sources == s
            local, inner[here] = self.orders[s].locate_many(source_indices[here])
            blocks[here] = self.block_ids[s][local]
        return blocks, inner


class QAStream(MicroBatchStream):
    """An endless stream of one rank's micro-batches, starting at a given micro-step."""

    def __init__(self, shards: ShardSet, seed: int, rank: int, dp_size: int, micro_batch_size: int,
                 max_seq_len: int, start_micro_step: int = 0, global_batch_size: int = 0, fixed_width: bool = False,
                 task: str = "causal_lm"):
        self.shards = shards
        self.fixed_width, self.task = fixed_width, task
        self.order = QAOrder(shards, seed, global_batch_size or dp_size * micro_batch_size)
        self.rank, self.dp_size, self.micro_batch_size = rank, dp_size, micro_batch_size
        self.max_seq_len = max_seq_len
        self.start_micro_step = start_micro_step
        m = shards.manifest
        self.ids = {"bos": m["bos_id"], "sep": m["sep_id"], "eos": m["eos_id"], "pad": m["pad_id"]}
        self._blocks: OrderedDict[int, list] = OrderedDict()

    def _block(self, index: int) -> list:
        # Consecutive indices of a subset fall in the same block, so a few blocks per subset suffice.
        if index not in self._blocks:
            self._blocks[index] = self.shards.read_block(index)
            if len(self._blocks) > 4 * len(self.shards.source_names):
                self._blocks.popitem(last=False)
        return self._blocks[index]

    def shard_files(self, micro_step: int) -> list[str]:
        indices = micro_batch_indices(micro_step, self.rank, self.dp_size, self.micro_batch_size)
        blocks, _ = self.order.locate_many(np.asarray(indices))
        return sorted({str(self.shards.block_file(b)) for b in blocks.tolist()})

    def micro_batch(self, micro_step: int) -> dict[str, torch.Tensor]:
        indices = micro_batch_indices(micro_step, self.rank, self.dp_size, self.micro_batch_size)
        blocks, inner = self.order.locate_many(np.asarray(indices))
        make = seq2seq_example if self.task == "seq2seq" else qa_example
        examples = [make(*self._block(block)[i], self.ids, self.max_seq_len)
                    for block, i in zip(blocks.tolist(), inner.tolist())]
        sources = [self.shards.block_source[b] for b in blocks.tolist()]
        if self.task == "seq2seq":
            return collate_seq2seq(examples, self.ids["pad"], sources)
        return collate(examples, self.ids["pad"], sources, width=self.max_seq_len if self.fixed_width else 0)


class QALoader:
    """Iterator over micro-batches that knows its exact position for checkpoints."""

    def __init__(self, shards: ShardSet, seed: int, rank: int, dp_size: int, micro_batch_size: int,
                 max_seq_len: int, num_workers: int, global_batch_size: int = 0, fixed_width: bool = False,
                 task: str = "causal_lm"):
        """fixed_width: pad every micro-batch to max_seq_len (ModelFamily.fixed_length). task: the
        collator, `causal_lm` (question and answer in one row) or `seq2seq` (ModelFamily.task)."""
        self._args = (shards, seed, rank, dp_size, micro_batch_size, max_seq_len)
        self.fixed_width, self.task = fixed_width, task
        self.global_batch_size = global_batch_size or dp_size * micro_batch_size
        self.num_workers = num_workers
        self.source_names = shards.source_names  # batches carry `source`, an index into these
        self.micro_step = 0
        self._iter = None

    @property
    def samples_per_micro_step(self) -> int:
        return self._args[3] * self._args[4]

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            stream = QAStream(*self._args, start_micro_step=self.micro_step, global_batch_size=self.global_batch_size,
                              fixed_width=self.fixed_width, task=self.task)
            self._iter = iterate(stream, self.num_workers)
        batch = next(self._iter)
        self.micro_step += 1
        return batch

    def close(self) -> None:
        """Stop the DataLoader workers (they ignore the scheduler's signals); the next batch restarts them."""
        self._iter = None

    def metrics(self) -> dict:
        """Nothing per source to report: one dataset."""
        return {}

    def state_dict(self) -> dict:
        state = {"consumed_samples": self.micro_step * self.samples_per_micro_step, "seed": self._args[1],
                 "num_samples": self._args[0].num_samples}
        if len(self.source_names) > 1:  # the order is stratified per global batch (QAOrder)
            state["global_batch_size"] = self.global_batch_size
        return state

    def load_state_dict(self, state: dict) -> None:
        consumed = int(state["consumed_samples"])
        if state.get("seed") != self._args[1] or state.get("num_samples") != self._args[0].num_samples:
            raise CheckpointError(
                f"the checkpoint's data position was for seed {state.get('seed')} over {state.get('num_samples')} "
                f"samples, this run has seed {self._args[1]} over {self._args[0].num_samples}; resume with the "
                "same run.seed and data.shards, or start a new run.dir")
        if len(self.source_names) > 1 and state.get("global_batch_size") != self.global_batch_size:
            raise CheckpointError(
                f"the checkpoint's data order mixed {len(self.source_names)} modules per global batch of "
                f"{state.get('global_batch_size')} samples, this run's global batch is {self.global_batch_size}; "
                "resume with the same train.global_batch_size")
        if consumed % self.samples_per_micro_step:
            raise CheckpointError(
                f"the checkpoint consumed {consumed} samples, not a whole number of this run's micro-steps of "
                f"{self.samples_per_micro_step}; resume with the same global batch size")
        self.micro_step = consumed // self.samples_per_micro_step
        self._iter = None
