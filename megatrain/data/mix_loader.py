"""Streaming packed rows from a weighted mixture of token-shard datasets.

Global sample g of the run is decided by pure functions: `Mixture` picks (source, that source's
sample index), the source's `SampleOrder` picks (block, row). Ranks and DataLoader workers only
compute which g are theirs (`micro_batch_indices`, `worker_micro_steps`), so a run resumed with
another number of data-parallel ranks at the same global batch sees the same global sequence.

Per-source counters (samples and real tokens) advance by whole global batches, computed from the
same pure functions on every rank: no communication, and identical in every rank's checkpoint.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from megatrain.data.loader import IGNORE_INDEX, MicroBatchStream, iterate
from megatrain.data.mixture import Mixture, Stage, quotas, source_seed
from megatrain.data.order import SampleOrder, micro_batch_indices
from megatrain.data.packed import PackedDataset
from megatrain.errors import CheckpointError, ConfigError, DataError


def open_mixture(sources: dict, max_seq_len: int) -> dict[str, PackedDataset]:
    """Opens every source of data.sources and checks they can be mixed.

    Raises:
        DataError: A dataset is missing or broken, or the sources differ in tokenizer or seq_len.
        ConfigError: Rows are longer than model.max_seq_len.
    """
    datasets = {name: PackedDataset(source.path) for name, source in sources.items()}
    names = sorted(datasets)
    first = datasets[names[0]]
    for name in names[1:]:
        other = datasets[name]
        if other.manifest["tokenizer"]["files"] != first.manifest["tokenizer"]["files"]:
            raise DataError(f"data.sources.{name} ({other.path}) was built with another tokenizer than "
                            f"data.sources.{names[0]} ({first.path}); build every source with the same --tokenizer")
        if other.seq_len != first.seq_len:
            raise DataError(f"data.sources.{name} has rows of {other.seq_len} tokens, data.sources.{names[0]} "
                            f"of {first.seq_len}; build every source with the same --seq-len")
    if first.seq_len > max_seq_len:
        raise ConfigError(f"the datasets hold rows of {first.seq_len} tokens but model.max_seq_len={max_seq_len}; "
                          f"set model.max_seq_len={first.seq_len} or rebuild with --seq-len {max_seq_len}")
    return datasets


def row_positions(doc_starts: np.ndarray, seq_len: int) -> np.ndarray:
    """Position ids that restart at 0 at the row's start and at each document start in it."""
    starts = np.zeros(seq_len, dtype=np.int64)
    starts[doc_starts] = doc_starts
    return np.arange(seq_len) - np.maximum.accumulate(starts)


def packed_batch(rows: list[tuple[np.ndarray, int, np.ndarray]], attention_reset: bool) -> dict[str, torch.Tensor]:
    """Stack rows into a causal-LM batch.

    Args:
        rows: (tokens of one row, its real token count, document starts inside the row) per sample.
        attention_reset: Give each document its own positions. transformers turns position ids
            that restart into a block-diagonal mask (`find_packed_sequence_indices`), so no token
            attends across a document boundary, and the boundary token takes no loss.

    Returns:
        input_ids and labels (B, T), position_ids too with attention_reset, and real_tokens (B,) for
        throughput (not a model input). Padding takes no loss.
    """
    input_ids = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64))  # (B, T)
    labels = input_ids.clone()
    for i, (_, real, starts) in enumerate(rows):
        if real < labels.shape[1]:
            labels[i, real:] = IGNORE_INDEX
        if attention_reset and len(starts):
            labels[i, torch.from_numpy(starts)] = IGNORE_INDEX  # predicted from the previous document
    batch = {"input_ids": input_ids, "labels": labels,
             "real_tokens": torch.tensor([r[1] for r in rows], dtype=torch.long)}
    if attention_reset:
        seq_len = input_ids.shape[1]
        batch["position_ids"] = torch.from_numpy(np.stack([row_positions(r[2], seq_len) for r in rows]))
    return batch


