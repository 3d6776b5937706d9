"""`megatrain-data build`: documents -> pre-packed token shards ("megatrain-token-shards" v1).

A dataset is a folder:

    manifest.json       written last, atomically; sorted keys; per-shard sha256 and counts,
                        per-source statistics, every byte-affecting setting
    tokenizer/          a copy of the tokenizer files
    shard-NNNNN.tar     uncompressed USTAR tars with fixed member metadata; blocks of
                        `block-NNNNNN.docs.npy` (int64 document start positions in the block) then
                        `block-NNNNNN.tokens.npy` ((rows, seq_len) token ids)

Work units: the main process reads the sources in order and cuts the document stream into units of
consecutive documents of one source, closing a unit once its text reaches `shard_mb` MB (UTF-8
bytes). Unit i becomes shard i, built by a worker process from that unit alone, so the shards (and
the manifest) depend on the inputs and settings only, never on the worker count or timing.

Resuming: a worker renames its finished shard into place, then writes `.build/shard-NNNNN.json` (its
entry and the unit's signature). A rerun with the same inputs and settings re-reads the sources,
re-hashes and keeps every shard whose sidecar matches, drops leftover temp files, and builds the
rest. `.build/state.json` pins the settings, tokenizer and input files (size, mtime), and a rerun
that differs is refused. `.build/` is removed once manifest.json is written.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from data_tools.packing import write_token_shard
from megatrain.data.shards import shard_file_name
from data_tools.shards import write_json_atomic
from megatrain.data.packed import PACKED_FORMAT, PACKED_FORMAT_VERSION
from data_tools.sources import SourceSpec, input_files, iter_documents, parse_source
from megatrain.data.shards import file_sha256, token_dtype
from megatrain.data.tokenizer import SENTENCEPIECE_FILE, TextTokenizer, load_tokenizer
from megatrain.errors import DataError

MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"
STATE_DIR = ".build"
DEFAULT_SEQ_LEN = 2048
DEFAULT_ROWS_PER_BLOCK = 64
DEFAULT_SHARD_MB = 64.0
_ENCODE_CHUNK_CHARS = 1 << 20
"""Texts are encoded ~1 MB at a time so a worker never holds a whole shard as Python ints."""
_TEMP_MARK = ".tmp-"


@dataclass(frozen=True)
class _UnitJob:
    """What a worker needs to build one shard."""

    index: int
    source: str
    texts: list[str]
    signature: dict


def build_dataset(
    sources: Sequence[SourceSpec | str],
    tokenizer_path: str | Path,
    out_dir: str | Path,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    rows_per_block: int = DEFAULT_ROWS_PER_BLOCK,
    workers: int | None = None,
    shard_mb: float = DEFAULT_SHARD_MB,
    name: str | None = None,
    on_bad_utf8: str = "replace",
    add_bos: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenizes sources into a token-shard dataset, resuming an interrupted build of the same folder.

    Args:
        sources: `SourceSpec`s or `--source` strings (see data_tools.sources), read in this order.
        tokenizer_path: A sentencepiece `.model`, or a folder with `tokenizer.json` or `tokenizer.model`.
        out_dir: The dataset folder: new, empty, or an unfinished build with the same arguments.
        seq_len: Tokens per row.
        rows_per_block: Rows per block (one .npy pair per block).
        workers: Tokenizing processes (default: os.cpu_count()); the bytes do not depend on it.
        shard_mb: Text (MB of UTF-8) per work unit and so per shard.
        name: Dataset name stored in the manifest (default: out_dir's name).
        on_bad_utf8: "replace", "skip" or "error" for documents that are not valid UTF-8.
        add_bos: Start every document with the tokenizer's bos token.
        progress: Show a tqdm bar on stderr (documents, tokens, MB/s, ETA).

    Returns:
        The manifest dict.

    Raises:
        DataError: Bad settings, an empty or unreadable source, a tokenizer without bos under
            add_bos, or an out_dir holding something else (another build, other files).
    """
    out_dir = Path(out_dir)
    specs = [spec if isinstance(spec, SourceSpec) else parse_source(spec) for spec in sources]
    _check_settings(specs, seq_len, rows_per_block, shard_mb, workers, on_bad_utf8)
    workers = workers or os.cpu_count() or 1
    tokenizer = load_tokenizer(tokenizer_path)
    if add_bos and tokenizer.bos_id is None:
        raise DataError(f"--add-bos: tokenizer {tokenizer_path} has no bos token; drop --add-bos")
    dtype = token_dtype(tokenizer.vocab_size).name
    settings = {
        "seq_len": seq_len,
        "rows_per_block": rows_per_block,
        "shard_mb": shard_mb,
        "on_bad_utf8": on_bad_utf8,
        "add_bos": add_bos,
        "sources": [str(spec) for spec in specs],
    }
    tokenizer_files = {_dataset_file_name(tokenizer, path): file_sha256(path) for path in tokenizer.files}
    state = {
        "settings": settings,
        "tokenizer": {"kind": tokenizer.kind, "files": tokenizer_files},
        "inputs": {spec.name: _input_fingerprint(spec) for spec in specs},
    }
    finished = _prepare_out_dir(out_dir, state)
    if finished is not None:
        return finished
    _copy_tokenizer(tokenizer, out_dir / TOKENIZER_DIR)
    total_input_bytes = sum(entry["size"] for inputs in state["inputs"].values() for entry in inputs)
    runner = _UnitRunner(out_dir, workers, progress, total_input_bytes)
    source_stats: dict[str, dict] = {}
    entries: list[dict] = []
    try:
        for job, input_bytes in _iter_jobs(specs, on_bad_utf8, shard_mb, source_stats):
            runner.submit(job, input_bytes)
        entries = runner.finish()
    finally:
        runner.close()

    for stats in source_stats.values():
        stats["tokens"] = 0
        stats["shards"] = 0
    for entry in entries:
        source_stats[entry["source"]]["tokens"] += entry["tokens"]
        source_stats[entry["source"]]["shards"] += 1
    for stats in source_stats.values():
        stats.pop("input_bytes_read", None)
    for spec in specs:
        source_stats[spec.name]["input_bytes"] = sum(entry["size"] for entry in state["inputs"][spec.name])
    manifest = {
        "format": PACKED_FORMAT,
        "version": PACKED_FORMAT_VERSION,
        "name": name or out_dir.resolve().name,
        "tokenizer": {"path": TOKENIZER_DIR, "kind": tokenizer.kind, "files": tokenizer_files},
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "bos_id": tokenizer.bos_id,
        "add_bos": add_bos,
        "seq_len": seq_len,
        "rows_per_block": rows_per_block,
        "documents": sum(entry["documents"] for entry in entries),
        "tokens": sum(entry["tokens"] for entry in entries),
        "rows": sum(entry["rows"] for entry in entries),
        "settings": settings,
        "sources": source_stats,
        "shards": entries,
    }
    write_manifest(out_dir, manifest)
    shutil.rmtree(out_dir / STATE_DIR, ignore_errors=True)
    return manifest


