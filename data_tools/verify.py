"""`megatrain-data verify` for token-shard datasets: hashes, structure and decodability.

The layout is described in `data_tools.build`. Every check names the shard (and block) and what to
do, so a corrupted copy is found before a training run reads it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_tools.packing import DOCS_SUFFIX, TOKENS_SUFFIX, block_key
from megatrain.data.packed import load_manifest
from megatrain.data.shards import TarFiles, file_sha256
from megatrain.data.tokenizer import load_tokenizer
from megatrain.errors import DataError

_REBUILD_HINT = "rebuild it with `megatrain-data build ...`"


def verify_token_dataset(path: str | Path, check_blocks: bool = True, decode_sample: bool = True) -> dict:
    """Checks a token-shard dataset against its manifest.

    Checks: tokenizer file and shard sha256s; tar members (no absolute or `..` paths, exactly the
    expected blocks); per block the shapes, dtype, ids < vocab_size, sorted in-range document starts,
    bos at each start under add_bos, eos before each later document start, padding after the last
    real token; row/token/document counts of every shard and of the whole set.

    Args:
        path: The dataset folder.
        check_blocks: Also read and check every block (not just hashes).
        decode_sample: Decode the first document with the dataset's tokenizer.

    Returns:
        A summary: shards, blocks, rows, tokens, documents and `sample` (decoded text or None).

    Raises:
        DataError: The first problem found, naming the file, shard or block, expected and actual.
    """
    path = Path(path)
    manifest = load_token_manifest(path)
    tokenizer_dir = path / manifest["tokenizer"]["path"]
    for file_name, expected in sorted(manifest["tokenizer"]["files"].items()):
        file_path = tokenizer_dir / file_name
        if not file_path.is_file():
            raise DataError(f"tokenizer file {file_path} listed in the manifest is missing; {_REBUILD_HINT}")
        actual = file_sha256(file_path)
        if actual != expected:
            raise DataError(
                f"tokenizer file {file_path}: sha256 mismatch (expected {expected}, got {actual}); {_REBUILD_HINT}"
            )
    totals = {"blocks": 0, "rows": 0, "tokens": 0, "documents": 0}
    for shard in manifest["shards"]:
        shard_path = path / shard["path"]
        if not shard_path.is_file():
            raise DataError(f"shard {shard['path']} listed in {path / 'manifest.json'} is missing; {_REBUILD_HINT}")
        actual = file_sha256(shard_path)
        if actual != shard["sha256"]:
            raise DataError(
                f"shard {shard['path']}: sha256 mismatch (expected {shard['sha256']}, got {actual}); {_REBUILD_HINT}"
            )
        if check_blocks:
            _check_shard(shard_path, shard, manifest)
        for key in totals:
            totals[key] += shard[key]
    for key in ("rows", "tokens", "documents"):
        if totals[key] != manifest[key]:
            raise DataError(
                f"{path / 'manifest.json'}: shards add up to {totals[key]} {key}, manifest says {manifest[key]}; "
                f"{_REBUILD_HINT}"
            )
    sample = _decode_first_document(path, manifest, tokenizer_dir) if decode_sample and manifest["shards"] else None
    return {"shards": len(manifest["shards"]), **totals, "sample": sample}


def load_token_manifest(path: Path) -> dict:
    """Reads and checks the format, version, required fields and dtype of a dataset's manifest.json."""
    return load_manifest(path / "manifest.json")


