"""Random-access reader of pre-packed token shards (written by `megatrain-data build`).

A dataset is a folder:

    manifest.json        format "megatrain-token-shards", counts, dtype, seq_len, per-shard sha256,
                         per-source statistics (JSON only: nothing here is ever unpickled)
    tokenizer/           the tokenizer the ids come from
    shard-00000.tar ...  uncompressed tars of blocks

A shard's documents (`[bos] ids <eos>`, concatenated) are cut into rows of `seq_len` tokens and the
rows grouped into blocks of `rows_per_block`. Block `block-NNNNNN` (numbered inside its shard) has
two members: `.tokens.npy`, shape (rows, seq_len); and `.docs.npy`, int64 flat positions inside the
block where a document starts. Only the last row of a shard is short: it is padded with `pad_id`
after the shard's real tokens. One row is one training sample; blocks keep reads large (data.md:
one member per document reads ~20x slower).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megatrain.data.shards import TarFiles, file_sha256, read_manifest, token_dtype
from megatrain.errors import DataError

PACKED_FORMAT = "megatrain-token-shards"
PACKED_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_REBUILD_HINT = "rebuild it with `megatrain-data build ...` (a rerun keeps the shards that are intact)"
_REQUIRED = ("name", "tokenizer", "vocab_size", "dtype", "eos_id", "pad_id", "bos_id", "add_bos", "seq_len",
             "rows_per_block",
             "documents", "tokens", "rows", "sources", "shards")


def is_packed_dataset(path: str | Path) -> bool:
    """True if `path` holds a manifest of the token-shard format (cheap; reads only the manifest)."""
    manifest = Path(path) / MANIFEST_NAME
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("format") == PACKED_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class PackedDataset:
    """A folder of token shards, read one block at a time.

    Safe to pickle into DataLoader workers (see TarFiles). Shards named in `exclude` (failed hash checks under a skip policy) are left out of the
    layout, so every rank that excludes the same shards sees the same rows.

    Args:
        path: The dataset folder (holding manifest.json).
        exclude: Shard file names to leave out.

    Raises:
        DataError: The folder, manifest, tokenizer or a listed shard is missing, or the manifest is
            not a version-1 token-shard manifest.
    """

    def __init__(self, path: str | Path, exclude: frozenset[str] | set[str] = frozenset()):
        self.path = Path(path)
        if not self.path.is_dir():
            raise DataError(f"dataset folder {self.path} does not exist; build it with "
                            f"`megatrain-data build --source NAME=PATH ... --out {self.path}`")
        self.manifest = load_manifest(self.path / MANIFEST_NAME)
        m = self.manifest
        self.name: str = m["name"]
        self.seq_len: int = m["seq_len"]
        self.rows_per_block: int = m["rows_per_block"]
        self.vocab_size: int = m["vocab_size"]
        self.dtype = np.dtype(m["dtype"])
        self.eos_id: int = m["eos_id"]
        self.pad_id: int = m["pad_id"]
        self.tokenizer_path = self.path / m["tokenizer"]["path"]
        if not self.tokenizer_path.exists():
            raise DataError(f"tokenizer {self.tokenizer_path} listed in {self.path / MANIFEST_NAME} is missing; "
                            f"{_REBUILD_HINT}")
        self.shards = [s for s in m["shards"] if s["path"] not in exclude]
        if not self.shards:
            raise DataError(f"dataset {self.path} has no usable shard (all {len(m['shards'])} excluded)")
        for shard in self.shards:
            if not (self.path / shard["path"]).is_file():
                raise DataError(f"shard {self.path / shard['path']} listed in {self.path / MANIFEST_NAME} is "
                                f"missing; {_REBUILD_HINT}")
        self._layout()
        self._tars = TarFiles([self.path / s["path"] for s in self.shards], _REBUILD_HINT)

    def _layout(self) -> None:
        """Per global block: its shard, its index inside the shard, its rows and its last row's tokens."""
        rows, shard_of, local, last_tokens = [], [], [], []
        for shard_index, shard in enumerate(self.shards):
            n_rows, n_blocks = shard["rows"], shard["blocks"]
            if n_blocks < 1 or not (n_blocks - 1) * self.rows_per_block < n_rows <= n_blocks * self.rows_per_block \
                    or not (n_rows - 1) * self.seq_len < shard["tokens"] <= n_rows * self.seq_len:
                raise DataError(f"manifest entry of shard {shard['path']} has {shard['tokens']} tokens in {n_rows} "
                                f"rows and {n_blocks} blocks, which rows of {self.seq_len} and blocks of "
                                f"{self.rows_per_block} cannot hold; {_REBUILD_HINT}")
            rows += [self.rows_per_block] * (n_blocks - 1) + [n_rows - (n_blocks - 1) * self.rows_per_block]
            shard_of += [shard_index] * n_blocks
            local += list(range(n_blocks))
            last_tokens += [self.seq_len] * (n_blocks - 1) + [shard["tokens"] - (n_rows - 1) * self.seq_len]
        self.block_rows = np.asarray(rows, dtype=np.int64)
        self.block_shard = np.asarray(shard_of, dtype=np.int64)
        self.block_local = np.asarray(local, dtype=np.int64)
        self._block_last_row_tokens = np.asarray(last_tokens, dtype=np.int64)
        self.num_blocks = len(rows)
        self.num_rows = int(self.block_rows.sum())
        self.num_tokens = int(sum(s["tokens"] for s in self.shards))

    def __len__(self) -> int:
        return self.num_rows

    def real_tokens(self, blocks: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Real (unpadded) tokens of rows given as (global block, row in block) arrays."""
        blocks, rows = np.asarray(blocks), np.asarray(rows)
        is_last = rows == self.block_rows[blocks] - 1
        return np.where(is_last, self._block_last_row_tokens[blocks], self.seq_len)

    def block_file(self, block: int) -> Path:
        """The shard file that holds a block."""
        return self.path / self.shards[int(self.block_shard[block])]["path"]

    def read_block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Reads one block.

        Args:
            block: Global block index in [0, num_blocks).

        Returns:
            (tokens of shape (rows, seq_len) in the stored dtype, int64 flat positions of document starts).

        Raises:
            DataError: The block is missing from its shard or its arrays disagree with the manifest.
        """
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} out of range [0, {self.num_blocks})")
        shard_index, key = int(self.block_shard[block]), f"block-{int(self.block_local[block]):06d}"
        tokens = self._tars.read_npy(shard_index, f"{key}.tokens.npy")
        docs = self._tars.read_npy(shard_index, f"{key}.docs.npy")
        expected = (int(self.block_rows[block]), self.seq_len)
        if tokens.shape != expected or tokens.dtype != self.dtype or docs.ndim != 1 or docs.dtype != np.int64:
            raise DataError(f"shard {self.shards[shard_index]['path']}: {key} holds tokens {tokens.shape} "
                            f"{tokens.dtype} and docs {docs.shape} {docs.dtype}, expected tokens {expected} "
                            f"{self.dtype} and 1-d int64 docs; {_REBUILD_HINT}")
        return tokens, docs

    def verify_tokenizer(self) -> None:
        """Checks the tokenizer files' sha256 against the manifest.

        Raises:
            DataError: A file differs or is missing, naming it.
        """
        for name, expected in sorted(self.manifest["tokenizer"]["files"].items()):
            path = self.tokenizer_path / name
            actual = file_sha256(path) if path.is_file() else "missing"
            if actual != expected:
                raise DataError(f"tokenizer file {path}: sha256 mismatch (expected {expected}, got {actual}); "
                                f"{_REBUILD_HINT}")

    def find_bad_shards(self, shard_indices) -> list[tuple[str, str, str]]:
        """Hash-checks some shards; returns (file name, expected sha256, actual sha256) of each mismatch."""
        bad = []
        for i in shard_indices:
            shard = self.shards[i]
            actual = file_sha256(self.path / shard["path"])
            if actual != shard["sha256"]:
                bad.append((shard["path"], shard["sha256"], actual))
        return bad


def load_manifest(path: Path) -> dict:
    """Parses a token-shard manifest and checks its format, version, fields and token dtype.

    Raises:
        DataError: Naming the file and what is wrong with it.
    """
    if not path.is_file():
        raise DataError(f"{path} does not exist (an unfinished build, or not a dataset folder); {_REBUILD_HINT}")
    manifest = read_manifest(path, PACKED_FORMAT, PACKED_FORMAT_VERSION, _REQUIRED, _REBUILD_HINT)
    if manifest["dtype"] != token_dtype(manifest["vocab_size"]).name:
        raise DataError(f"{path}: dtype {manifest['dtype']} does not match vocab_size {manifest['vocab_size']} "
                        f"(expected {token_dtype(manifest['vocab_size']).name}); {_REBUILD_HINT}")
    return manifest