class MixtureSampler:
    """Global sample indices -> (source position, block, row) for one stage; pure and picklable."""

    def __init__(self, datasets: dict[str, PackedDataset], stage: Stage, seed: int):
        self.mixture = Mixture(stage, seed)
        self.names = self.mixture.names
        self.datasets = [datasets[n] for n in self.names]
        self.orders = [SampleOrder(d.block_rows.tolist(), source_seed(seed, n)) for n, d in zip(self.names, self.datasets)]

    def locate(self, global_indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sources, source_indices = self.mixture.locate(global_indices)
        if len(self.orders) == 1:  # the common one-source case, without the masks (this runs per micro-batch)
            return (sources, *self.orders[0].locate_many(source_indices))
        blocks, rows = np.empty_like(sources), np.empty_like(sources)
        for s in np.unique(sources):
            here = sources == s
            blocks[here], rows[here] = self.orders[s].locate_many(source_indices[here])
        return sources, blocks, rows

    def real_tokens(self, sources: np.ndarray, blocks: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Real (unpadded) tokens of located samples."""
        out = np.empty_like(sources)
        for s in np.unique(sources):
            here = sources == s
            out[here] = self.datasets[s].real_tokens(blocks[here], rows[here])
        return out


class PackedStream(MicroBatchStream):
    """An endless stream of one rank's micro-batches of packed rows, from a given micro-step."""

    def __init__(self, sampler: MixtureSampler, rank: int, dp_size: int, micro_batch_size: int,
                 attention_reset: bool, start_micro_step: int = 0):
        self.sampler = sampler
        self.rank, self.dp_size, self.micro_batch_size = rank, dp_size, micro_batch_size
        self.attention_reset, self.start_micro_step = attention_reset, start_micro_step
        self._blocks: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _block(self, source: int, block: int) -> tuple[np.ndarray, np.ndarray]:
        key = (source, block)
        if key not in self._blocks:
            self._blocks[key] = self.sampler.datasets[source].read_block(block)
            if len(self._blocks) > 8:  # consecutive indices share blocks; a few per source suffice
                self._blocks.popitem(last=False)
        return self._blocks[key]

    def shard_files(self, micro_step: int) -> list[str]:
        indices = micro_batch_indices(micro_step, self.rank, self.dp_size, self.micro_batch_size)
        sources, blocks, _ = self.sampler.locate(np.asarray(indices))
        datasets = self.sampler.datasets
        return sorted({str(datasets[s].block_file(b)) for s, b in zip(sources.tolist(), blocks.tolist())})

    def micro_batch(self, micro_step: int) -> dict[str, torch.Tensor]:
        indices = micro_batch_indices(micro_step, self.rank, self.dp_size, self.micro_batch_size)
        sources, blocks, rows = self.sampler.locate(np.asarray(indices))
        real = self.sampler.real_tokens(sources, blocks, rows)
        samples = []
        for s, b, r, n in zip(sources.tolist(), blocks.tolist(), rows.tolist(), real.tolist()):
            tokens, docs = self._block(s, b)
            seq_len = tokens.shape[1]
            first, last = np.searchsorted(docs, [r * seq_len, (r + 1) * seq_len])
            samples.append((tokens[r], n, docs[first:last] - r * seq_len))
        return {**packed_batch(samples, self.attention_reset), "source": torch.as_tensor(sources, dtype=torch.long)}


class MixtureLoader:
    """Iterator over one rank's micro-batches that knows its exact position and per-source counters.

    Args:
        datasets: Source name -> dataset.
        weights: Source name -> weight (any positive scale).
        seed: run.seed.
        rank, dp_size, micro_batch_size: This rank's place in the data-parallel world.
        global_batch_size: Samples per optimizer step (counters advance by these).
        mixture_window: Global batches per stratification window.
        attention_reset: See `packed_batch`.
        num_workers: DataLoader worker processes.
        skipped_shards: Shards left out after a failed hash check, reported in the metrics.
    """

    def __init__(self, datasets: dict[str, PackedDataset], weights: dict[str, float], seed: int, rank: int,
                 dp_size: int, micro_batch_size: int, global_batch_size: int, mixture_window: int,
                 attention_reset: bool, num_workers: int, skipped_shards: list[str] = ()):
        self.datasets, self.weights, self.seed = datasets, dict(weights), seed
        self.skipped_shards = list(skipped_shards)
        self.rank, self.dp_size, self.micro_batch_size = rank, dp_size, micro_batch_size
        self.global_batch_size = global_batch_size
        self.window_samples = mixture_window * global_batch_size
        self.attention_reset, self.num_workers = attention_reset, num_workers
        self.stages = [Stage(0, self.window_samples, quotas(self.weights, self.window_samples),
                             {n: 0 for n in self.weights})]
        self._counts = {n: {"samples": 0, "tokens": 0} for n in sorted(self.weights)}
        self._counted = 0  # global samples that self._counts includes
        self.micro_step = 0
        self._sampler = MixtureSampler(datasets, self.stages[-1], seed)
        self._iter = None

    @property
    def source_names(self) -> list[str]:
        """What a batch's `source` indexes (a resume with new weights may add a source)."""
        return self._sampler.names

    @property
    def samples_per_micro_step(self) -> int:
        return self.dp_size * self.micro_batch_size

    @property
    def consumed_samples(self) -> int:
        return self.micro_step * self.samples_per_micro_step

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            stream = PackedStream(self._sampler, self.rank, self.dp_size, self.micro_batch_size,
                                  self.attention_reset, start_micro_step=self.micro_step)
            self._iter = iterate(stream, self.num_workers)
        batch = next(self._iter)
        self.micro_step += 1
        return batch

    def close(self) -> None:
        """Stop the DataLoader workers (they ignore the scheduler's signals); the next batch restarts them."""
        self._iter = None

    @property
    def counters(self) -> dict[str, dict[str, int]]:
        """Samples and real tokens per source over the global batches consumed so far.

        They are a pure function of the position, so they are counted when asked for (a metrics line,
        a checkpoint), for all global batches since the last time in one vectorized pass, not per batch.
        """
        end = self.consumed_samples - self.consumed_samples % self.global_batch_size
        if end > self._counted:
            self._count(self._counted, end)
            self._counted = end
        return self._counts

    def _count(self, start: int, end: int) -> None:
        sources, blocks, rows = self._sampler.locate(np.arange(start, end))
        real = self._sampler.real_tokens(sources, blocks, rows)
        samples = np.bincount(sources, minlength=len(self._sampler.names))
        tokens = np.bincount(sources, weights=real, minlength=len(self._sampler.names))
        for s, name in enumerate(self._sampler.names):
            self._counts[name]["samples"] += int(samples[s])
            self._counts[name]["tokens"] += int(tokens[s])

    def metrics(self) -> dict[str, int]:
        """Cumulative real tokens per source (and shards skipped), for the metrics log."""
        out = {f"data/tokens/{name}": c["tokens"] for name, c in self.counters.items()}
        if self.skipped_shards:
            out["data/skipped_shards"] = len(self.skipped_shards)
        return out

    def state_dict(self) -> dict:
        return {"kind": "mixture", "consumed_samples": self.consumed_samples, "seed": self.seed,
                "stages": [s.to_dict() for s in self.stages], "counters": self.counters,
                "rows": {name: d.num_rows for name, d in self.datasets.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint; with other weights (or window), a new stage starts here."""
        if state.get("kind") != "mixture":
            raise CheckpointError("the checkpoint was trained on question/answer shards (data.shards), this run "
                                  "streams a mixture (data.sources); resume with the same kind of data")
        if state["seed"] != self.seed:
            raise CheckpointError(f"the checkpoint's data order used run.seed={state['seed']}, this run has "
                                  f"{self.seed}; resume with the same seed")
        for name, rows in state["rows"].items():
            if name in self.datasets and self.datasets[name].num_rows != rows:
                raise CheckpointError(
                    f"data.sources.{name} has {self.datasets[name].num_rows} rows, the checkpoint's had {rows}; "
                    "a source must keep its dataset across a resume (give a new dataset a new name)")
        consumed = int(state["consumed_samples"])
        if consumed % self.global_batch_size:
            raise CheckpointError(f"the checkpoint consumed {consumed} samples, not a whole number of global "
                                  f"batches of {self.global_batch_size}; resume with the same global batch size")
        self.stages = [Stage.from_dict(s) for s in state["stages"]]
        self._counts = {n: dict(c) for n, c in state["counters"].items()}
        self._counted = consumed
        for name in self.weights:
            self._counts.setdefault(name, {"samples": 0, "tokens": 0})
        wanted = quotas(self.weights, self.window_samples)
        last = self.stages[-1]
        if last.quotas != wanted or last.window_samples != self.window_samples:
            offsets = {name: self._counts[name]["samples"] for name in self.weights}
            self.stages.append(Stage(consumed, self.window_samples, wanted, offsets))
        self.micro_step = consumed // self.samples_per_micro_step
        self._sampler = MixtureSampler(self.datasets, self.stages[-1], self.seed)
        self._iter = None
