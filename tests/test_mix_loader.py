"""Streaming a real mixture (Debian LaTeX/HTML/Coq + DeepMind math): exact proportions, elastic and
staged resume, worker invariance, attention reset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatrain.data.loader import IGNORE_INDEX
from megatrain.data.mix_loader import MixtureLoader, packed_batch, row_positions
from megatrain.data.mixture import quotas
from megatrain.data.packed import PackedDataset
from megatrain.errors import CheckpointError

WEIGHTS = {"tex": 2, "html": 4, "coq": 1, "math": 1}


def open_all(mix_data):
    return {name: PackedDataset(path) for name, path in mix_data["datasets"].items()}


def make(mix_data, rank=0, dp=2, micro=4, global_batch=16, weights=WEIGHTS, workers=0, window=1, reset=False):
    return MixtureLoader(open_all(mix_data), weights, 7, rank, dp, micro, global_batch, window, reset, workers)


def global_steps(loaders, steps: int, accumulation: int) -> list[torch.Tensor]:
    """Each step's global batch as the ranks read it: micro-step by micro-step, rank by rank."""
    out = []
    for _ in range(steps):
        rows = []
        for _ in range(accumulation):
            rows += [next(loader)["input_ids"] for loader in loaders]
        out.append(torch.cat(rows))
    return out


def test_every_global_batch_holds_the_exact_quota(mix_data):
    loaders = [make(mix_data, rank=r) for r in range(2)]
    want = quotas(WEIGHTS, 16)  # 2:4:1:1 of 16 = 4:8:2:2
    for step in range(1, 6):
        global_steps(loaders, 1, 2)
        for loader in loaders:
            assert {n: c["samples"] for n, c in loader.counters.items()} == {n: q * step for n, q in want.items()}
    assert loaders[0].counters == loaders[1].counters  # every rank counts the same, without communication


def test_token_counters_add_up_the_real_tokens_read(mix_data):
    loaders = [make(mix_data, rank=r) for r in range(2)]
    real = 0
    for _ in range(4 * 2):  # 4 steps of 2 micro-steps
        for loader in loaders:
            real += int(next(loader)["real_tokens"].sum())
    assert sum(c["tokens"] for c in loaders[0].counters.values()) == real


@pytest.mark.parametrize("before, after", [((2, 4, 2), (1, 4, 4)), ((1, 4, 4), (2, 4, 2))],
                         ids=["2-ranks-to-1", "1-rank-to-2"])
def test_elastic_resume_reads_the_same_global_sequence(mix_data, before, after):
    dp0, micro0, acc0 = before
    dp1, micro1, acc1 = after
    straight = global_steps([make(mix_data, rank=r, dp=dp0, micro=micro0) for r in range(dp0)], 6, acc0)
    first = [make(mix_data, rank=r, dp=dp0, micro=micro0) for r in range(dp0)]
    head = global_steps(first, 3, acc0)
    state = first[0].state_dict()
    resumed = [make(mix_data, rank=r, dp=dp1, micro=micro1) for r in range(dp1)]
    for loader in resumed:
        loader.load_state_dict(state)
    tail = global_steps(resumed, 3, acc1)
    for a, b in zip(straight, head + tail):
        assert torch.equal(a, b)
    assert resumed[0].counters == make_counters_after(mix_data, 6)


def make_counters_after(mix_data, steps):
    loader = make(mix_data, rank=0, dp=1, micro=16)
    for _ in range(steps):
        next(loader)
    return loader.counters


def test_worker_processes_do_not_change_the_stream(mix_data):
    single = global_steps([make(mix_data, rank=1, workers=0)], 5, 1)
    multi = global_steps([make(mix_data, rank=1, workers=2)], 5, 1)
    assert all(torch.equal(a, b) for a, b in zip(single, multi))


def test_new_weights_on_resume_start_a_stage_and_the_counters_continue(mix_data):
    first = make(mix_data, dp=1, micro=16)
    for _ in range(3):
        next(first)
    before = {n: dict(c) for n, c in first.counters.items()}
    second_weights = {"tex": 1, "html": 1, "coq": 1, "math": 1}
    second = make(mix_data, dp=1, micro=16, weights=second_weights)
    second.load_state_dict(first.state_dict())
    assert len(second.stages) == 2 and second.stages[1].start_sample == 48
    for _ in range(2):
        next(second)
    for name in WEIGHTS:
        assert second.counters[name]["samples"] == before[name]["samples"] + 2 * 4
        assert second.counters[name]["tokens"] > before[name]["tokens"]
    # each source continues with its next samples: nothing seen twice, nothing skipped
    from megatrain.data.mixture import Mixture
    seen = {n: [] for n in WEIGHTS}
    for stage, (start, end) in zip(second.stages, [(0, 48), (48, 80)]):
        mixture = Mixture(stage, 7)
        sources, indices = mixture.locate(np.arange(start, end))
        for s, name in enumerate(mixture.names):
            seen[name] += indices[sources == s].tolist()
    for name, indices in seen.items():
        assert sorted(indices) == list(range(len(indices))), name


def test_resume_refuses_another_dataset_under_the_same_name(mix_data):
    loader = make(mix_data, dp=1, micro=16)
    next(loader)
    state = loader.state_dict()
    state["rows"]["tex"] += 1
    with pytest.raises(CheckpointError, match="data.sources.tex has .* rows"):
        make(mix_data, dp=1, micro=16).load_state_dict(state)


def test_rows_hold_document_boundaries(mix_data):
    dataset = PackedDataset(mix_data["datasets"]["math"])
    tokens, docs = dataset.read_block(0)
    flat = tokens.reshape(-1)
    # every document ends with eos right before the next one starts
    assert (flat[docs[1:] - 1] == dataset.eos_id).all()
    positions = row_positions(docs[docs < dataset.seq_len], dataset.seq_len)
    assert positions[0] == 0 and (positions[docs[(docs > 0) & (docs < dataset.seq_len)]] == 0).all()


def test_attention_reset_isolates_documents_in_a_row():
    """A packed row with reset positions gives each document the logits it has alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    model.config._attn_implementation = "sdpa"
    docs = [torch.randint(5, 50, (n,)) for n in (7, 12, 5)]
    row = torch.cat(docs).numpy()
    starts = np.array([0, 7, 19])
    batch = packed_batch([(row, len(row), starts)], attention_reset=True)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=d[None], use_cache=False).logits[0] for d in docs])
        plain = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    # same math in another summation order: float32 rounding only
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain[7:], alone[7:], atol=1e-3)  # without reset, documents see each other
    assert (batch["labels"][0, [7, 19]] == IGNORE_INDEX).all()  # a document's first token is not predicted


def test_a_killed_worker_is_named_with_the_shards_of_its_batch(mix_data):
    import psutil

    loader = make(mix_data, rank=1, workers=2)
    next(loader)
    for worker in psutil.Process().children():
        worker.kill()
    with pytest.raises(RuntimeError) as error:
        for _ in range(50):  # the batches already prefetched come first
            next(loader)
    owed = loader.micro_step
    message = str(error.value)
    assert f"worker {(owed - 0) % 2} of 2 owed micro-batch {owed}, read from " in message, message
    files = message.split("read from ")[1].split(", ")
    assert files and all(any(f.startswith(str(p)) for p in mix_data["datasets"].values()) for f in files)
    loader.close()
