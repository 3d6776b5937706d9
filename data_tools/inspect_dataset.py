"""`megatrain-data inspect`: what a built token-shard dataset holds.

Reports the manifest's counts and per-source table, the distribution of stored document lengths,
a few decoded documents, and optionally saves a document-length histogram as PNG.

Document lengths come from the `.docs.npy` members only (document starts, flat positions inside
each block); the token arrays are read just for the decoded samples. A document's stored length
counts every token training sees for it: its ids plus the eos (and the bos when the dataset adds
one). Every array is loaded with `allow_pickle=False`, and tar members are located with
`megatrain.data.shards.TarFiles`, whose index refuses absolute or `..` member paths.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from megatrain.data.packed import PackedDataset
from megatrain.data.shards import TarFiles
from megatrain.errors import DataError

DEFAULT_SAMPLES = 3
SAMPLE_CHARS = 300
"""Characters shown per decoded sample document."""
_SAMPLE_MAX_TOKENS = 4 * SAMPLE_CHARS  # a token is at least one character, so this always suffices
_PERCENTILES = {"min": 0, "median": 50, "p90": 90, "p99": 99, "max": 100}


def document_spans(dataset: PackedDataset) -> list[np.ndarray]:
    """Start and end of every document, per shard, as flat token positions over the shard.

    Args:
        dataset: An opened dataset.

    Returns:
        One int64 array of shape (documents_in_shard, 2) per shard: [start, end) positions, where
        position p is row p // seq_len, column p % seq_len of the shard's rows.

    Raises:
        DataError: A docs member is missing, malformed, or disagrees with the manifest.
    """
    block_tokens = dataset.rows_per_block * dataset.seq_len
    spans = []
    tars = TarFiles([dataset.path / shard["path"] for shard in dataset.shards], "rebuild the dataset")
    for i, shard in enumerate(dataset.shards):
        shard_path = tars.paths[i]
        starts = []
        for local_block in range(shard["blocks"]):
            docs = tars.read_npy(i, f"block-{local_block:06d}.docs.npy")
            if docs.ndim != 1 or docs.dtype != np.int64 or (docs.size and not 0 <= docs[0] <= docs[-1] < block_tokens):
                raise DataError(f"shard {shard_path.name}: block-{local_block:06d}.docs.npy holds {docs.shape} "
                                f"{docs.dtype} positions outside [0, {block_tokens}); rebuild the dataset")
            starts.append(docs + local_block * block_tokens)
        shard_starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        if shard_starts.size != shard["documents"] or np.any(np.diff(shard_starts) <= 0):
            raise DataError(f"shard {shard_path.name} has {shard_starts.size} document starts (expected "
                            f"{shard['documents']}, strictly increasing); rebuild the dataset")
        ends = np.append(shard_starts[1:], shard["tokens"])
        spans.append(np.stack([shard_starts, ends], axis=1))
    tars.close()
    return spans


def length_summary(lengths: np.ndarray) -> dict:
    """min / median / p90 / p99 / max (nearest-rank: always a real length) and mean of `lengths`."""
    if lengths.size == 0:
        return {}
    summary = {name: int(np.percentile(lengths, q, method="inverted_cdf")) if q else int(lengths.min())
               for name, q in _PERCENTILES.items()}
    summary["mean"] = round(float(lengths.mean()), 2)
    return summary


def decode_documents(dataset: PackedDataset, spans: list[np.ndarray], count: int, tokenizer) -> list[dict]:
    """Decodes `count` documents spread evenly over the dataset (first and last included).

    Args:
        dataset: The dataset.
        spans: From `document_spans`.
        count: Documents to decode.
        tokenizer: Has `decode(ids) -> str`.

    Returns:
        Per document: index (over the dataset), source (None if the manifest does not name
        shard sources), shard, tokens (stored length) and the first SAMPLE_CHARS characters of
        its text.
    """
    total = sum(shard_spans.shape[0] for shard_spans in spans)
    if count <= 0 or total == 0:
        return []
    shard_first_doc = np.cumsum([0] + [shard_spans.shape[0] for shard_spans in spans])
    shard_first_block = np.cumsum([0] + [shard["blocks"] for shard in dataset.shards])
    block_tokens = dataset.rows_per_block * dataset.seq_len
    samples = []
    for index in np.unique(np.linspace(0, total - 1, num=min(count, total)).round().astype(np.int64)).tolist():
        shard_index = int(np.searchsorted(shard_first_doc, index, side="right") - 1)
        start, end = spans[shard_index][index - shard_first_doc[shard_index]].tolist()
        read_end = min(end, start + _SAMPLE_MAX_TOKENS)
        pieces = []
        for local_block in range(start // block_tokens, (read_end - 1) // block_tokens + 1):
            tokens, _ = dataset.read_block(int(shard_first_block[shard_index] + local_block))
            flat = tokens.reshape(-1)  # (rows * seq_len,)
            offset = local_block * block_tokens
            pieces.append(flat[max(start - offset, 0) : read_end - offset])
        ids = np.concatenate(pieces).astype(np.int64)
        # Drop the document's own bos/eos: some tokenizers decode control tokens as text.
        if dataset.manifest.get("add_bos") and ids.size and ids[0] == dataset.manifest.get("bos_id"):
            ids = ids[1:]
        if read_end == end and ids.size and ids[-1] == dataset.eos_id:
            ids = ids[:-1]
        shard = dataset.shards[shard_index]
        samples.append({"index": index, "source": shard.get("source"), "shard": shard["path"], "tokens": end - start,
                        "text": tokenizer.decode(ids.tolist())[:SAMPLE_CHARS]})
    return samples


def save_length_histogram(lengths: np.ndarray, png_path: str | Path, title: str) -> Path:
    """Saves a histogram of document lengths with log-spaced bins on a log x axis.

    Lengths of math corpora span 10–100,000 tokens (a DeepMind problem next to a LaTeX manual),
    so linear bins would put nearly everything in the first bar.

    Args:
        lengths: Stored tokens per document.
        png_path: Where to write the PNG (its folder is created).
        title: Plot title.

    Returns:
        The written path.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on build machines; must precede pyplot's import
    import matplotlib.pyplot as plt

    from megatrain.files import atomic_binary_file

    png_path = Path(png_path)
    low, high = max(int(lengths.min()), 1), max(int(lengths.max()), 2)
    bins = np.unique(np.geomspace(low, high + 1, num=min(60, high - low + 2)).round())
    figure, axis = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        axis.hist(lengths, bins=bins, color="#4c72b0", edgecolor="white", linewidth=0.5)
        axis.set_xscale("log")
        for name, style in (("median", "-"), ("p90", "--"), ("p99", ":")):
            value = np.percentile(lengths, _PERCENTILES[name], method="inverted_cdf")
            axis.axvline(value, color="#c44e52", linestyle=style, linewidth=1, label=f"{name} {int(value):,}")
        axis.set_xlabel("tokens per document (log scale)")
        axis.set_ylabel("documents")
        axis.set_title(title)
        axis.legend(loc="best")
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
    finally:
        plt.close(figure)
    with atomic_binary_file(png_path) as file:
        file.write(buffer.getvalue())
    return png_path


