"""Data order as pure functions: partitions simulated for large worlds in one process."""

import numpy as np
import pytest

from megatrain.data.order import SampleOrder, micro_batch_indices, worker_micro_steps


def consumed_by_rank_and_worker(num_micro_steps, dp_size, num_workers, micro_batch_size):
    """Every (rank, worker)'s global indices, as the DataLoader would interleave them."""
    out = {}
    for rank in range(dp_size):
        for worker in range(num_workers):
            steps = worker_micro_steps(0, worker, num_workers)
            mine = []
            for step in steps:
                if step >= num_micro_steps:
                    break
                mine.extend(micro_batch_indices(step, rank, dp_size, micro_batch_size))
            out[rank, worker] = mine
    return out


@pytest.mark.parametrize("dp_size, num_workers, micro_batch_size", [(2, 2, 4), (64, 8, 3), (8000, 8, 1)])
def test_rank_worker_partition_covers_each_sample_once(dp_size, num_workers, micro_batch_size):
    num_micro_steps = 3 * num_workers
    parts = consumed_by_rank_and_worker(num_micro_steps, dp_size, num_workers, micro_batch_size)
    everything = np.concatenate([np.asarray(v) for v in parts.values()])
    assert len(everything) == num_micro_steps * dp_size * micro_batch_size
    assert np.array_equal(np.sort(everything), np.arange(len(everything)))


def test_epoch_is_a_permutation_and_epochs_differ():
    lengths = [256] * 10 + [37]
    order = SampleOrder(lengths, seed=3)
    n = sum(lengths)
    first = [order.locate(g) for g in range(n)]
    second = [order.locate(g) for g in range(n, 2 * n)]
    everything = sorted((b, i) for b, length in enumerate(lengths) for i in range(length))
    assert sorted(first) == everything and sorted(second) == everything
    assert first != second


def test_order_is_a_pure_function_of_seed_and_index():
    a, b, c = SampleOrder([50] * 20, 1), SampleOrder([50] * 20, 1), SampleOrder([50] * 20, 2)
    probe = [0, 17, 999, 1000, 4321]
    assert [a.locate(g) for g in probe] == [b.locate(g) for g in reversed(probe)][::-1]
    assert [a.locate(g) for g in range(100)] != [c.locate(g) for g in range(100)]


def test_global_sequence_independent_of_dp_split():
    """Same global batch, different rank counts: the samples consumed per optimizer step are the same."""
    global_batch = 48
    for dp_size, micro in [(1, 48), (2, 24), (4, 6), (8, 3)]:
        accumulation = global_batch // (dp_size * micro)
        step_samples = sorted(g for a in range(accumulation) for r in range(dp_size)
                              for g in micro_batch_indices(5 * accumulation + a, r, dp_size, micro))
        assert step_samples == list(range(5 * global_batch, 6 * global_batch))


def test_resume_point_continues_the_same_stream():
    straight = list(zip(range(10), worker_micro_steps(0, 0, 1)))
    resumed = list(zip(range(6), worker_micro_steps(4, 0, 1)))
    assert [s for _, s in straight][4:] == [s for _, s in resumed]
