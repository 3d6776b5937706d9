"""Document sources for `megatrain-data build`: jsonl(.gz/.zst), parquet, file trees, `datasets`
save_to_disk folders and the DeepMind released format, read as one stream of `Document`s.

A source is named on the command line as `[NAME=][KIND:]PATH[#KEY=VALUE&KEY=VALUE]`:

    arxiv=data/arxiv/train/*.jsonl.zst        jsonl files (Proof-Pile-2 `{"text", "meta"}` records)
    web=parquet:data/web                      every *.parquet under a folder
    pari=/usr/share/pari/doc/*.tex            plain files by glob (`**` recurses; *.gz/*.zst unpacked)
    gap=docs/**/*.html                        HTML files: markup stripped, script/style dropped
    wiki=hf_disk:data/wiki#split=train        a `datasets.Dataset(Dict).save_to_disk` folder
    math=deepmind:released#module=algebra__linear_1d&splits=train-easy,train-medium

KIND is inferred when omitted: a folder holding `state.json`/`dataset_dict.json` is hf_disk, one
holding the released split folders is deepmind, a folder of jsonl/parquet files is that kind,
and a glob or file is jsonl/parquet by extension, else plain files. NAME defaults to the folder or
file name. Options: `text=FIELD` (jsonl, parquet, hf_disk: the text field, default "text"),
`split=NAME` (hf_disk), `module=M` and `splits=A,B` (deepmind).

Every source lists its files sorted, so the document order (and everything built from it) is
deterministic. Reading never imports torch.
"""

from __future__ import annotations

import glob
import gzip
import html
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from megatrain.data.released import TRAIN_SPLITS, read_pairs
from megatrain.errors import DataError

KINDS = ("jsonl", "parquet", "files", "hf_disk", "deepmind")
BAD_UTF8_POLICIES = ("replace", "skip", "error")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst")
HTML_SUFFIXES = (".html", ".htm")
_RELEASED_SPLITS = ("train-easy", "train-medium", "train-hard", "interpolate", "extrapolate")
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
_OPTIONS = {
    "jsonl": {"text"},
    "parquet": {"text"},
    "files": set(),
    "hf_disk": {"text", "split"},
    "deepmind": {"module", "splits"},
}
_SYNTAX = "[NAME=][KIND:]PATH[#KEY=VALUE&...], e.g. arxiv=data/arxiv/*.jsonl.zst"


@dataclass(frozen=True)
class Document:
    """One document of a source.

    Attributes:
        text: The document's text (valid UTF-8; bad bytes replaced per the build's setting).
        source: The source's name, e.g. "pari-doc".
        id: Stable id within the source: "path/in/tree.tex", "file.jsonl.zst:123" (0-based line),
            "part.parquet:7" (0-based row) or "train-easy/algebra__linear_1d.txt:4" (pair index).
        meta: JSON-serializable metadata from the input's "meta" or from path info.
    """

    text: str
    source: str
    id: str
    meta: dict


@dataclass(frozen=True)
class SourceSpec:
    """A parsed `--source` argument.

    Attributes:
        name: The source's name (manifest key, Document.source).
        path: PATH as given (a file, folder or glob).
        kind: One of KINDS.
        options: Sorted (key, value) pairs from the `#KEY=VALUE&...` suffix.
    """

    name: str
    path: str
    kind: str
    options: tuple[tuple[str, str], ...] = field(default=())

    def option(self, key: str, default: str | None = None) -> str | None:
        """Returns option `key` or `default`."""
        return dict(self.options).get(key, default)

    def __str__(self) -> str:
        suffix = "#" + "&".join(f"{key}={value}" for key, value in self.options) if self.options else ""
        return f"{self.name}={self.kind}:{self.path}{suffix}"