def inspect_dataset(path: str | Path, samples: int = DEFAULT_SAMPLES, histogram: str | Path | None = None) -> dict:
    """Gathers everything `megatrain-data inspect` shows about a dataset.

    Args:
        path: The dataset folder (from `megatrain-data build`).
        samples: Documents to decode (0: none, and the tokenizer is not loaded).
        histogram: If given, the PNG path for the document-length histogram.

    Returns:
        A JSON-serializable dict: name, path, counts, dtype/seq_len/vocab, `sources` (from the
        manifest, with token shares), `document_tokens` (length summary), `samples`, `histogram`.

    Raises:
        DataError: The folder is not a readable dataset.
    """
    dataset = PackedDataset(path)
    manifest = dataset.manifest
    spans = document_spans(dataset)
    lengths = np.concatenate([shard_spans[:, 1] - shard_spans[:, 0] for shard_spans in spans])
    if int(lengths.sum()) != dataset.num_tokens or lengths.size != manifest["documents"]:
        raise DataError(f"{dataset.path}: documents add up to {lengths.size} documents and {int(lengths.sum())} "
                        f"tokens, the manifest says {manifest['documents']} and {dataset.num_tokens}; "
                        "rebuild the dataset")
    total_tokens = max(manifest["tokens"], 1)
    sources = {
        name: {**stats, "token_share": round(stats.get("tokens", 0) / total_tokens, 4)}
        for name, stats in manifest["sources"].items()
    }
    # A shard holds one source's documents (the builder records it), so lengths split by source.
    shard_sources = [shard.get("source") for shard in dataset.shards]
    for name in sources:
        if name in shard_sources:
            source_lengths = [shard_spans[:, 1] - shard_spans[:, 0]
                              for shard_spans, shard_source in zip(spans, shard_sources) if shard_source == name]
            sources[name]["document_tokens"] = length_summary(np.concatenate(source_lengths))
    info = {
        "name": manifest["name"],
        "path": str(dataset.path),
        "documents": manifest["documents"],
        "tokens": manifest["tokens"],
        "rows": manifest["rows"],
        "shards": len(manifest["shards"]),
        "blocks": dataset.num_blocks,
        "dtype": manifest["dtype"],
        "seq_len": manifest["seq_len"],
        "rows_per_block": manifest["rows_per_block"],
        "vocab_size": manifest["vocab_size"],
        "tokenizer": manifest["tokenizer"].get("kind"),
        "add_bos": manifest.get("add_bos"),
        "padding_tokens": manifest["rows"] * manifest["seq_len"] - manifest["tokens"],
        "sources": sources,
        "document_tokens": length_summary(lengths),
        "samples": [],
        "histogram": None,
    }
    if samples > 0:
        from megatrain.data.tokenizer import load_tokenizer

        info["samples"] = decode_documents(dataset, spans, samples, load_tokenizer(dataset.tokenizer_path))
    if histogram is not None:
        title = f"{manifest['name']}: {lengths.size:,} documents, {manifest['tokens']:,} tokens"
        info["histogram"] = str(save_length_histogram(lengths, histogram, title))
    return info