def write_manifest(out_dir: str | Path, manifest: dict) -> None:
    """Writes `out_dir/manifest.json` (sorted keys, indent 2) atomically via a temp file."""
    write_json_atomic(Path(out_dir) / MANIFEST_NAME, manifest)


def _iter_jobs(
    specs: Sequence[SourceSpec], on_bad_utf8: str, shard_mb: float, source_stats: dict
) -> Iterator[tuple[_UnitJob, int]]:
    """Cuts the sources' documents into work units; yields (job, raw input bytes the unit consumed)."""
    unit_bytes = max(1, int(shard_mb * 1_000_000))
    index = 0
    for spec in specs:
        stats = source_stats[spec.name] = {}
        texts: list[str] = []
        size = 0
        first_id = last_id = None
        consumed = 0
        for document in iter_documents(spec, on_bad_utf8, stats):
            if first_id is None:
                first_id = document.id
            last_id = document.id
            texts.append(document.text)
            size += len(document.text) if document.text.isascii() else len(document.text.encode("utf-8"))
            if size >= unit_bytes:
                yield _job(index, spec.name, texts, first_id, document.id, size), stats["input_bytes_read"] - consumed
                consumed = stats["input_bytes_read"]
                index += 1
                texts, size, first_id = [], 0, None
        if texts:
            yield _job(index, spec.name, texts, first_id, last_id, size), stats["input_bytes_read"] - consumed
            index += 1


def _job(index: int, source: str, texts: list[str], first_id: str, last_id: str, size: int) -> _UnitJob:
    signature = {"source": source, "first": first_id, "last": last_id, "documents": len(texts), "bytes": size}
    return _UnitJob(index, source, texts, signature)