def parse_source(text: str) -> SourceSpec:
    """Parses `[NAME=][KIND:]PATH[#KEY=VALUE&...]` and checks the input exists and is not empty.

    Args:
        text: The `--source` argument.

    Returns:
        The spec, with KIND inferred if omitted.

    Raises:
        DataError: Bad syntax, an unknown kind or option, a missing path or a glob matching no file.
    """
    rest = text.strip()
    if not rest:
        raise DataError(f"empty --source; expected {_SYNTAX}")
    name = None
    head, sep, tail = rest.partition("=")
    if sep and "/" not in head and ":" not in head and "#" not in head:
        name, rest = head, tail
    kind = None
    head, sep, tail = rest.partition(":")
    if sep and head in KINDS:
        kind, rest = head, tail
    elif sep and "/" not in head and re.fullmatch(r"[a-z_]+", head) and not Path(rest).exists():
        raise DataError(f"--source {text!r}: unknown kind {head!r}; kinds are {', '.join(KINDS)}")
    path, _, option_text = rest.partition("#")
    if not path:
        raise DataError(f"--source {text!r} has no PATH; expected {_SYNTAX}")
    options = _parse_options(text, option_text)
    if kind is None:
        kind = _infer_kind(text, path)
    unknown = sorted(set(dict(options)) - _OPTIONS[kind])
    if unknown:
        allowed = ", ".join(sorted(_OPTIONS[kind])) or "none"
        raise DataError(f"--source {text!r}: unknown option(s) {', '.join(unknown)} for kind {kind} (allowed: {allowed})")
    if name is None:
        name = _default_name(path)
    if not _NAME_PATTERN.fullmatch(name):
        raise DataError(
            f"--source {text!r}: name {name!r} must be letters, digits, '_', '.', '+' or '-'; give one as NAME=PATH"
        )
    spec = SourceSpec(name=name, path=path, kind=kind, options=options)
    input_files(spec)  # raises a clear error now for a missing or empty input
    return spec


def input_files(spec: SourceSpec) -> list[Path]:
    """The files a source reads, in reading order (sorted).

    Raises:
        DataError: The path is missing or holds no input file of the source's kind.
    """
    path = Path(spec.path)
    if spec.kind == "hf_disk":
        return [file for _, file in _hf_disk_files(spec)]
    if spec.kind == "deepmind":
        return [file for _, _, file in _released_files(spec)]
    if _is_glob(spec.path):
        files = sorted(Path(match) for match in glob.glob(spec.path, recursive=True) if Path(match).is_file())
        if not files:
            raise DataError(f"source {spec.name}: glob {spec.path!r} matches no file; check the pattern")
        return files
    if path.is_file():
        return [path]
    if path.is_dir():
        suffixes = {"jsonl": JSONL_SUFFIXES, "parquet": (".parquet",)}.get(spec.kind)
        if suffixes is None:
            raise DataError(
                f"source {spec.name}: {path} is a folder; give a glob of its files, e.g. '{path}/**/*.tex'"
            )
        files = sorted(file for file in path.rglob("*") if file.is_file() and file.name.endswith(suffixes))
        if not files:
            raise DataError(f"source {spec.name}: folder {path} holds no {'/'.join(suffixes)} file")
        return files
    raise DataError(f"source {spec.name}: {path} does not exist; check the path")


def source_root(spec: SourceSpec) -> Path:
    """The folder document ids and `meta["path"]` are relative to."""
    if _is_glob(spec.path):
        fixed = []
        for part in Path(spec.path).parts:
            if _is_glob(part):
                break
            fixed.append(part)
        return Path(*fixed) if fixed else Path(".")
    path = Path(spec.path)
    return path if path.is_dir() else path.parent


