"""The streaming loader over real shards: worker count never changes the batches, ranks split an epoch."""

from __future__ import annotations

from collections import Counter

import torch

from megatrain.data.loader import IGNORE_INDEX, QALoader
from megatrain.data.shards import ShardSet
from megatrain.data.tokenizer import Tokenizer


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_worker_count_does_not_change_the_stream(dm_data):
    shards = ShardSet(dm_data["shards"])
    single = take(QALoader(shards, 5, rank=1, dp_size=2, micro_batch_size=8, max_seq_len=96, num_workers=0), 7)
    multi = take(QALoader(shards, 5, rank=1, dp_size=2, micro_batch_size=8, max_seq_len=96, num_workers=2), 7)
    for a, b in zip(single, multi):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_ranks_split_an_epoch_exactly_once(dm_data):
    shards = ShardSet(dm_data["shards"])
    micro, dp = 10, 2
    steps = shards.num_samples // (micro * dp)
    seen = []
    for rank in range(dp):
        loader = QALoader(shards, 5, rank, dp, micro, max_seq_len=96, num_workers=0)
        for batch in take(loader, steps):
            for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
                seen.append(tuple(row[mask.bool()].tolist()))
    everything = [tuple([shards.manifest["bos_id"], *q.tolist(), shards.manifest["sep_id"], *a.tolist(),
                         shards.manifest["eos_id"]])
                  for block in range(shards.num_blocks) for q, a in shards.read_block(block)]
    assert steps * micro * dp == shards.num_samples == 1200  # the whole epoch, no remainder
    assert Counter(seen) == Counter(everything)  # each sample once: none lost, none repeated


def test_resume_position_gives_the_same_next_batch(dm_data):
    shards = ShardSet(dm_data["shards"])
    straight = QALoader(shards, 5, 0, 2, 4, max_seq_len=96, num_workers=0)
    take(straight, 5)
    state = straight.state_dict()
    resumed = QALoader(shards, 5, 0, 2, 4, max_seq_len=96, num_workers=1)
    resumed.load_state_dict(state)
    a, b = next(straight), next(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loss_only_on_answer_and_eos(dm_data):
    shards = ShardSet(dm_data["shards"])
    tok = Tokenizer(shards.tokenizer_path)
    batch = next(QALoader(shards, 5, 0, 1, 4, max_seq_len=96, num_workers=0))
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        sep = ids.index(tok.sep_id)
        target = [t for t in labels if t != IGNORE_INDEX]
        end = ids.index(tok.eos_id)
        assert target == ids[sep + 1: end + 1] and target[-1] == tok.eos_id
        assert tok.decode(target[:-1]).strip()  # a non-empty answer string
