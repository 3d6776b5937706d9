"""Write pre-tokenized Q/A samples as reproducible webdataset tar shards plus a manifest.

See `megatrain.data.shards` for the layout. Tars are written with the stdlib `tarfile` exactly as
`webdataset.TarWriter(fileobj, user="", group="", mode=0o644, mtime=0, encoder=False,
format=tarfile.USTAR_FORMAT)` writes them (a test checks the bytes are equal): importing webdataset
imports torch, which data tools must not pull in. Fixed metadata means no PAX headers and
byte-identical shards for identical inputs.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from megatrain.data.shards import (
    LENGTHS_SUFFIX,
    MANIFEST_NAME,
    SHARD_FORMAT,
    SHARD_FORMAT_VERSION,
    TOKENIZER_NAME,
    TOKENS_SUFFIX,
    block_key,
    file_sha256,
    shard_file_name,
    token_dtype,
)
from megatrain.data.tokenizer import Tokenizer
from megatrain.errors import DataError

DEFAULT_SAMPLES_PER_SHARD = 8192
DEFAULT_BLOCK_SIZE = 256
_TAR_FORMAT = tarfile.USTAR_FORMAT
_MEMBER_MODE = 0o644


def build_qa_shards(
    pairs: Sequence[tuple[str, str]] | Mapping[str, Sequence[tuple[str, str]]],
    tokenizer_path: str | Path,
    out_dir: str | Path,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    block_size: int = DEFAULT_BLOCK_SIZE,
    source: Mapping | None = None,
) -> dict:
    """Tokenizes (question, answer) pairs and writes shards, tokenizer copy and manifest.

    Samples keep the input order (the trainer shuffles). `manifest.json` is written last, via a
    temp file and os.replace, so a folder without it is an unfinished build.

    Args:
        pairs: (question, answer) strings; or name -> pairs for several named subsets (e.g. one per
            DeepMind module). Each subset gets shards of its own, named by their manifest entry's
            `source`, so the trainer can report loss per subset.
        tokenizer_path: The sentencepiece `.model` to encode with; copied to out_dir.
        out_dir: Output folder; created if missing, must be empty if present.
        samples_per_shard: Samples per tar; a multiple of `block_size`.
        block_size: Samples per block (one tokens + one lengths member).
        source: JSON-serializable provenance stored as manifest["source"].

    Returns:
        The manifest dict.

    Raises:
        DataError: No pairs, bad sizes, a non-empty out_dir or an invalid tokenizer.
    """
    out_dir = Path(out_dir)
    subsets = dict(pairs) if isinstance(pairs, Mapping) else {None: pairs}
    empty = [name for name, subset in subsets.items() if not subset]
    if not subsets or empty:
        what = f" of {empty[0]}" if empty and empty[0] else ""
        raise DataError(f"no samples{what} to write to {out_dir}; check the released module and --splits")
    if block_size < 1 or samples_per_shard < 1 or samples_per_shard % block_size:
        raise DataError(
            f"--samples-per-shard ({samples_per_shard}) must be a positive multiple of --block-size ({block_size})"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"shard output folder {out_dir} is not empty; remove it or choose another --out")
    tokenizer = Tokenizer(tokenizer_path)
    dtype = token_dtype(tokenizer.vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_path, out_dir / TOKENIZER_NAME)

    shard_entries = []
    next_block = 0
    for name, subset in subsets.items():
        for shard_start in range(0, len(subset), samples_per_shard):
            shard_pairs = subset[shard_start : shard_start + samples_per_shard]
            shard_path = out_dir / shard_file_name(len(shard_entries))
            tokens, blocks = _write_shard(shard_path, shard_pairs, tokenizer, dtype, block_size, next_block)
            next_block += blocks
            entry = {
                "path": shard_path.name,
                "sha256": file_sha256(shard_path),
                "samples": len(shard_pairs),
                "tokens": tokens,
                "blocks": blocks,
            }
            shard_entries.append(entry if name is None else {**entry, "source": name})

    manifest = {
        "format": SHARD_FORMAT,
        "version": SHARD_FORMAT_VERSION,
        "tokenizer": TOKENIZER_NAME,
        "tokenizer_sha256": file_sha256(out_dir / TOKENIZER_NAME),
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "pad_id": tokenizer.pad_id,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "sep_id": tokenizer.sep_id,
        "block_size": block_size,
        "samples": sum(len(subset) for subset in subsets.values()),
        "tokens": sum(entry["tokens"] for entry in shard_entries),
        "source": dict(source or {}),
        "shards": shard_entries,
    }
    if None not in subsets:
        manifest["sources"] = list(subsets)
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    return manifest


def _write_shard(
    shard_path: Path,
    shard_pairs: Sequence[tuple[str, str]],
    tokenizer: Tokenizer,
    dtype: np.dtype,
    block_size: int,
    first_block_index: int,
) -> tuple[int, int]:
    """Writes one tar of blocks.

    Returns:
        (tokens, blocks) written.
    """
    questions = tokenizer.encode_batch([question for question, _ in shard_pairs])
    answers = tokenizer.encode_batch([answer for _, answer in shard_pairs])
    total_tokens = 0
    num_blocks = 0
    with open(shard_path, "wb") as file, tarfile.open(fileobj=file, mode="w|", format=_TAR_FORMAT) as tar:
        for block_start in range(0, len(shard_pairs), block_size):
            block_questions = questions[block_start : block_start + block_size]
            block_answers = answers[block_start : block_start + block_size]
            lengths = np.array([(len(q), len(a)) for q, a in zip(block_questions, block_answers)], dtype=np.int32)
            tokens = np.array(
                [token for q, a in zip(block_questions, block_answers) for token in (*q, *a)], dtype=dtype
            )
            key = block_key(first_block_index + num_blocks)
            # Sorted member order within a key, as webdataset.TarWriter writes it.
            _add_member(tar, f"{key}.{LENGTHS_SUFFIX}", _npy_bytes(lengths))
            _add_member(tar, f"{key}.{TOKENS_SUFFIX}", _npy_bytes(tokens))
            total_tokens += tokens.size
            num_blocks += 1
    return total_tokens, num_blocks


def _npy_bytes(array: np.ndarray) -> bytes:
    """Serializes an array as .npy (no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Adds one file with fixed metadata so identical data gives identical bytes."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = _MEMBER_MODE
    info.uname = ""
    info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_json_atomic(path: Path, data: dict) -> None:
    """Writes JSON with sorted keys via a temp file, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temp_path.write_text(json.dumps(data, sort_keys=True, indent=2) + "\n", encoding="utf-8")
    os.replace(temp_path, path)