def format_inspection(info: dict) -> str:
    """Renders `inspect_dataset`'s dict as the text `megatrain-data inspect` prints."""
    lines = [
        f"dataset {info['name']} ({info['path']})",
        f"  documents {info['documents']:,}  tokens {info['tokens']:,}  rows {info['rows']:,} x seq_len "
        f"{info['seq_len']}  shards {info['shards']}  blocks {info['blocks']}",
        f"  dtype {info['dtype']}  vocab {info['vocab_size']:,}  tokenizer {info['tokenizer']}  "
        f"add_bos {info['add_bos']}  padding tokens {info['padding_tokens']:,}",
        "",
        f"  {'source':<24} {'documents':>12} {'tokens':>14} {'share':>7} {'bytes':>14} {'bad_utf8':>9} {'skipped':>8}",
    ]
    for name, stats in info["sources"].items():
        lines.append(
            f"  {name:<24} {stats.get('documents', 0):>12,} {stats.get('tokens', 0):>14,} "
            f"{stats['token_share']:>7.1%} {stats.get('bytes', 0):>14,} {stats.get('bad_utf8', 0):>9,} "
            f"{stats.get('skipped', 0):>8,}"
        )
    summary = info["document_tokens"]
    lines += ["", "  tokens per document (incl. eos):", f"  {'all':<24} {_format_summary(summary)}"]
    for name, stats in info["sources"].items():
        if "document_tokens" in stats:
            lines.append(f"  {name:<24} {_format_summary(stats['document_tokens'])}")
    for sample in info["samples"]:
        text = sample["text"].replace("\n", "\\n")
        where = f"{sample['source']}, {sample['shard']}" if sample["source"] else sample["shard"]
        lines.append(f"\n  document {sample['index']:,} ({where}, {sample['tokens']:,} tokens):\n    {text}")
    if info["histogram"]:
        lines.append(f"\n  histogram: {info['histogram']}")
    return "\n".join(lines)


def _format_summary(summary: dict) -> str:
    return "  ".join(f"{key} {value:,}" for key, value in summary.items())