def _check_shard(shard_path: Path, shard: dict, manifest: dict) -> None:
    """Reads every block of one shard and checks it against the shard's manifest entry."""
    name = shard["path"]
    seq_len, rows_per_block = manifest["seq_len"], manifest["rows_per_block"]
    dtype = np.dtype(manifest["dtype"])
    tars = TarFiles([shard_path], _REBUILD_HINT)
    members = tars.members(0)  # refuses absolute and '..' member paths
    expected_members = {
        f"{block_key(index)}.{suffix}" for index in range(shard["blocks"]) for suffix in (DOCS_SUFFIX, TOKENS_SUFFIX)
    }
    if set(members) != expected_members:
        extra = sorted(set(members) - expected_members)[:3]
        missing = sorted(expected_members - set(members))[:3]
        raise DataError(f"shard {name}: unexpected members {extra} / missing members {missing}; {_REBUILD_HINT}")
    if not (shard["rows"] - 1) * seq_len < shard["tokens"] <= shard["rows"] * seq_len:
        raise DataError(f"shard {name}: {shard['tokens']} tokens do not fit {shard['rows']} rows of {seq_len}")
    if shard["blocks"] != -(-shard["rows"] // rows_per_block):
        raise DataError(f"shard {name}: {shard['rows']} rows cannot make {shard['blocks']} blocks of {rows_per_block}")
    rows = documents = 0
    try:
        for index in range(shard["blocks"]):
            key = block_key(index)
            docs = tars.read_npy(0, f"{key}.{DOCS_SUFFIX}")
            tokens = tars.read_npy(0, f"{key}.{TOKENS_SUFFIX}")
            expected_rows = min(rows_per_block, shard["rows"] - rows)
            where = f"shard {name} {key}"
            if tokens.dtype != dtype or tokens.shape != (expected_rows, seq_len):
                raise DataError(
                    f"{where}: tokens are {tokens.dtype} {tokens.shape}, expected {dtype} ({expected_rows}, {seq_len}); "
                    f"{_REBUILD_HINT}"
                )
            if tokens.size and int(tokens.max()) >= manifest["vocab_size"]:
                raise DataError(f"{where}: token id {int(tokens.max())} >= vocab_size {manifest['vocab_size']}")
            if docs.dtype != np.int64 or docs.ndim != 1:
                raise DataError(f"{where}: document starts are {docs.dtype} {docs.shape}, expected 1-D int64")
            if docs.size and (np.any(np.diff(docs) <= 0) or docs[0] < 0 or docs[-1] >= tokens.size):
                raise DataError(f"{where}: document starts are not sorted within [0, {tokens.size}); {_REBUILD_HINT}")
            if index == 0 and (docs.size == 0 or docs[0] != 0):
                raise DataError(f"{where}: the shard must start with a document; {_REBUILD_HINT}")
            flat = tokens.reshape(-1)
            if manifest["add_bos"] and docs.size and np.any(flat[docs] != manifest["bos_id"]):
                raise DataError(f"{where}: a document does not start with bos {manifest['bos_id']}; {_REBUILD_HINT}")
            later = docs[docs > 0]
            if later.size and np.any(flat[later - 1] != manifest["eos_id"]):
                raise DataError(f"{where}: a document is not preceded by eos {manifest['eos_id']}; {_REBUILD_HINT}")
            if index == shard["blocks"] - 1:
                real = shard["tokens"] - rows * seq_len
                if flat[real - 1] != manifest["eos_id"] or np.any(flat[real:] != manifest["pad_id"]):
                    raise DataError(f"{where}: the last document does not end with eos then padding; {_REBUILD_HINT}")
            rows += tokens.shape[0]
            documents += docs.size
    finally:
        tars.close()
    if rows != shard["rows"] or documents != shard["documents"]:
        raise DataError(
            f"shard {name}: holds {rows} rows and {documents} documents, the manifest says {shard['rows']} and "
            f"{shard['documents']}; {_REBUILD_HINT}"
        )


def _decode_first_document(path: Path, manifest: dict, tokenizer_dir: Path) -> str:
    """Decodes the first document of the first shard (up to 4096 tokens) with the dataset's tokenizer."""
    shard = manifest["shards"][0]
    tars = TarFiles([path / shard["path"]], _REBUILD_HINT)
    tokens = tars.read_npy(0, f"{block_key(0)}.{TOKENS_SUFFIX}").reshape(-1)
    tars.close()
    ends = np.flatnonzero(tokens == manifest["eos_id"])
    document = tokens[: ends[0]] if ends.size else tokens
    if manifest["add_bos"]:
        document = document[1:]
    tokenizer = load_tokenizer(tokenizer_dir)
    try:
        return tokenizer.decode(document[:4096].tolist())
    except Exception as error:  # sentencepiece and tokenizers raise their own types
        raise DataError(f"shard {shard['path']}: the first document does not decode ({error}); {_REBUILD_HINT}")