class _UnitRunner:
    """Builds units in worker processes (or in-process for one worker), keeping finished shards."""

    def __init__(self, out_dir: Path, workers: int, progress: bool, total_input_bytes: int):
        self.out_dir = out_dir
        self.workers = workers
        self.entries: dict[int, dict] = {}
        self.pending: dict[concurrent.futures.Future, tuple[int, int]] = {}
        self.documents = 0
        self.tokens = 0
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_input_bytes, unit="B", unit_scale=True, desc="build", file=sys.stderr,
                            dynamic_ncols=True)
        self.pool = None
        if workers > 1:
            self.pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=workers,
                mp_context=_worker_context(),
                initializer=_init_worker,
                initargs=(str(out_dir), _threads_per_worker(workers)),
            )
        else:
            _init_worker(str(out_dir), None)

    def submit(self, job: _UnitJob, input_bytes: int) -> None:
        kept = _finished_entry(self.out_dir, job)
        if kept is not None:
            self._done(job.index, kept, input_bytes)
            return
        if self.pool is None:
            self._done(job.index, _build_unit(job), input_bytes)
            return
        # Bounded in-flight units: reading runs ahead of tokenizing by at most two units per worker.
        while len(self.pending) >= 2 * self.workers:
            self._collect(concurrent.futures.FIRST_COMPLETED)
        future = self.pool.submit(_build_unit, job)
        self.pending[future] = (job.index, input_bytes)

    def finish(self) -> list[dict]:
        while self.pending:
            self._collect(concurrent.futures.FIRST_COMPLETED)
        return [self.entries[index] for index in sorted(self.entries)]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.bar is not None:
            self.bar.close()

    def _collect(self, return_when) -> None:
        done, _ = concurrent.futures.wait(self.pending, return_when=return_when)
        for future in done:
            index, input_bytes = self.pending.pop(future)
            self._done(index, future.result(), input_bytes)

    def _done(self, index: int, entry: dict, input_bytes: int) -> None:
        self.entries[index] = entry
        self.documents += entry["documents"]
        self.tokens += entry["tokens"]
        if self.bar is not None:
            self.bar.set_postfix(docs=self.documents, tokens=self.tokens, shards=len(self.entries), refresh=False)
            self.bar.update(input_bytes)