def iter_documents(spec: SourceSpec, on_bad_utf8: str = "replace", stats: dict | None = None) -> Iterator[Document]:
    """Yields a source's documents in a deterministic order (sorted files, then file order).

    Empty documents are dropped (counted as "empty"): they would only add an eos.

    Args:
        spec: From `parse_source`.
        on_bad_utf8: What to do with a document holding bytes that are not UTF-8: "replace" them
            with U+FFFD, "skip" the document, or "error" (raise DataError naming it).
        stats: If given, counters are added to it: "documents", "bytes" (UTF-8 bytes of text
            yielded), "bad_utf8" (documents with bad bytes, whatever the policy), "skipped",
            "empty", "files", and "input_bytes_read" (raw file bytes consumed so far, for progress).

    Yields:
        Documents.

    Raises:
        DataError: An unknown policy, malformed input (names the file and line/row), bad UTF-8 under
            "error", or a source that yields no document at all.
    """
    if on_bad_utf8 not in BAD_UTF8_POLICIES:
        raise DataError(f"--on-bad-utf8 {on_bad_utf8!r}: expected one of {', '.join(BAD_UTF8_POLICIES)}")
    if stats is None:
        stats = {}
    for key in ("documents", "bytes", "bad_utf8", "skipped", "empty", "files", "input_bytes_read"):
        stats.setdefault(key, 0)
    reader = {
        "jsonl": _iter_jsonl,
        "parquet": _iter_parquet,
        "files": _iter_files,
        "hf_disk": _iter_hf_disk,
        "deepmind": _iter_deepmind,
    }[spec.kind]
    yielded = 0
    for document in reader(spec, _Utf8Policy(on_bad_utf8, stats)):
        if not document.text:
            stats["empty"] += 1
            continue
        stats["documents"] += 1
        stats["bytes"] += _utf8_len(document.text)
        yielded += 1
        yield document
    if not yielded:
        raise DataError(
            f"source {spec.name} ({spec.path}) yielded no document ({stats['skipped']} skipped for bad UTF-8, "
            f"{stats['empty']} empty); check the input"
        )


class _Utf8Policy:
    """Decodes bytes (and checks str from JSON) under the on_bad_utf8 policy, counting bad documents."""

    def __init__(self, policy: str, stats: dict):
        self.policy = policy
        self.stats = stats

    def decode(self, data: bytes, where: str) -> str | None:
        """Returns the text, or None if the document is to be skipped."""
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as error:
            return self._bad(where, f"{error.reason} at byte {error.start}", lambda: data.decode("utf-8", "replace"))

    def check(self, text: str, where: str) -> str | None:
        """Checks a str parsed from JSON/Arrow: JSON escapes can hold lone surrogates, not UTF-8."""
        if text.isascii():
            return text
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            return self._bad(where, f"{error.reason} at character {error.start}",
                             lambda: text.encode("utf-8", "replace").decode("utf-8"))
        return text

    def _bad(self, where: str, reason: str, replaced) -> str | None:
        self.stats["bad_utf8"] += 1
        if self.policy == "error":
            raise DataError(
                f"{where} is not valid UTF-8 ({reason}); fix the input or pass --on-bad-utf8 replace|skip"
            )
        if self.policy == "skip":
            self.stats["skipped"] += 1
            return None
        return replaced()


def _iter_jsonl(spec: SourceSpec, policy: _Utf8Policy) -> Iterator[Document]:
    text_field = spec.option("text", "text")
    root = source_root(spec)
    for path in input_files(spec):
        relative = _relative(path, root)
        base = policy.stats["input_bytes_read"]
        with open(path, "rb") as raw, _open_decompressed(path, raw) as lines:
            for line_number, line in enumerate(lines):
                where = f"{path}:{line_number}"
                if not line.strip():
                    continue
                # Decode ourselves: json.loads(bytes) would raise on bad UTF-8 instead of applying the policy.
                line_text = policy.decode(line, where)
                if line_text is None:
                    continue
                try:
                    record = json.loads(line_text)
                except json.JSONDecodeError as error:
                    raise DataError(f"{where} is not valid JSON ({error.msg}); fix or remove the line") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise DataError(
                        f"{where} has no string field {text_field!r}; jsonl sources hold "
                        f'{{"{text_field}": ..., "meta": {{...}}}} records (choose the field with #text=NAME)'
                    )
                text = policy.check(record[text_field], where)
                policy.stats["input_bytes_read"] = base + raw.tell()
                if text is None:
                    continue
                yield Document(text, spec.name, f"{relative}:{line_number}", _meta_dict(record.get("meta")))
        policy.stats["files"] += 1
        policy.stats["input_bytes_read"] = base + path.stat().st_size


