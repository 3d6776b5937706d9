"""Atomic output files of the data-quality commands: JSON reports and `.jsonl.zst` documents.

Every file is written to a temp file beside its destination and moved into place with
`os.replace`, so an interrupted run never leaves a half-written report or corpus under the final
name. An existing destination is refused unless the caller passes `overwrite=True`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import zstandard

from megatrain.errors import DataError
from megatrain.files import atomic_binary_file

JSONL_ZST_SUFFIX = ".jsonl.zst"
_ZSTD_LEVEL = 3
"""zstd's default level: ~5x on English/LaTeX at >100 MB/s, so writing is never the bottleneck."""


def check_out_path(path: str | Path, overwrite: bool, flag: str = "--out") -> Path:
    """Refuses an output path that exists (unless `overwrite`) or is a folder.

    Args:
        path: The destination file.
        overwrite: Whether replacing an existing file is allowed.
        flag: The command-line flag that named the path, for the error message.

    Returns:
        `path` as a Path.

    Raises:
        DataError: The path is a folder, or an existing file without `overwrite`.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{flag} {path} is a folder; give a file path")
    if path.exists() and not overwrite:
        raise DataError(f"{flag} {path} already exists; pass --overwrite to replace it or choose another path")
    return path


def write_json(path: str | Path, data: dict) -> None:
    """Writes `data` as indented JSON (keys in insertion order), atomically."""
    with atomic_binary_file(path) as file:
        file.write((json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def write_jsonl_zst(path: str | Path, records: Iterable[dict]) -> int:
    """Streams `records` into a zstd-compressed JSON-lines file, atomically.

    Each record is one `json.dumps` line (non-ASCII kept as UTF-8, as Proof-Pile-2 stores it).

    Args:
        path: Destination, conventionally ending in `.jsonl.zst`.
        records: JSON-serializable dicts, e.g. `{"text": ..., "meta": {...}}`.

    Returns:
        The number of records written.
    """
    count = 0
    compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    with atomic_binary_file(path) as file:
        with compressor.stream_writer(file, closefd=False) as compressed:
            for record in records:
                compressed.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace"))
                count += 1
    return count


def document_record(document) -> dict:
    """The Proof-Pile-2 style record of a Document: `{"text", "meta"}` with source and id in meta.

    `source` and `id` are stored as `meta["source"]` and `meta["id"]` so that a cleaned corpus fed
    back to `build` or `dedup` still names where each document came from.
    """
    meta = dict(document.meta or {})
    meta["source"] = document.source
    meta["id"] = document.id
    return {"text": document.text, "meta": meta}