_worker: dict = {}


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers forked from a fork server that has imported this module once (numpy, sentencepiece...).

    Not plain fork: the parent may hold tokenizer thread pools and tqdm's monitor thread. Not spawn:
    each spawned worker re-imports everything (~0.3 s of CPU each, a tenth of a 17 MB build's work).
    The server is started once per process and reused by later builds; spawn where it is missing.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _init_worker(out_dir: str, threads: int | None) -> None:
    """Loads the dataset's tokenizer copy once per worker process."""
    if threads is not None:
        # HF tokenizers read this on their first parallel call; one pool per worker, not per core.
        os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
    manifest_settings = json.loads((Path(out_dir) / STATE_DIR / "state.json").read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(Path(out_dir) / TOKENIZER_DIR, num_threads=threads)
    _worker.update(out_dir=Path(out_dir), tokenizer=tokenizer, settings=manifest_settings["settings"])


def _threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def _build_unit(job: _UnitJob) -> dict:
    """Tokenizes one unit, writes its shard atomically, then its sidecar. Runs in a worker."""
    out_dir: Path = _worker["out_dir"]
    tokenizer: TextTokenizer = _worker["tokenizer"]
    settings = _worker["settings"]
    shard_name = shard_file_name(job.index)
    temp_path = out_dir / f"{shard_name}{_TEMP_MARK}{os.getpid()}"
    entry = write_token_shard(
        temp_path,
        _encode_in_chunks(tokenizer, job.texts),
        seq_len=settings["seq_len"],
        rows_per_block=settings["rows_per_block"],
        dtype=token_dtype(tokenizer.vocab_size),
        pad_id=tokenizer.pad_id,
        eos_id=tokenizer.eos_id,
        bos_id=tokenizer.bos_id if settings["add_bos"] else None,
    )
    entry["path"] = shard_name
    entry["source"] = job.source
    os.replace(temp_path, out_dir / shard_name)
    # The sidecar is written after the shard is in place: a sidecar always means a complete shard.
    write_json_atomic(_sidecar_path(out_dir, job.index), {"entry": entry, "signature": job.signature})
    return entry


def _encode_in_chunks(tokenizer: TextTokenizer, texts: list[str]) -> Iterator[list[int]]:
    chunk: list[str] = []
    chars = 0
    for text in texts:
        chunk.append(text)
        chars += len(text)
        if chars >= _ENCODE_CHUNK_CHARS:
            yield from tokenizer.encode_batch(chunk)
            chunk, chars = [], 0
    if chunk:
        yield from tokenizer.encode_batch(chunk)


def _finished_entry(out_dir: Path, job: _UnitJob) -> dict | None:
    """The entry of a shard a previous run finished for this very unit, re-hashed; else None."""
    sidecar_path = _sidecar_path(out_dir, job.index)
    if not sidecar_path.is_file():
        return None
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
        entry = sidecar["entry"]
        shard_path = out_dir / entry["path"]
        if sidecar["signature"] == job.signature and shard_path.is_file() and file_sha256(shard_path) == entry["sha256"]:
            return entry
    except (OSError, ValueError, KeyError, TypeError):
        pass  # a damaged sidecar just means the shard is rebuilt
    sidecar_path.unlink(missing_ok=True)
    return None


def _prepare_out_dir(out_dir: Path, state: dict) -> dict | None:
    """Creates, resumes or refuses out_dir. Returns the manifest if the same build already finished."""
    state_path = out_dir / STATE_DIR / "state.json"
    manifest_path = out_dir / MANIFEST_NAME
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        same = (
            manifest.get("format") == PACKED_FORMAT
            and manifest.get("settings") == state["settings"]
            and manifest.get("tokenizer", {}).get("files") == state["tokenizer"]["files"]
        )
        if not same:
            raise DataError(
                f"{out_dir} already holds a finished dataset built with other settings, sources or tokenizer; "
                "remove it or choose another --out"
            )
        from data_tools.verify import verify_token_dataset

        verify_token_dataset(out_dir, check_blocks=False, decode_sample=False)
        return manifest
    if state_path.is_file():
        previous = json.loads(state_path.read_text(encoding="utf-8"))
        differences = _differences(previous, state)
        if differences:
            raise DataError(
                f"{out_dir} holds an unfinished build with different {'; '.join(differences)}; rerun with the "
                "same arguments and inputs to resume, or remove the folder"
            )
    else:
        if out_dir.exists() and any(out_dir.iterdir()):
            raise DataError(f"{out_dir} is not empty and holds no build; remove it or choose another --out")
        write_json_atomic(state_path, state)
    for leftover in out_dir.iterdir():
        if _TEMP_MARK in leftover.name and leftover.is_file():
            leftover.unlink()  # a killed worker's half-written shard
    return None


def _differences(previous: dict, current: dict) -> list[str]:
    """Names what differs between two build states, e.g. "settings.seq_len (512 vs 1024)"."""
    found = []
    for key in sorted(set(previous.get("settings", {})) | set(current["settings"])):
        old, new = previous.get("settings", {}).get(key), current["settings"].get(key)
        if old != new:
            found.append(f"settings.{key} ({old} vs {new})")
    if previous.get("tokenizer") != current["tokenizer"]:
        found.append("tokenizer (file hashes differ)")
    for name in sorted(set(previous.get("inputs", {})) | set(current["inputs"])):
        if previous.get("inputs", {}).get(name) != current["inputs"].get(name):
            found.append(f"input files of source {name} (changed, added or removed)")
    return found


def _input_fingerprint(spec: SourceSpec) -> list[dict]:
    """Each input file's path, size and mtime: enough to notice changed inputs on resume."""
    fingerprint = []
    for path in input_files(spec):
        stat = path.stat()
        fingerprint.append({"path": path.as_posix(), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return fingerprint


def _dataset_file_name(tokenizer: TextTokenizer, path: Path) -> str:
    # A bare .model file is stored as tokenizer.model so `load_tokenizer(DATASET/tokenizer)` finds it.
    return SENTENCEPIECE_FILE if tokenizer.kind == "sentencepiece" else path.name


def _copy_tokenizer(tokenizer: TextTokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in tokenizer.files:
        shutil.copyfile(path, folder / _dataset_file_name(tokenizer, path))


def _sidecar_path(out_dir: Path, index: int) -> Path:
    return out_dir / STATE_DIR / f"{shard_file_name(index)}.json"


def _check_settings(specs, seq_len, rows_per_block, shard_mb, workers, on_bad_utf8) -> None:
    if not specs:
        raise DataError("no --source given; e.g. --source arxiv=data/arxiv/*.jsonl.zst")
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DataError(f"source name(s) {', '.join(duplicates)} given twice; name each source NAME=PATH")
    for flag, value in (("--seq-len", seq_len), ("--rows-per-block", rows_per_block), ("--shard-mb", shard_mb)):
        if not value > 0:
            raise DataError(f"{flag} must be positive, got {value}")
    if workers is not None and workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    if on_bad_utf8 not in ("replace", "skip", "error"):
        raise DataError(f"--on-bad-utf8 {on_bad_utf8!r}: expected replace, skip or error")
