"""Reading packed token shards: batch throughput against a raw memmap, and time to the first batch.

1. Throughput. The same tokens are written twice: as a token-shard dataset (`write_token_shard`,
   blocks of 64 rows) and as one flat uint16 file (nanoGPT/Megatron style). megatrain's
   `MixtureLoader` (one source, the training process, no workers) and a nanoGPT `get_batch` over
   `np.memmap` (random offsets, `astype(int64)`, `torch.from_numpy`) each produce batches of the
   same shape; they alternate in rounds, the median of each is kept. Page cache warm for both.
2. First batch. A dataset of 100,000 small shards; a fresh process opens it, builds the loader and
   takes one batch, with and without the start-up sha256 check of every shard.

    python bench/data_read.py [--tokens 50_000_000] [--shards 100000]   # ~3 min, most of it writing shards

The last lines printed are `read ratio: X.XX` (packed / memmap tokens/s; goal >= 0.9) and the
first-batch seconds (goal <= 2 s without the sha256 check).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data_tools.packing import write_token_shard  # noqa: E402
from megatrain.data.shards import shard_file_name  # noqa: E402
from megatrain.data.packed import PACKED_FORMAT, PACKED_FORMAT_VERSION  # noqa: E402

VOCAB = 32000


def synthetic_dataset(out: Path, num_shards: int, docs_per_shard: int, seq_len: int, rows_per_block: int,
                      seed: int = 0) -> np.ndarray:
    """Writes a token-shard dataset of random documents; returns its token stream (for the memmap)."""
    out.mkdir(parents=True)
    (out / "tokenizer").mkdir()
    (out / "tokenizer" / "README").write_text("benchmark data: random ids, no real tokenizer\n")
    rng = np.random.default_rng(seed)
    shards, streams = [], []
    for i in range(num_shards):
        docs = [rng.integers(5, VOCAB, size=int(n), dtype=np.uint16)
                for n in rng.integers(50, 4 * seq_len, size=docs_per_shard)]
        shards.append(write_token_shard(out / shard_file_name(i), docs, seq_len, rows_per_block, "uint16",
                                        pad_id=0, eos_id=2))
        streams += [np.append(d, np.uint16(2)) for d in docs]
    manifest = {
        "format": PACKED_FORMAT, "version": PACKED_FORMAT_VERSION, "name": "bench",
        "tokenizer": {"path": "tokenizer", "kind": "none", "files": {}}, "vocab_size": VOCAB, "dtype": "uint16",
        "eos_id": 2, "pad_id": 0, "bos_id": None, "add_bos": False, "seq_len": seq_len,
        "rows_per_block": rows_per_block, "documents": sum(s["documents"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards), "rows": sum(s["rows"] for s in shards), "settings": {},
        "sources": {"bench": {"documents": sum(s["documents"] for s in shards)}}, "shards": shards,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, indent=2))
    return np.concatenate(streams) if num_shards * docs_per_shard < 1_000_000 else np.empty(0, np.uint16)


def loader_for(path: Path, micro_batch_size: int, seed: int = 0):
    from megatrain.data.mix_loader import MixtureLoader
    from megatrain.data.packed import PackedDataset

    return MixtureLoader({"bench": PackedDataset(path)}, {"bench": 1.0}, seed, rank=0, dp_size=1,
                         micro_batch_size=micro_batch_size, global_batch_size=micro_batch_size, mixture_window=1,
                         attention_reset=False, num_workers=0)


def memmap_batches(path: Path, micro_batch_size: int, seq_len: int, seed: int = 0):
    """nanoGPT's get_batch: random windows of a flat uint16 file."""
    rng = np.random.default_rng(seed)
    while True:
        data = np.memmap(path, dtype=np.uint16, mode="r")  # recreated per batch, as nanoGPT does
        starts = rng.integers(0, len(data) - seq_len - 1, size=micro_batch_size)
        x = torch.stack([torch.from_numpy(data[i:i + seq_len].astype(np.int64)) for i in starts])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + seq_len].astype(np.int64)) for i in starts])
        yield {"input_ids": x, "labels": y}


def time_batches(it, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        next(it)
    return time.perf_counter() - start


def throughput(args) -> float:
    seq_len, micro = 2048, 8
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        docs_per_shard = 2000
        num_shards = max(1, args.tokens // (docs_per_shard * 2 * seq_len))
        t0 = time.perf_counter()
        stream = synthetic_dataset(Path(tmp) / "packed", num_shards, docs_per_shard, seq_len, 64)
        flat = Path(tmp) / "flat.bin"
        stream.tofile(flat)
        print(f"wrote {stream.size / 1e6:.1f}M tokens in {num_shards} shards and a flat file "
              f"({time.perf_counter() - t0:.1f}s)")
        for f in Path(tmp).rglob("*"):  # warm the page cache for both sides alike
            if f.is_file():
                f.read_bytes()
        packed, raw = loader_for(Path(tmp) / "packed", micro), memmap_batches(flat, micro, seq_len)
        tokens = args.batches * micro * seq_len
        packed_times, raw_times = [], []
        for round_ in range(args.rounds):
            pair = [("packed", packed, packed_times), ("memmap", raw, raw_times)]
            for _, it, times in (pair if round_ % 2 == 0 else pair[::-1]):
                times.append(time_batches(it, args.batches))
        packed_rate, raw_rate = tokens / statistics.median(packed_times), tokens / statistics.median(raw_times)
        print(f"packed MixtureLoader: {packed_rate / 1e6:.1f}M tokens/s   raw memmap get_batch: "
              f"{raw_rate / 1e6:.1f}M tokens/s   ({args.rounds} rounds x {args.batches} batches of {micro}x{seq_len})")
        return packed_rate / raw_rate


FIRST_BATCH = """
import sys, time
t0 = time.perf_counter()
sys.path.insert(0, {repo!r})
from megatrain.data.mix_loader import MixtureLoader
from megatrain.data.packed import PackedDataset
t1 = time.perf_counter()
dataset = PackedDataset({path!r})
if {verify}:
    bad = dataset.find_bad_shards(range(len(dataset.shards)))
    assert not bad, bad
loader = MixtureLoader({{"bench": dataset}}, {{"bench": 1.0}}, 0, rank=5, dp_size=8, micro_batch_size=4,
                       global_batch_size=32, mixture_window=1, attention_reset=False, num_workers=0)
batch = next(loader)
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def first_batch(args) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        t0 = time.perf_counter()
        synthetic_dataset(Path(tmp) / "many", args.shards, 4, 256, 8)
        print(f"wrote {args.shards} shards in {time.perf_counter() - t0:.1f}s")
        results = []
        for verify in (False, True):
            code = FIRST_BATCH.format(repo=str(Path(__file__).resolve().parents[1]), path=str(Path(tmp) / "many"),
                                      verify=verify)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            imports, first = map(float, out.stdout.split())
            print(f"first batch over {args.shards} shards, sha256 check {'on ' if verify else 'off'}: {first:.2f}s "
                  f"(+ {imports:.2f}s imports)")
            results.append(first)
        return results[0], results[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=50_000_000)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shards", type=int, default=100_000)
    parser.add_argument("--tmp", default=None, help="scratch folder (default: the system's)")
    args = parser.parse_args()
    ratio = throughput(args)
    off, on = first_batch(args)
    print(f"first batch over {args.shards} shards: {off:.2f}s without, {on:.2f}s with the sha256 check (goal <= 2 s without)")
    print(f"read ratio: {ratio:.2f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