def _iter_parquet(spec: SourceSpec, policy: _Utf8Policy) -> Iterator[Document]:
    import pyarrow.parquet as pq

    text_field = spec.option("text", "text")
    root = source_root(spec)
    for path in input_files(spec):
        relative = _relative(path, root)
        try:
            parquet = pq.ParquetFile(path)
        except Exception as error:  # pyarrow raises several types for a corrupt file
            raise DataError(f"{path} is not a readable parquet file ({error})") from None
        yield from _iter_arrow_batches(
            parquet.iter_batches(batch_size=1024, columns=_columns(parquet.schema_arrow.names, text_field, path)),
            spec, policy, relative, text_field,
        )
        policy.stats["files"] += 1
        policy.stats["input_bytes_read"] += path.stat().st_size


def _iter_hf_disk(spec: SourceSpec, policy: _Utf8Policy) -> Iterator[Document]:
    import pyarrow as pa

    text_field = spec.option("text", "text")
    row_counter = {}
    for split, path in _hf_disk_files(spec):
        # save_to_disk writes Arrow IPC streams; reading them with pyarrow avoids importing datasets.
        with pa.memory_map(str(path)) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid as error:
                raise DataError(f"{path} is not an Arrow stream written by save_to_disk ({error})") from None
            columns = _columns(reader.schema.names, text_field, path)
            batches = (batch.select(columns) for batch in reader)
            # Rows are numbered per split, continuing over its files.
            yield from _iter_arrow_batches(batches, spec, policy, split or "data", text_field, row_counter)
        policy.stats["files"] += 1
        policy.stats["input_bytes_read"] += path.stat().st_size


def _iter_arrow_batches(batches, spec, policy, relative: str, text_field: str, row_counter: dict | None = None):
    row_counter = {} if row_counter is None else row_counter
    for batch in batches:
        texts = batch.column(text_field).to_pylist()
        metas = batch.column("meta").to_pylist() if "meta" in batch.schema.names else [None] * len(texts)
        for text, meta in zip(texts, metas):
            row = row_counter.get(relative, 0)
            row_counter[relative] = row + 1
            where = f"{relative}:{row}"
            if text is None:
                continue
            if isinstance(text, bytes):
                text = policy.decode(text, where)
            elif isinstance(text, str):
                text = policy.check(text, where)
            else:
                raise DataError(f"{where}: field {text_field!r} is {type(text).__name__}, expected a string")
            if text is None:
                continue
            yield Document(text, spec.name, where, _meta_dict(meta))


def _iter_files(spec: SourceSpec, policy: _Utf8Policy) -> Iterator[Document]:
    root = source_root(spec)
    for path in input_files(spec):
        relative = _relative(path, root)
        with open(path, "rb") as raw, _open_decompressed(path, raw) as stream:
            data = stream.read()
        policy.stats["files"] += 1
        policy.stats["input_bytes_read"] += path.stat().st_size
        text = policy.decode(data, str(path))
        if text is None:
            continue
        if _strip_compression(path.name).lower().endswith(HTML_SUFFIXES):
            text = html_to_text(text)
        yield Document(text, spec.name, relative, {"path": relative})


def _iter_deepmind(spec: SourceSpec, policy: _Utf8Policy) -> Iterator[Document]:
    for split, module, path in _released_files(spec):
        # read_pairs is strict about UTF-8 and layout; its DataError names the file.
        for index, (question, answer) in enumerate(read_pairs(path)):
            yield Document(f"{question}\n{answer}", spec.name, f"{split}/{path.name}:{index}",
                           {"split": split, "module": module})
        policy.stats["files"] += 1
        policy.stats["input_bytes_read"] += path.stat().st_size


