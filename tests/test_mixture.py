"""Mixtures and elastic order as pure functions: exact per-window proportions, every sample once."""

from __future__ import annotations

import numpy as np
import pytest

from megatrain.data.mixture import Mixture, Stage, quotas, source_seed
from megatrain.data.order import SampleOrder, micro_batch_indices, worker_micro_steps
from megatrain.errors import ConfigError

LLEMMA = {"arxiv": 2, "open-web-math": 4, "code": 1}


def test_quotas_are_the_weights_when_the_window_allows_it():
    assert quotas(LLEMMA, 7 * 64) == {"arxiv": 128, "code": 64, "open-web-math": 256}


def test_quotas_round_by_largest_remainder_and_fill_the_window():
    q = quotas(LLEMMA, 8000)
    assert sum(q.values()) == 8000
    for name, weight in LLEMMA.items():
        assert abs(q[name] - 8000 * weight / 7) < 1


@pytest.mark.parametrize("weights, match", [({"a": 1, "b": 0}, "must be positive"),
                                            ({"a": 1, "b": -2}, "must be positive"),
                                            ({"a": 1000, "b": 1}, "gets no sample")])
def test_bad_weights_are_refused(weights, match):
    with pytest.raises(ConfigError, match=match):
        quotas(weights, 16)


def test_every_window_holds_exactly_its_quota():
    window = 7 * 16
    mixture = Mixture(Stage(0, window, quotas(LLEMMA, window), {n: 0 for n in LLEMMA}), seed=3)
    sources, _ = mixture.locate(np.arange(window * 50))
    for w in range(50):
        counts = np.bincount(sources[w * window:(w + 1) * window], minlength=3)
        assert dict(zip(mixture.names, counts.tolist())) == {"arxiv": 32, "code": 16, "open-web-math": 64}
    # shuffled inside the window: not three solid runs
    assert len(np.flatnonzero(np.diff(sources[:window]))) > 10


def test_consumed_counts_match_the_stream_at_every_point():
    mixture = Mixture(Stage(0, 50, quotas(LLEMMA, 50), {n: 0 for n in LLEMMA}), seed=1)
    sources, indices = mixture.locate(np.arange(1000))
    for end in (0, 1, 49, 50, 51, 777, 1000):
        expected = np.bincount(sources[:end], minlength=3)
        assert mixture.consumed(end) == dict(zip(mixture.names, expected.tolist()))
    # each source's indices are exactly 0, 1, 2, ... in stream order
    for s in range(3):
        assert indices[sources == s].tolist() == list(range((sources == s).sum()))


def test_a_new_stage_continues_each_source_where_it_stopped():
    first = Mixture(Stage(0, 70, quotas(LLEMMA, 70), {n: 0 for n in LLEMMA}), seed=5)
    at = 700
    offsets = first.consumed(at)
    second = Mixture(Stage(at, 64, quotas({"arxiv": 1, "open-web-math": 1, "code": 2}, 64), offsets), seed=5)
    s1, i1 = first.locate(np.arange(at))
    s2, i2 = second.locate(np.arange(at, at + 640))
    for s, name in enumerate(first.names):
        indices = np.concatenate([i1[s1 == s], i2[s2 == s]])
        assert indices.tolist() == list(range(len(indices))), name  # no sample repeated or skipped
    assert np.bincount(s2, minlength=3).tolist() == [160, 320, 160]  # arxiv, code, open-web-math


def stream_indices(dp: int, micro: int, accumulation: int, steps: range) -> list[int]:
    """Global indices that all ranks together read for some optimizer steps, in step order."""
    out = []
    for step in steps:
        for micro_step in range(step * accumulation, (step + 1) * accumulation):
            for rank in range(dp):
                out += list(micro_batch_indices(micro_step, rank, dp, micro))
    return out


def test_elastic_resume_sees_the_same_global_sequence():
    global_batch = 16
    straight = stream_indices(2, 8, 1, range(6))
    shrunk = stream_indices(2, 8, 1, range(3)) + stream_indices(1, 8, 2, range(3, 6))
    grown = stream_indices(1, 4, 4, range(3)) + stream_indices(4, 4, 1, range(3, 6))
    assert straight == shrunk == grown == list(range(6 * global_batch))


def test_a_thousand_nodes_of_8_ranks_with_8_workers_read_every_sample_once():
    nodes, ranks_per_node, workers, micro = 1000, 8, 8, 2
    dp = nodes * ranks_per_node
    global_batch = dp * micro
    micro_steps_per_worker = 2
    total = global_batch * workers * micro_steps_per_worker

    # every (rank, worker) stream, vectorized over ranks: worker w reads micro-steps w, w+8, ...
    seen = []
    for worker in range(workers):
        steps = worker_micro_steps(0, worker, workers)
        for _ in range(micro_steps_per_worker):
            micro_step = next(steps)
            ranks = np.arange(dp)
            starts = (micro_step * dp + ranks) * micro
            seen.append((starts[:, None] + np.arange(micro)).ravel())
    seen = np.concatenate(seen)
    assert len(seen) == total and np.array_equal(np.sort(seen), np.arange(total))

    # through the mixture and each source's block order: no row read twice within an epoch
    rows = {"arxiv": 41_000, "open-web-math": 77_000, "code": 9_000}  # code runs through ~2 epochs
    mixture = Mixture(Stage(0, global_batch, quotas(LLEMMA, global_batch), {n: 0 for n in rows}), seed=11)
    sources, source_indices = mixture.locate(seen)
    for s, name in enumerate(mixture.names):
        indices = np.sort(source_indices[sources == s])
        assert np.array_equal(indices, np.arange(len(indices))), name
        order = SampleOrder([1000] * (rows[name] // 1000), source_seed(11, name))
        blocks, inner = order.locate_many(indices)
        epochs = indices // order.num_samples
        keys = (epochs * order.num_samples + blocks * 1000 + inner)
        assert len(np.unique(keys)) == len(keys), name
        full = indices[indices < order.num_samples]
        if len(full) == order.num_samples:  # a whole epoch: every row exactly once
            assert len(np.unique(blocks[:len(full)] * 1000 + inner[:len(full)])) == order.num_samples
