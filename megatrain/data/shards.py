"""Random-access reader of pre-tokenized Q/A shards (written by `data_tools.shards`).

A shard set is a folder:

    manifest.json        format, counts, token dtype, special ids, per-shard sha256
    tokenizer.model      the sentencepiece model the tokens come from
    shard-00000.tar ...  uncompressed tars (webdataset layout) of blocks

Each block `block-NNNNNN` (global index over the set) holds up to `block_size` samples as two
members: `.tokens.npy`, every sample's question tokens then answer tokens, concatenated; and
`.lengths.npy`, int32 (n, 2) of (question_len, answer_len). Many samples per member because one
member per sample reads ~20x slower. No bos/sep/eos are stored: the trainer adds them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np

from megatrain.errors import DataError

SHARD_FORMAT = "megatrain-qa-shards"
SHARD_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.model"
TOKENS_SUFFIX = "tokens.npy"
LENGTHS_SUFFIX = "lengths.npy"
_REBUILD_HINT = "rebuild it with `megatrain-data deepmind shards ...`"
_REQUIRED = ("tokenizer", "tokenizer_sha256", "vocab_size", "dtype", "block_size", "samples", "tokens", "shards")


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding every id of a vocabulary of `vocab_size`."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def shard_file_name(shard_index: int) -> str:
    """File name of the `shard_index`-th shard."""
    return f"shard-{shard_index:05d}.tar"


def block_key(block_index: int) -> str:
    """Webdataset key of a block, numbered over the whole set."""
    return f"block-{block_index:06d}"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


class TarFiles:
    """Reads `.npy` members of uncompressed tars by seeking: one index of member offsets per tar,
    and this process's open files.

    Picklable into DataLoader workers: the index travels, open files do not (a forked child shares
    its parent's file offsets, so it must open its own).

    Args:
        paths: The tar files, addressed by their position in this list.
        hint: What to do about a broken tar, appended to error messages.
        max_open: Open files kept at once (a reader touches few shards at a time).
    """

    def __init__(self, paths: list[Path], hint: str, max_open: int = 64):
        self.paths, self.hint, self.max_open = paths, hint, max_open
        self._index: dict[int, dict[str, tuple[int, int]]] = {}
        self._files: dict[int, BinaryIO] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def members(self, i: int) -> dict[str, tuple[int, int]]:
        """Member name -> (data offset, size) of tar i (headers only; cached)."""
        if i not in self._index:
            self._index[i] = index_tar(self.paths[i])
        return self._index[i]

    def read_npy(self, i: int, member: str) -> np.ndarray:
        """Loads one `.npy` member of tar i, without pickle.

        Raises:
            DataError: The member is missing, truncated or not a valid .npy.
        """
        name = self.paths[i].name
        location = self.members(i).get(member)
        if location is None:
            raise DataError(f"shard {name} has no member {member}; {self.hint}")
        offset, size = location
        file = self._file(i)
        file.seek(offset)
        data = file.read(size)
        if len(data) != size:
            raise DataError(f"shard {name} is truncated at {member}; {self.hint}")
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as error:
            raise DataError(f"shard {name}: {member} is not a valid .npy ({error}); {self.hint}")

    def close(self) -> None:
        """Closes the open files (they reopen on the next read)."""
        for file in self._files.values():
            file.close()
        self._files = {}

    def _file(self, i: int) -> BinaryIO:
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        if i not in self._files:
            if len(self._files) >= self.max_open:
                self._files.pop(next(iter(self._files))).close()
            self._files[i] = open(self.paths[i], "rb")
        return self._files[i]


class ShardSet:
    """A folder of Q/A shards, read block by block with random access.

    Safe to pickle into DataLoader workers before or after use: open files are dropped when
    pickled and reopened per process.

    Args:
        path: The shard folder (holding manifest.json).
        verify: Also check every shard's sha256 now (reads all of them).

    Raises:
        DataError: The folder, manifest, tokenizer or a listed shard is missing, or the manifest
            is not a version-1 megatrain-qa-shards manifest.
    """

    def __init__(self, path: str | Path, verify: bool = False):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_NAME
        if not self.path.is_dir():
            raise DataError(
                f"shard folder {self.path} does not exist; run `megatrain-data deepmind shards ... --out {self.path}`"
            )
        if not manifest_path.is_file():
            raise DataError(
                f"{manifest_path} does not exist (unfinished or not a shard folder); "
                f"run `megatrain-data deepmind shards ... --out {self.path}`"
            )
        self.manifest: dict = read_manifest(manifest_path, SHARD_FORMAT, SHARD_FORMAT_VERSION, _REQUIRED, _REBUILD_HINT)
        self.tokenizer_path = self.path / self.manifest["tokenizer"]
        if not self.tokenizer_path.is_file():
            raise DataError(f"tokenizer {self.tokenizer_path} listed in {manifest_path} is missing; {_REBUILD_HINT}")
        self.shard_paths = [self.path / shard["path"] for shard in self.manifest["shards"]]
        for shard_path in self.shard_paths:
            if not shard_path.is_file():
                raise DataError(f"shard {shard_path} listed in {manifest_path} is missing; {_REBUILD_HINT}")
        self.num_samples: int = self.manifest["samples"]
        self.dtype = np.dtype(self.manifest["dtype"])
        self.block_lengths, self._block_shard = _block_layout(self.manifest)
        self.num_blocks = len(self.block_lengths)
        # Named subsets (one per DeepMind module): each shard holds one, so a block's is its shard's.
        # A set written before subsets existed is one subset, named by its module.
        self.source_names: list[str] = self.manifest.get("sources") or [
            str(self.manifest.get("source", {}).get("module") or self.path.name)]
        named = [shard.get("source", self.source_names[0]) for shard in self.manifest["shards"]]
        if not set(named) <= set(self.source_names):
            raise DataError(f"{manifest_path}: shard source(s) {sorted(set(named) - set(self.source_names))} are not "
                            f"among its sources {self.source_names}; {_REBUILD_HINT}")
        shard_sources = [self.source_names.index(name) for name in named]
        self.block_source = [shard_sources[shard] for shard in self._block_shard]
        if sum(self.block_lengths) != self.num_samples:
            raise DataError(
                f"{manifest_path}: shard sample counts do not add up to samples={self.num_samples}; {_REBUILD_HINT}"
            )
        self._tars = TarFiles(self.shard_paths, _REBUILD_HINT)
        if verify:
            self.verify()

    def __len__(self) -> int:
        return self.num_samples

    def block_file(self, block_index: int) -> Path:
        """The shard file that holds a block."""
        return self.shard_paths[self._block_shard[block_index]]

    def read_block(self, block_index: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Reads one block.

        Args:
            block_index: Global block index in [0, num_blocks).

        Returns:
            (question_tokens, answer_tokens) per sample, as int64 arrays, in stored order.

        Raises:
            IndexError: `block_index` is out of range.
            DataError: The block is missing from its shard or its arrays disagree.
        """
        if not 0 <= block_index < self.num_blocks:
            raise IndexError(f"block {block_index} out of range [0, {self.num_blocks})")
        shard_index = self._block_shard[block_index]
        key = block_key(block_index)
        tokens = self._tars.read_npy(shard_index, f"{key}.{TOKENS_SUFFIX}")
        lengths = self._tars.read_npy(shard_index, f"{key}.{LENGTHS_SUFFIX}")
        expected_samples = self.block_lengths[block_index]
        if lengths.shape != (expected_samples, 2) or tokens.ndim != 1 or tokens.size != int(lengths.sum()):
            raise DataError(
                f"shard {self.shard_paths[shard_index].name}: {key} has lengths {lengths.shape} and "
                f"{tokens.size} tokens, expected ({expected_samples}, 2) summing to the tokens; {_REBUILD_HINT}"
            )
        tokens = tokens.astype(np.int64)
        # Offsets of each sample's question start, answer start and end in the flat token array.
        sample_ends = np.cumsum(lengths.sum(axis=1))
        sample_starts = sample_ends - lengths.sum(axis=1)
        answer_starts = sample_starts + lengths[:, 0]
        return [
            (tokens[start:answer_start], tokens[answer_start:end])
            for start, answer_start, end in zip(sample_starts.tolist(), answer_starts.tolist(), sample_ends.tolist())
        ]

    def verify(self) -> None:
        """Checks the sha256 of the tokenizer and of every shard against the manifest.

        Raises:
            DataError: A file's hash differs, naming the file.
        """
        expected_tokenizer = self.manifest["tokenizer_sha256"]
        actual_tokenizer = file_sha256(self.tokenizer_path)
        if actual_tokenizer != expected_tokenizer:
            raise DataError(
                f"tokenizer {self.tokenizer_path.name}: sha256 mismatch (expected {expected_tokenizer}, "
                f"got {actual_tokenizer}); {_REBUILD_HINT}"
            )
        for shard, shard_path in zip(self.manifest["shards"], self.shard_paths):
            actual = file_sha256(shard_path)
            if actual != shard["sha256"]:
                raise DataError(
                    f"shard {shard['path']}: sha256 mismatch (expected {shard['sha256']}, got {actual}); "
                    f"{_REBUILD_HINT}"
                )

    def close(self) -> None:
        """Closes the open shard files (they reopen on the next read)."""
        self._tars.close()


def read_manifest(path: Path, format_name: str, version: int, required: tuple[str, ...], hint: str) -> dict:
    """Parses a shard folder's manifest.json and checks its format, version and required fields.

    Raises:
        DataError: Naming the file and what is wrong with it, followed by `hint`.
    """
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is not valid JSON ({error}); {hint}")
    if not isinstance(manifest, dict) or manifest.get("format") != format_name:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{path} has format {found!r}, expected {format_name!r}; {hint}")
    if manifest.get("version") != version:
        raise DataError(f"{path} is version {manifest.get('version')!r}; this megatrain reads version {version}; {hint}")
    missing = [field for field in required if field not in manifest]
    if missing:
        raise DataError(f"{path} lacks field(s) {', '.join(missing)}; {hint}")
    return manifest


def _block_layout(manifest: dict) -> tuple[list[int], list[int]]:
    """Derives samples per global block and the shard of each block from the manifest.

    The writer fills every block to `block_size` except the last block of each shard.
    """
    block_size = manifest["block_size"]
    block_lengths, block_shard = [], []
    for shard_index, shard in enumerate(manifest["shards"]):
        samples, blocks = shard["samples"], shard["blocks"]
        if blocks < 1 or not (blocks - 1) * block_size < samples <= blocks * block_size:
            raise DataError(
                f"manifest entry of shard {shard['path']} has {samples} samples in {blocks} blocks of "
                f"{block_size}; {_REBUILD_HINT}"
            )
        block_lengths += [block_size] * (blocks - 1) + [samples - (blocks - 1) * block_size]
        block_shard += [shard_index] * blocks
    return block_lengths, block_shard


def index_tar(shard_path: Path) -> dict[str, tuple[int, int]]:
    """Maps each member name of an uncompressed tar to (data offset, size), reading headers only.

    Raises:
        DataError: The tar is unreadable or has a member that is not a plain relative file.
    """
    index = {}
    try:
        with tarfile.open(shard_path, mode="r:") as tar:
            for member in tar:
                member_path = PurePosixPath(member.name)
                if member_path.is_absolute() or ".." in member_path.parts:
                    raise DataError(
                        f"shard {shard_path} has member {member.name!r} with an absolute path or '..'; "
                        "refusing to read it"
                    )
                if not member.isfile():
                    raise DataError(
                        f"shard {shard_path} has member {member.name!r} that is not a plain file; refusing to read it"
                    )
                index[member.name] = (member.offset_data, member.size)
    except tarfile.TarError as error:
        raise DataError(f"shard {shard_path} is not a readable tar ({error}); {_REBUILD_HINT}")
    return index