def html_to_text(markup: str) -> str:
    """Returns the text of an HTML document: tags dropped, script/style removed, entities decoded.

    Block-level tags become line breaks so paragraphs and table rows do not run together. Regular
    expressions rather than `html.parser`: the parser ran at ~2 MB/s, slower than tokenizing.
    """
    text = _HTML_DROPPED.sub("", markup)
    # re.IGNORECASE scans ~3x slower. Where no tag name holds an upper-case letter (or one of the
    # non-ASCII letters that fold to i, k, s), the lower-case pattern matches exactly the same tags.
    text = (_HTML_BLOCK_TAG if _HTML_CASED_TAG.search(text) else _HTML_BLOCK_TAG_LOWER).sub("\n", text)
    text = html.unescape(_HTML_TAG.sub("", text))
    if " \n" in text or "\t\n" in text:
        # = re.sub(r"[ \t]+\n", "\n", text) up to the last line, whose trailing blanks strip() drops
        # below; per line, since that regex tries a match at every blank (~10 MB/s).
        text = "\n".join([line.rstrip(" \t") for line in text.split("\n")])
    return _HTML_BLANK_LINES.sub("\n\n", text).strip() + "\n"


_HTML_DROPPED = re.compile(r"<!--.*?-->|<(script|style)\b[^>]*>.*?</\1\s*>", re.DOTALL | re.IGNORECASE)
_HTML_BLOCK_TAG_NAMES = "p|div|br|li|tr|h[1-6]|pre|table|ul|ol|dl|dt|dd|blockquote|hr|title|section|article"
_HTML_BLOCK_TAG = re.compile(rf"</?(?:{_HTML_BLOCK_TAG_NAMES})\b[^>]*>", re.IGNORECASE)
_HTML_BLOCK_TAG_LOWER = re.compile(rf"</?(?:{_HTML_BLOCK_TAG_NAMES})\b[^>]*>")
_HTML_CASED_TAG = re.compile("</?[a-z]*[A-Z\u0130\u0131\u017f\u212a]")
_HTML_TAG = re.compile(r"<[!/?]?[A-Za-z][^>]*>")
_HTML_BLANK_LINES = re.compile(r"\n{3,}")


def _parse_options(text: str, option_text: str) -> tuple[tuple[str, str], ...]:
    options = {}
    for item in filter(None, option_text.split("&")):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise DataError(f"--source {text!r}: option {item!r} must be KEY=VALUE")
        options[key] = value
    return tuple(sorted(options.items()))


def _infer_kind(text: str, path_text: str) -> str:
    path = Path(path_text)
    if not _is_glob(path_text) and path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "hf_disk"
        if any((path / split).is_dir() for split in _RELEASED_SPLITS):
            return "deepmind"
        names = [file.name for file in path.rglob("*") if file.is_file()]
        if any(name.endswith(JSONL_SUFFIXES) for name in names):
            return "jsonl"
        if any(name.endswith(".parquet") for name in names):
            return "parquet"
        raise DataError(
            f"--source {text!r}: cannot tell the kind of folder {path}; give a glob such as '{path}/**/*.tex' "
            f"or a kind prefix ({', '.join(KINDS)})"
        )
    if _is_glob(path_text):
        names = [match for match in glob.glob(path_text, recursive=True) if Path(match).is_file()]
    elif path.is_file():
        names = [path_text]
    else:
        raise DataError(f"--source {text!r}: {path} does not exist; check the path")
    if not names:
        raise DataError(f"--source {text!r}: glob {path_text!r} matches no file; check the pattern")
    kinds = {_kind_of_file(name) for name in names}
    if len(kinds) > 1:
        raise DataError(
            f"--source {text!r} mixes {' and '.join(sorted(kinds))} files; narrow the glob or give one source per kind"
        )
    return kinds.pop()


def _kind_of_file(name: str) -> str:
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "files"


def _default_name(path_text: str) -> str:
    if _is_glob(path_text):
        root = source_root(SourceSpec("x", path_text, "files"))
        name = root.resolve().name
    else:
        name = Path(path_text).resolve().name
        for suffix in (*JSONL_SUFFIXES, ".parquet", ".gz", ".zst"):
            name = name.removesuffix(suffix)
    return name or "source"


