"""`megatrain-data build`: sources, tokenizers, shard layout, determinism, resume, verify, bad input."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from data_tools import cli
from data_tools.build import build_dataset
from data_tools.packing import write_token_shard
from data_tools.sources import iter_documents, parse_source
from data_tools.tokenizer import train_tokenizer
from data_tools.verify import verify_token_dataset
from megatrain.data.packed import PackedDataset
from megatrain.data.tokenizer import load_tokenizer
from megatrain.errors import DataError

REPO = Path(__file__).resolve().parents[1]
CODE = "def add(x, y):\n    # keep    the spaces\n\treturn x + y\n\n\n"
WORDS = "lemma proof integral ring module prime field group theorem sum".split()


def make_texts(count: int, seed: int = 0) -> list[str]:
    """Deterministic documents mixing prose, LaTeX and indented code, of varied lengths."""
    rng = np.random.default_rng(seed)
    texts = []
    for index in range(count):
        words = " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), int(rng.integers(5, 120))))
        texts.append(f"Doc {index}: $\\int_0^{index} x^2 dx$ {words}\n{CODE if index % 3 == 0 else ''}")
    return texts


def write_jsonl(path: Path, texts: list[str]) -> bytes:
    data = "".join(json.dumps({"text": text, "meta": {"n": i}}) + "\n" for i, text in enumerate(texts)).encode()
    path.write_bytes(data)
    return data


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    """A whitespace-keeping sentencepiece BPE trained on the test documents."""
    folder = tmp_path_factory.mktemp("sp")
    return train_tokenizer(make_texts(300, seed=9), folder / "tokenizer", vocab_size=400)


@pytest.fixture(scope="module")
def jsonl_source(tmp_path_factory) -> tuple[str, list[str]]:
    folder = tmp_path_factory.mktemp("jsonl")
    texts = make_texts(120)
    write_jsonl(folder / "part.jsonl", texts)
    return f"docs={folder}/part.jsonl", texts


def hf_tokenizer_folder(folder: Path, vocab_size: int = 300) -> Path:
    """A real Hugging Face fast tokenizer (byte-level BPE) trained and saved like save_pretrained does."""
    import tokenizers

    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(make_texts(200, seed=5), trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def read_all(dataset: Path) -> tuple[np.ndarray, list[int], dict]:
    """The real token stream of a dataset (padding dropped) and its global document starts."""
    data = PackedDataset(dataset)
    stream, starts, offset = [], [], 0
    for block in range(data.num_blocks):
        tokens, docs = data.read_block(block)
        flat = tokens.reshape(-1).astype(np.int64)
        is_last_of_shard = block == data.num_blocks - 1 or data.block_local[block + 1] == 0
        if is_last_of_shard:
            shard = data.shards[int(data.block_shard[block])]
            real = shard["tokens"] - (shard["rows"] - tokens.shape[0]) * data.seq_len
            flat = flat[:real]
        starts += (docs + offset).tolist()
        stream.append(flat)
        offset += flat.size
    return np.concatenate(stream), starts, data.manifest


# ----------------------------------------------------------------------------------------- sources

def test_jsonl_gz_zst_give_the_same_documents(tmp_path):
    import zstandard

    texts = make_texts(5)
    data = write_jsonl(tmp_path / "a.jsonl", texts)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    by_kind = {}
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst"):
        spec = parse_source(f"x={tmp_path}/{name}")
        assert spec.kind == "jsonl"
        documents = list(iter_documents(spec))
        by_kind[name] = [d.text for d in documents]
        assert documents[2].id == f"{name}:2" and documents[2].meta == {"n": 2} and documents[2].source == "x"
    assert by_kind["a.jsonl"] == by_kind["b.jsonl.gz"] == by_kind["c.jsonl.zst"] == texts
    # A glob over the folder reads the files sorted.
    spec = parse_source(f"pp={tmp_path}/*.jsonl*")
    assert [d.id.split(":")[0] for d in iter_documents(spec)][::5] == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst"]


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", "", "three"], "meta": [{"k": 1}, {"k": 2}, {"k": 3}]}), tmp_path / "p.parquet")
    stats = {}
    documents = list(iter_documents(parse_source(str(tmp_path / "p.parquet")), stats=stats))
    assert [(d.text, d.id, d.meta) for d in documents] == [("one", "p.parquet:0", {"k": 1}), ("three", "p.parquet:2", {"k": 3})]
    assert stats["empty"] == 1 and stats["documents"] == 2


def test_files_glob_strips_html_and_unpacks_gz(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.html").write_text(
        "<html><head><style>p {color: red}</style><script>var x = 1;</script><title>T</title></head>"
        "<body><p>Group &amp; ring</p><p>x &lt; y</p></body></html>")
    (tmp_path / "a.tex").write_text("\\section{A}  keep  spaces\n")
    (tmp_path / "c.tex.gz").write_bytes(gzip.compress(b"zipped $x$\n"))
    documents = list(iter_documents(parse_source(f"t={tmp_path}/**/*")))
    texts = {d.id: d.text for d in documents}
    assert list(texts) == ["a.tex", "c.tex.gz", "sub/b.html"]
    assert texts["a.tex"] == "\\section{A}  keep  spaces\n" and texts["c.tex.gz"] == "zipped $x$\n"
    assert "Group & ring" in texts["sub/b.html"] and "x < y" in texts["sub/b.html"]
    assert "<" not in texts["sub/b.html"].replace("x < y", "") and "color" not in texts["sub/b.html"]
    assert "var x" not in texts["sub/b.html"]


@pytest.mark.parametrize("markup", ["<p>a \t</p>b  \n\n\n\n\nc \t", "x\t\n \ny  ", " \n\t\n", "<br>  <br>\t<li> z", "q",
                                    "<P>a</Div>b<bR>c<pRe>d<h2>e", "<d\u0130v>x<d\u0131v>y<blocKquote>z<p>w",
                                    "<paragraph>a<table x=1>b<br/>c"])
def test_html_to_text_matches_its_reference_definition(markup):
    """The fast paths (lower-case block tags, per-line blank trimming) match the plain regexes."""
    import html
    import re

    from data_tools import sources

    text = sources._HTML_BLOCK_TAG.sub("\n", sources._HTML_DROPPED.sub("", markup))
    text = re.sub(r"[ \t]+\n", "\n", html.unescape(sources._HTML_TAG.sub("", text)))
    assert sources.html_to_text(markup) == re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def test_save_to_disk_folders(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["a", "b"], "meta": [{"i": 0}, {"i": 1}]}).save_to_disk(str(tmp_path / "ds"))
    documents = list(iter_documents(parse_source(str(tmp_path / "ds"))))
    assert [(d.text, d.meta, d.source) for d in documents] == [("a", {"i": 0}, "ds"), ("b", {"i": 1}, "ds")]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t"]}),
                          "test": datasets.Dataset.from_dict({"text": ["e"]})}).save_to_disk(str(tmp_path / "dd"))
    assert parse_source(str(tmp_path / "dd")).kind == "hf_disk"
    assert [d.text for d in iter_documents(parse_source(f"{tmp_path}/dd"))] == ["t"]
    assert [d.text for d in iter_documents(parse_source(f"{tmp_path}/dd#split=test"))] == ["e"]
    with pytest.raises(DataError, match="no split 'dev'"):
        list(iter_documents(parse_source(f"{tmp_path}/dd#split=dev")))


def test_deepmind_released_source(dm_data):
    from megatrain.data.released import TRAIN_SPLITS, read_split

    spec = parse_source(f"math={dm_data['released']}")
    assert spec.kind == "deepmind"
    documents = list(iter_documents(spec))
    pairs = read_split(dm_data["released"], "algebra__linear_1d", TRAIN_SPLITS)
    assert [d.text for d in documents] == [f"{q}\n{a}" for q, a in pairs]
    assert documents[0].id == "train-easy/algebra__linear_1d.txt:0" and documents[0].meta["split"] == "train-easy"
    only_test = parse_source(f"math={dm_data['released']}#splits=interpolate&module=algebra__linear_1d")
    assert len(list(iter_documents(only_test))) == 64


@pytest.mark.parametrize("text, message", [
    ("", "empty --source"),
    ("x=", "no PATH"),
    ("x=nope:/tmp", "unknown kind 'nope'"),
    ("x=/definitely/missing", "does not exist"),
    ("x=/tmp/*.no-such-suffix-anywhere", "matches no file"),
    ("bad name=/tmp", "name 'bad name'"),
])
def test_parse_source_errors(text, message):
    with pytest.raises(DataError, match=message):
        parse_source(text)


def test_empty_source_is_a_clear_error(tmp_path, sp_model, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="source empty .* yielded no document"):
        build_dataset([f"empty={tmp_path}/empty.jsonl"], sp_model, tmp_path / "out", progress=False)
    assert cli.main(["build", "--source", f"{tmp_path}/none-*.jsonl", "--tokenizer", str(sp_model),
                     "--out", str(tmp_path / "out2")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --source '{tmp_path}/none-*.jsonl': glob '{tmp_path}/none-*.jsonl' matches no file; check the pattern"]


# -------------------------------------------------------------------------------------- tokenizers

def test_sentencepiece_keeps_whitespace(sp_model):
    tokenizer = load_tokenizer(sp_model)
    assert tokenizer.kind == "sentencepiece" and tokenizer.files == [sp_model]
    assert tokenizer.decode(tokenizer.encode_batch([CODE])[0]) == CODE
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (2, 3, 0)
    assert load_tokenizer(sp_model.parent).vocab_size == tokenizer.vocab_size  # a folder with tokenizer.model


def test_hf_tokenizer_folder(tmp_path, jsonl_source):
    import tokenizers

    folder = hf_tokenizer_folder(tmp_path / "hf")
    tokenizer = load_tokenizer(folder)
    reference = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    texts = jsonl_source[1][:10]
    assert tokenizer.kind == "hf" and tokenizer.encode_batch(texts) == [reference.encode(t).ids for t in texts]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)
    assert tokenizer.decode(tokenizer.encode_batch([CODE])[0]) == CODE
    manifest = build_dataset([jsonl_source[0]], folder, tmp_path / "out", seq_len=64, shard_mb=0.005, progress=False)
    assert manifest["tokenizer"]["kind"] == "hf"
    assert sorted(manifest["tokenizer"]["files"]) == ["tokenizer.json", "tokenizer_config.json"]
    stream, starts, _ = read_all(tmp_path / "out")
    expected = [token for ids in tokenizer.encode_batch(jsonl_source[1]) for token in (*ids, 1)]
    assert stream.tolist() == expected
    assert verify_token_dataset(tmp_path / "out")["sample"] == jsonl_source[1][0]


def test_tokenizer_train_command(tmp_path, jsonl_source, capsys):
    assert cli.main(["tokenizer", "train", jsonl_source[0], "--vocab-size", "350", "--out", str(tmp_path / "tok")]) == 0
    tokenizer = load_tokenizer(tmp_path / "tok")
    assert tokenizer.decode(tokenizer.encode_batch([CODE])[0]) == CODE


# ---------------------------------------------------------------------------------- layout & build

def test_write_token_shard_layout(tmp_path):
    entry = write_token_shard(tmp_path / "s.tar", [[5, 6, 7], [8] * 10, [9]], seq_len=4, rows_per_block=2,
                              dtype="uint16", pad_id=0, eos_id=3, bos_id=2)
    assert entry == {"path": "s.tar", "sha256": hashlib.sha256((tmp_path / "s.tar").read_bytes()).hexdigest(),
                     "rows": 5, "blocks": 3, "tokens": 20, "documents": 3}
    with tarfile.open(tmp_path / "s.tar") as tar:
        members = tar.getmembers()
        arrays = [np.load(io.BytesIO(tar.extractfile(m).read()), allow_pickle=False) for m in members]
    assert [m.name for m in members] == [f"block-00000{b}.{kind}.npy" for b in range(3) for kind in ("docs", "tokens")]
    assert all(m.mtime == 0 and m.mode == 0o644 and m.uname == "" for m in members)
    assert [a.tolist() for a in arrays] == [[0, 5], [[2, 5, 6, 7], [3, 2, 8, 8]], [], [[8, 8, 8, 8], [8, 8, 8, 8]],
                                            [1], [[3, 2, 9, 3]]]


def test_build_round_trip_and_stats(tmp_path, jsonl_source, sp_model):
    manifest = build_dataset([jsonl_source[0]], sp_model, tmp_path / "out", seq_len=128, rows_per_block=4,
                             shard_mb=0.004, progress=False)
    tokenizer = load_tokenizer(sp_model)
    encoded = tokenizer.encode_batch(jsonl_source[1])
    stream, starts, read_manifest = read_all(tmp_path / "out")
    assert stream.tolist() == [token for ids in encoded for token in (*ids, tokenizer.eos_id)]
    assert starts == np.cumsum([0] + [len(ids) + 1 for ids in encoded[:-1]]).tolist()
    assert len(manifest["shards"]) > 3 and manifest == read_manifest
    assert manifest["dtype"] == "uint16" and manifest["documents"] == 120
    assert manifest["sources"]["docs"]["documents"] == 120 and manifest["sources"]["docs"]["tokens"] == stream.size
    assert manifest["sources"]["docs"]["bytes"] == sum(len(t.encode()) for t in jsonl_source[1])
    assert not (tmp_path / "out" / ".build").exists()
    assert (tmp_path / "out" / "manifest.json").read_text() == json.dumps(manifest, sort_keys=True, indent=2) + "\n"
    # A rerun of a finished build is a no-op that returns the same manifest.
    assert build_dataset([jsonl_source[0]], sp_model, tmp_path / "out", seq_len=128, rows_per_block=4,
                         shard_mb=0.004, progress=False) == manifest


def test_add_bos(tmp_path, jsonl_source, sp_model):
    build_dataset([jsonl_source[0]], sp_model, tmp_path / "out", seq_len=64, shard_mb=0.01, add_bos=True,
                  progress=False)
    stream, starts, manifest = read_all(tmp_path / "out")
    assert manifest["add_bos"] and set(stream[starts].tolist()) == {2}
    verify_token_dataset(tmp_path / "out")


def test_identical_bytes_for_any_worker_count(tmp_path, jsonl_source, sp_model, dm_data):
    sources = [jsonl_source[0], f"math={dm_data['released']}"]
    for workers in (1, 2):
        build_dataset(sources, sp_model, tmp_path / f"w{workers}", seq_len=64, rows_per_block=8, workers=workers,
                      shard_mb=0.01, name="same", progress=False)
    assert folder_bytes(tmp_path / "w1") == folder_bytes(tmp_path / "w2")


def test_uint32_for_vocab_over_65535(tmp_path):
    import tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    folder = tmp_path / "big"
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "w5 w69999 w65535"}) + "\n")
    manifest = build_dataset([f"{tmp_path}/d.jsonl"], folder, tmp_path / "out", seq_len=8, progress=False)
    assert manifest["dtype"] == "uint32" and manifest["vocab_size"] == 70_002 and manifest["pad_id"] == 1
    stream, _, _ = read_all(tmp_path / "out")
    assert stream.tolist() == [7, 70001, 65537, 1]
    verify_token_dataset(tmp_path / "out")


# ------------------------------------------------------------------------------------------ resume

def _build_command(source: str, tokenizer: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "data_tools.cli", "build", "--source", source, "--tokenizer", str(tokenizer),
            "--out", str(out), "--seq-len", "64", "--rows-per-block", "4", "--shard-mb", "0.0005", "--workers", "2",
            "--no-progress"]


def test_resume_after_kill_9_is_byte_identical(tmp_path, sp_model):
    texts = make_texts(1500, seed=1)
    write_jsonl(tmp_path / "big.jsonl", texts)
    source = f"big={tmp_path}/big.jsonl"
    clean = subprocess.run(_build_command(source, sp_model, tmp_path / "clean"), cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr[-2000:]
    total = len(json.loads((tmp_path / "clean" / "manifest.json").read_text())["shards"])

    out = tmp_path / "killed"
    process = subprocess.Popen(_build_command(source, sp_model, out), cwd=REPO, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / ".build").glob("shard-*.json"))) < total // 4:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)  # the main process and its workers, mid-way
    process.wait()
    finished = sorted((out / ".build").glob("shard-*.json"))
    assert not (out / "manifest.json").exists() and 0 < len(finished) < total
    kept = out / json.loads(finished[0].read_text())["entry"]["path"]
    kept_mtime = kept.stat().st_mtime_ns

    resumed = subprocess.run(_build_command(source, sp_model, out), cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert kept.stat().st_mtime_ns == kept_mtime  # finished shards were verified and kept, not rebuilt
    clean_files, resumed_files = folder_bytes(tmp_path / "clean"), folder_bytes(out)
    clean_manifest = json.loads(clean_files.pop("manifest.json"))
    resumed_manifest = json.loads(resumed_files.pop("manifest.json"))
    assert clean_files == resumed_files
    # Only the dataset name (the --out folder's name) differs.
    assert clean_manifest["name"] == "clean" and resumed_manifest.pop("name") == "killed"
    clean_manifest.pop("name")
    assert clean_manifest == resumed_manifest


def test_resume_refuses_other_settings(tmp_path, jsonl_source, sp_model):
    out = tmp_path / "out"
    build_dataset([jsonl_source[0]], sp_model, out, seq_len=64, progress=False)
    with pytest.raises(DataError, match="already holds a finished dataset"):
        build_dataset([jsonl_source[0]], sp_model, out, seq_len=32, progress=False)
    # An unfinished build (state pinned, no manifest) names what differs.
    (out / "manifest.json").unlink()
    (out / ".build").mkdir()
    (out / ".build" / "state.json").write_text(json.dumps({"settings": {"seq_len": 64}, "tokenizer": {}, "inputs": {}}))
    with pytest.raises(DataError, match=r"settings.seq_len \(64 vs 32\)"):
        build_dataset([jsonl_source[0]], sp_model, out, seq_len=32, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    with pytest.raises(DataError, match="not empty and holds no build"):
        build_dataset([jsonl_source[0]], sp_model, tmp_path / "other", progress=False)


# --------------------------------------------------------------------------------------- bad input

def test_bad_utf8_replace_skip_error(tmp_path, sp_model, capsys):
    (tmp_path / "ok.tex").write_bytes(b"good $x$\n")
    (tmp_path / "bad.tex").write_bytes(b"caf\xe9 \xff\n")
    (tmp_path / "j.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "bad \xff"}\n{"text": "lone \\ud800"}\n')
    source = f"t={tmp_path}/*.tex"
    replaced = build_dataset([source, f"j={tmp_path}/j.jsonl"], sp_model, tmp_path / "replace", seq_len=32,
                             progress=False)
    assert replaced["sources"]["t"]["bad_utf8"] == 1 and replaced["sources"]["t"]["documents"] == 2
    assert replaced["sources"]["j"]["bad_utf8"] == 2 and replaced["sources"]["j"]["documents"] == 3
    skipped = build_dataset([source, f"j={tmp_path}/j.jsonl"], sp_model, tmp_path / "skip", seq_len=32,
                            on_bad_utf8="skip", progress=False)
    assert skipped["sources"]["t"]["skipped"] == 1 and skipped["sources"]["t"]["documents"] == 1
    assert skipped["sources"]["j"]["skipped"] == 2 and skipped["documents"] == 2
    tokenizer = load_tokenizer(sp_model)
    stream, _, _ = read_all(tmp_path / "replace")
    assert "caf\ufffd \ufffd" in tokenizer.decode(stream.tolist())
    assert cli.main(["build", "--source", source, "--tokenizer", str(sp_model), "--out", str(tmp_path / "err"),
                     "--on-bad-utf8", "error", "--no-progress"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"{tmp_path}/bad.tex is not valid UTF-8" in error[0]


@pytest.mark.parametrize("bad_name", ["../evil.npy", "/abs/evil.npy"])
def test_verify_refuses_tar_member_with_unsafe_path(tmp_path, jsonl_source, sp_model, bad_name):
    out = tmp_path / "out"
    build_dataset([jsonl_source[0]], sp_model, out, seq_len=64, progress=False)
    shard = out / "shard-00000.tar"
    with tarfile.open(shard, "a", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(bad_name)
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="absolute path or '..'; refusing"):
        verify_token_dataset(out)


def test_verify_detects_flipped_byte(tmp_path, jsonl_source, sp_model, capsys):
    out = tmp_path / "out"
    manifest = build_dataset([jsonl_source[0]], sp_model, out, seq_len=64, shard_mb=0.01, progress=False)
    assert cli.main(["verify", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"OK {out}: {len(manifest['shards'])} shards")
    shard = out / manifest["shards"][1]["path"]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01
    shard.write_bytes(bytes(data))
    assert cli.main(["verify", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    actual = hashlib.sha256(bytes(data)).hexdigest()
    assert error == (f"error: shard shard-00001.tar: sha256 mismatch (expected {manifest['shards'][1]['sha256']}, "
                     f"got {actual}); rebuild it with `megatrain-data build ...`")


def test_no_pickle_in_the_format(tmp_path, jsonl_source, sp_model):
    out = tmp_path / "out"
    build_dataset([jsonl_source[0]], sp_model, out, seq_len=64, progress=False)
    json.loads((out / "manifest.json").read_text())
    with tarfile.open(out / "shard-00000.tar") as tar:
        for member in tar:
            array = np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)
            assert array.dtype != object


# ---------------------------------------------------------------------------------------- real text

def test_debian_corpus_and_deepmind_math_build_and_verify(tmp_path, debian_corpus, dm_data, capsys):
    sources = [debian_corpus[name] for name in ("pari-doc", "pari-changes", "gap-doc", "libcoq-stdlib")]
    sources.append(f"deepmind={dm_data['released']}")
    assert cli.main(["tokenizer", "train", *sources, "--vocab-size", "1200", "--out", str(tmp_path / "tok")]) == 0
    out = tmp_path / "mix"
    assert cli.main(["build", *[arg for s in sources for arg in ("--source", s)], "--tokenizer", str(tmp_path / "tok"),
                     "--out", str(out), "--seq-len", "256", "--shard-mb", "0.5", "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["verify", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"OK {out}")
    manifest = json.loads((out / "manifest.json").read_text())
    stats = manifest["sources"]
    assert set(stats) == {"pari-doc", "pari-changes", "gap-doc", "libcoq-stdlib", "deepmind"}
    assert stats["pari-doc"]["documents"] >= 10 and stats["libcoq-stdlib"]["documents"] >= 10
    assert stats["gap-doc"]["documents"] >= 10 and stats["deepmind"]["documents"] == 1200
    assert all(s["tokens"] > 0 and s["bad_utf8"] == 0 for s in stats.values())
    # Real text round-trips through the shards: the Coq source and the stripped HTML decode back.
    tokenizer = load_tokenizer(out / "tokenizer")
    stream, starts, _ = read_all(out)
    text = tokenizer.decode(stream.tolist())
    assert "Require" in text and "Theorem" in text and "\\section" in text and "<html" not in text
