"""Sample order as pure functions of (seed, epoch, global sample index) and the world's shape.

The dataset is a list of blocks (a few hundred samples each, stored together in a shard). An
epoch visits the blocks in a seeded permutation and the samples of each block in another seeded
permutation, so reads stay block-local while the order is still shuffled. Global sample index g
lives in epoch g // num_samples. Ranks and DataLoader workers never decide anything: they compute
which global indices are theirs. Tests simulate thousands of ranks with these functions alone.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


class SampleOrder:
    """Maps a global sample index to (block, sample within block) for a fixed dataset and seed."""

    def __init__(self, block_lengths: list[int], seed: int | tuple[int, ...]):
        self.block_lengths = np.asarray(block_lengths, dtype=np.int64)
        self.num_samples = int(self.block_lengths.sum())
        self.seed = tuple(seed) if isinstance(seed, tuple) else (seed,)
        if self.num_samples == 0:
            raise ValueError("an empty dataset has no sample order")

    @lru_cache(maxsize=2)
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        blocks = np.random.default_rng([*self.seed, epoch]).permutation(len(self.block_lengths))
        starts = np.concatenate([[0], np.cumsum(self.block_lengths[blocks])])
        return blocks, starts

    def locate(self, global_index: int) -> tuple[int, int]:
        """Returns (block index, sample index inside that block's stored order)."""
        epoch, pos = divmod(int(global_index), self.num_samples)
        blocks, starts = self._epoch(epoch)
        slot = int(np.searchsorted(starts, pos, side="right")) - 1
        block = int(blocks[slot])
        return block, int(self._inner(epoch, block)[pos - starts[slot]])

    def locate_many(self, global_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`locate` for an array of indices: (blocks, samples inside blocks), both int64 arrays."""
        global_indices = np.asarray(global_indices, dtype=np.int64)
        blocks = np.empty_like(global_indices)
        inner = np.empty_like(global_indices)
        epochs, positions = np.divmod(global_indices, self.num_samples)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            order, starts = self._epoch(int(epoch))
            slots = np.searchsorted(starts, positions[in_epoch], side="right") - 1
            epoch_blocks = order[slots]
            offsets = positions[in_epoch] - starts[slots]
            epoch_inner = np.empty_like(offsets)
            for block in np.unique(epoch_blocks):
                here = epoch_blocks == block
                epoch_inner[here] = self._inner(int(epoch), int(block))[offsets[here]]
            blocks[in_epoch], inner[in_epoch] = epoch_blocks, epoch_inner
        return blocks, inner

    @lru_cache(maxsize=8)
    def _inner(self, epoch: int, block: int) -> np.ndarray:
        return np.random.default_rng([*self.seed, epoch, block]).permutation(int(self.block_lengths[block]))


def micro_batch_indices(micro_step: int, rank: int, dp_size: int, micro_batch_size: int) -> range:
    """Global sample indices of one rank's micro-batch.

    Micro-step i takes global samples [i*B*dp, (i+1)*B*dp) and rank r the r-th slice of B. An optimizer
    step of `a` accumulation micro-steps therefore consumes one contiguous global batch, so the global
    sample sequence does not depend on how it was split over ranks.
    """
    start = (micro_step * dp_size + rank) * micro_batch_size
    return range(start, start + micro_batch_size)


def worker_micro_steps(start_micro_step: int, worker: int, num_workers: int):
    """The micro-steps DataLoader worker `worker` produces: every num_workers-th, from the resume point.

    torch's DataLoader takes items from its workers round-robin, so interleaving these streams
    restores start, start+1, start+2, ... exactly.
    """
    step = start_micro_step + worker
    while True:
        yield step
        step += num_workers