def _hf_disk_files(spec: SourceSpec) -> list[tuple[str, Path]]:
    """(split, arrow file) pairs of a save_to_disk folder, in the order `datasets` reads them."""
    path = Path(spec.path)
    if not path.is_dir():
        raise DataError(f"source {spec.name}: {path} is not a save_to_disk folder (it does not exist)")
    split = spec.option("split")
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        if split is None:
            if "train" not in splits:
                raise DataError(
                    f"source {spec.name}: {path} is a DatasetDict with splits {', '.join(splits)}; choose one with "
                    f"#split=NAME"
                )
            split = "train"
        if split not in splits:
            raise DataError(f"source {spec.name}: {path} has no split {split!r}; it has {', '.join(splits)}")
        path = path / split
    elif split is not None:
        raise DataError(f"source {spec.name}: {path} is a single Dataset; drop #split={split}")
    state_path = path / "state.json"
    if not state_path.is_file():
        raise DataError(f"source {spec.name}: {path} has no state.json; is it a `save_to_disk` folder?")
    state = json.loads(state_path.read_text(encoding="utf-8"))
    files = [path / entry["filename"] for entry in state.get("_data_files", [])]
    for file in files:
        if not file.is_file():
            raise DataError(f"source {spec.name}: {file} listed in {state_path} is missing")
    if not files:
        raise DataError(f"source {spec.name}: {state_path} lists no data file; the dataset is empty")
    return [(split or "", file) for file in files]


def _released_files(spec: SourceSpec) -> list[tuple[str, str, Path]]:
    """(split, module, file) of a DeepMind released folder: splits in the given order, modules sorted."""
    root = Path(spec.path)
    if not root.is_dir():
        raise DataError(f"source {spec.name}: released DeepMind folder {root} does not exist")
    splits_option = spec.option("splits")
    splits = splits_option.split(",") if splits_option else [s for s in TRAIN_SPLITS if (root / s).is_dir()]
    module = spec.option("module")
    files = []
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"source {spec.name}: split folder {split_dir} does not exist")
        paths = [split_dir / f"{module}.txt"] if module else sorted(split_dir.glob("*.txt"))
        for path in paths:
            if not path.is_file():
                raise DataError(f"source {spec.name}: module file {path} does not exist")
            files.append((split, path.stem, path))
    if not files:
        raise DataError(f"source {spec.name}: {root} holds no module file in {', '.join(splits) or 'any train split'}")
    return files


def _open_decompressed(path: Path, raw):
    """A binary stream of the file's content, unpacking .gz and .zst by their suffix."""
    if path.name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if path.name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
    return io.BufferedReader(_NoClose(raw))


class _NoClose(io.RawIOBase):
    """Lets a BufferedReader wrap a file that its own `with` closes."""

    def __init__(self, raw):
        self._raw = raw

    def readable(self):
        return True

    def readinto(self, buffer):
        return self._raw.readinto(buffer)


def _strip_compression(name: str) -> str:
    return name.removesuffix(".gz").removesuffix(".zst")


def _columns(names: list[str], text_field: str, path: Path) -> list[str]:
    if text_field not in names:
        raise DataError(f"{path} has no column {text_field!r} (it has {', '.join(names)}); choose one with #text=NAME")
    return [text_field, "meta"] if "meta" in names else [text_field]


def _meta_dict(meta) -> dict:
    """Normalizes a record's meta to a dict (Proof-Pile-2 stores a dict; some dumps a JSON string)."""
    if isinstance(meta, dict):
        return meta
    if isinstance(meta, str):
        try:
            parsed = json.loads(meta)
        except json.JSONDecodeError:
            return {"meta": meta}
        return parsed if isinstance(parsed, dict) else {"meta": parsed}
    return {} if meta is None else {"meta": meta}


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _is_glob(text: str) -> bool:
    return glob.has_magic(text)


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))
