"""Tests of `megatrain-data inspect`, `decontaminate` and `dedup` on real files (no mocks)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_tools import cli
from data_tools.build import build_dataset
from data_tools.decontaminate import EvalNgramIndex, filter_contaminated
from data_tools.dedup import Deduplicator, filter_duplicates
from data_tools.inspect_dataset import SAMPLE_CHARS, inspect_dataset, length_summary
from data_tools.sources import Document, iter_documents, parse_source
from data_tools.textnorm import normalized_words
from data_tools.tokenizer import train_tokenizer
from megatrain.data.tokenizer import load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
_VOCABULARY = [f"word{i}" for i in range(3000)]


def _random_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_VOCABULARY) for _ in range(words))


def _doc(text: str, id_: str, source: str = "train") -> Document:
    return Document(text=text, source=source, id=id_, meta={})


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text, "meta": {"line": i}}) + "\n" for i, text in enumerate(texts)))
    return path


def _read_out(path: Path) -> list[Document]:
    return list(iter_documents(parse_source(f"out={path}")))


def _run_cli(capsys, *argv) -> tuple[int, str, str]:
    status = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# --- normalization ------------------------------------------------------------------------------


def test_normalized_words_ignore_case_punctuation_and_width():
    assert normalized_words("Solve 24 = 1601*c - 1605*c for c.") == ["solve", "24", "1601", "c", "1605", "c", "for", "c"]
    # NFKC folds fullwidth digits/letters; casefold handles non-ASCII (ß -> ss).
    assert normalized_words("ＳＴRASSE Straße") == ["strasse", "strasse"]
    assert normalized_words(" -- ") == []


# --- dedup --------------------------------------------------------------------------------------


def test_exact_dedup_keeps_first_occurrence_and_ignores_whitespace():
    rng = random.Random(0)
    text = _random_text(rng, 50)
    documents = [_doc(text, "a"), _doc(_random_text(rng, 50), "b"), _doc("  " + text.replace(" ", "\n  ", 5) + "\n", "c"),
                 _doc(text.upper(), "d"), _doc(text, "e", source="other")]
    report: dict = {}
    kept = [document.id for document in filter_duplicates(documents, Deduplicator(), report)]
    # Case is kept by exact dedup (only whitespace is normalized), so "d" survives.
    assert kept == ["a", "b", "d"]
    assert [(r["id"], r["duplicate_of"], r["kind"]) for r in report["removed"]] == [
        ("c", "train/a", "exact"), ("e", "train/a", "exact")]
    assert report["sources"] == {"train": {"documents": 4, "exact_duplicates": 1, "near_duplicates": 0, "kept": 3},
                                 "other": {"documents": 1, "exact_duplicates": 1, "near_duplicates": 0, "kept": 0}}


def test_near_dedup_removes_small_edit_and_keeps_different_document():
    rng = random.Random(1)
    words = _random_text(rng, 200).split()
    edited = list(words)
    edited[60], edited[140] = "changed", "edited"  # true 5-shingle Jaccard 186/206 = 0.90
    heavily_edited = list(words)
    for position in range(0, 200, 20):  # ten edits: Jaccard ~0.6, below the threshold
        heavily_edited[position] = "different"
    documents = [_doc(" ".join(words), "original"), _doc(" ".join(edited).upper(), "edited"),
                 _doc(_random_text(rng, 200), "unrelated"), _doc(" ".join(heavily_edited), "heavy")]
    report: dict = {}
    kept = [d.id for d in filter_duplicates(documents, Deduplicator(near=True, threshold=0.8), report)]
    assert kept == ["original", "unrelated", "heavy"]
    (removed,) = report["removed"]
    assert removed["id"] == "edited" and removed["kind"] == "near" and removed["duplicate_of"] == "train/original"
    assert 0.8 <= removed["jaccard"] <= 1.0
    # Exact-only dedup keeps the edited copy.
    assert len(list(filter_duplicates(documents, Deduplicator(near=False), {}))) == 4


def test_near_dedup_is_deterministic_across_processes(tmp_path):
    rng = random.Random(2)
    base = _random_text(rng, 120).split()
    texts = []
    for i in range(40):
        words = list(base) if i % 4 == 0 else _random_text(rng, 120).split()
        words[i % 120] = f"edit{i}"
        texts.append(" ".join(words))
    source = _write_jsonl(tmp_path / "docs.jsonl", texts)
    reports = []
    for run in range(2):
        # A fresh interpreter each time: nothing may depend on Python's per-process hash seed.
        argv = ["dedup", f"d={source}", "--near", "--out", str(tmp_path / f"out{run}.jsonl.zst"),
                "--report", str(tmp_path / f"report{run}.json")]
        completed = subprocess.run([sys.executable, "-m", "data_tools.cli", *argv], cwd=REPO_ROOT,
                                   capture_output=True, text=True)
        assert completed.returncode == 0, completed.stderr
        reports.append(json.loads((tmp_path / f"report{run}.json").read_text()))
    # 9 of the 10 copies are near the first; estimates near 0.8 may keep a few, but identically in both runs.
    assert reports[0]["removed"] == reports[1]["removed"] and reports[0]["near_duplicates"] >= 5
    assert (tmp_path / "out0.jsonl.zst").read_bytes() == (tmp_path / "out1.jsonl.zst").read_bytes()


# --- decontamination ----------------------------------------------------------------------------


def test_decontaminate_finds_planted_13gram_but_not_12_words():
    rng = random.Random(3)
    eval_words = [f"evalword{i}" for i in range(40)]
    index = EvalNgramIndex([_doc(" ".join(eval_words), "q0", source="test")], ngram=13)
    planted_13 = f"{_random_text(rng, 30)} {' '.join(eval_words[10:23])}, {_random_text(rng, 30)}"
    planted_12 = f"{_random_text(rng, 30)} {' '.join(eval_words[10:22])} {_random_text(rng, 30)}"
    # The same 13 words with different case and punctuation still match.
    planted_13_noisy = "Intro: " + " ".join(w.upper() + ("," if i % 3 else "") for i, w in enumerate(eval_words[20:33]))
    documents = [_doc(planted_13, "p13"), _doc(planted_12, "p12"), _doc(planted_13_noisy, "noisy"),
                 _doc(_random_text(rng, 100), "clean")]
    report: dict = {}
    kept = [d.id for d in filter_contaminated(documents, index, report)]
    assert kept == ["p12", "clean"]
    found = {entry["id"]: entry for entry in report["contaminated_documents"]}
    assert found["p13"]["eval_ids"] == ["test/q0"] and found["p13"]["matched_ngrams"] == 1
    assert found["p13"]["example"] == " ".join(eval_words[10:23])
    assert report["sources"]["train"] == {"documents": 4, "contaminated": 2, "kept": 2}


def test_short_eval_text_is_one_whole_gram():
    index = EvalNgramIndex([_doc("Solve 24 = 1601*c - 1605*c for c.", "q", "test"),
                            _doc("What is 2 + 3?", "q2", "test")], ngram=13)
    assert index.stats["test"]["short_documents"] == 2
    assert index.find("A worked example. solve 24 = 1601 * C - 1605*c FOR c. Then we ...").eval_refs == [("test", "q")]
    assert index.find("Solve 24 = 1601*c - 1605*c for x.") is None  # one word differs
    assert index.find("what is 2 3") is not None


# --- command line: decontaminate / dedup --------------------------------------------------------


@pytest.fixture
def corpus(tmp_path) -> dict:
    """A jsonl training source with one leaked DeepMind test question, and the released test split."""
    rng = random.Random(4)
    texts = [_random_text(rng, 80) for _ in range(30)]
    texts[7] = f"Exercise. Solve 24 = 1601*c - 1605*c for c. Answer: -6. {_random_text(rng, 20)}"
    texts[12] = texts[3]  # an exact duplicate
    train = _write_jsonl(tmp_path / "train.jsonl", texts)
    released = tmp_path / "released" / "interpolate"
    released.mkdir(parents=True)
    (released / "algebra__linear_1d.txt").write_text("Solve 24 = 1601*c - 1605*c for c.\n-6\nSolve 3*x = 9 for x.\n3\n")
    eval_spec = f"test=deepmind:{tmp_path / 'released'}#module=algebra__linear_1d&splits=interpolate"
    return {"train": train, "texts": texts, "eval": eval_spec, "dir": tmp_path}


def test_cli_decontaminate_report_and_out_round_trip(corpus, capsys):
    tmp = corpus["dir"]
    status, out, err = _run_cli(capsys, "decontaminate", f"web={corpus['train']}", "--against", corpus["eval"],
                                "--report", tmp / "report.json", "--out", tmp / "clean.jsonl.zst")
    assert status == 0, err
    assert "web: 1 of 30 contaminated" in out
    report = json.loads((tmp / "report.json").read_text())
    assert report["ngram"] == 13 and report["sources"]["web"] == {"documents": 30, "contaminated": 1, "kept": 29}
    (entry,) = report["contaminated_documents"]
    assert entry["id"] == "train.jsonl:7"
    assert entry["eval_ids"] == ["test/interpolate/algebra__linear_1d.txt:0"]
    assert entry["example"] == "solve 24 1601 c 1605 c for c"
    assert report["eval"]["documents"]["test"]["documents"] == 2
    # The cleaned corpus reads back through the build's own source reader, with source/id in meta.
    cleaned = _read_out(tmp / "clean.jsonl.zst")
    assert [d.text for d in cleaned] == [t for i, t in enumerate(corpus["texts"]) if i != 7]
    assert cleaned[0].meta == {"line": 0, "source": "web", "id": "train.jsonl:0"}
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_cli_dedup_writes_kept_documents_and_report(corpus, capsys):
    tmp = corpus["dir"]
    status, out, err = _run_cli(capsys, "dedup", f"web={corpus['train']}", "--near", "--out", tmp / "d.jsonl.zst",
                                "--report", tmp / "d.json")
    assert status == 0, err
    report = json.loads((tmp / "d.json").read_text())
    assert report["removed"] == [{"source": "web", "id": "train.jsonl:12", "kind": "exact",
                                  "duplicate_of": "web/train.jsonl:3", "jaccard": 1.0}]
    assert report["settings"] == {"threshold": 0.8, "num_perm": 128, "shingle": 5}
    assert len(_read_out(tmp / "d.jsonl.zst")) == 29


def test_cli_refuses_existing_outputs_without_overwrite(corpus, capsys):
    tmp = corpus["dir"]
    argv = ["dedup", f"web={corpus['train']}", "--out", tmp / "d.jsonl.zst", "--report", tmp / "d.json"]
    assert _run_cli(capsys, *argv)[0] == 0
    (tmp / "d.jsonl.zst").write_bytes(b"keep me")
    status, _, err = _run_cli(capsys, *argv)
    assert status == 2 and "already exists; pass --overwrite" in err
    assert (tmp / "d.jsonl.zst").read_bytes() == b"keep me"
    assert _run_cli(capsys, *argv, "--overwrite")[0] == 0
    assert len(_read_out(tmp / "d.jsonl.zst")) == 29


@pytest.mark.parametrize("command", ["dedup", "decontaminate"])
def test_cli_bad_sources_print_one_error_line(corpus, capsys, command):
    tmp = corpus["dir"]
    empty = tmp / "empty.jsonl"
    empty.write_text("\n")
    extra = ["--against", corpus["eval"]] if command == "decontaminate" else []
    outputs = ["--report", tmp / "r.json", "--out", tmp / "o.jsonl.zst"]
    for source, message in ((f"gone={tmp / 'missing.jsonl'}", "missing.jsonl does not exist"),
                            (f"empty={empty}", "yielded no document")):
        status, _, err = _run_cli(capsys, command, source, *extra, *outputs)
        assert status == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
        assert not (tmp / "r.json").exists() and not (tmp / "o.jsonl.zst").exists()
        assert not [p for p in tmp.iterdir() if p.name.startswith(".")]  # temp file removed
    status, _, err = _run_cli(capsys, command, f"web={corpus['train']}", *extra, "--report", tmp / "r.json",
                              "--out", tmp / "o.jsonl")
    assert status == 2 and "must end in .jsonl.zst" in err


def test_decontaminate_missing_eval_source(corpus, capsys):
    tmp = corpus["dir"]
    status, _, err = _run_cli(capsys, "decontaminate", f"web={corpus['train']}", "--against",
                              f"test=deepmind:{tmp / 'nope'}#module=algebra__linear_1d", "--report", tmp / "r.json")
    assert status == 2 and err.startswith("error: ") and "nope" in err and not (tmp / "r.json").exists()


# --- inspect ------------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """A dataset built by the real builder from two jsonl sources of very different lengths."""
    root = tmp_path_factory.mktemp("built")
    rng = random.Random(5)
    words = "the proof of lemma theorem x y equals sum integral prime group ring field".split()
    texts = {"short": [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(60)],
             "long": [" ".join(rng.choice(words) for _ in range(rng.choice([40, 300, 900]))) for _ in range(20)]}
    for name, source_texts in texts.items():
        _write_jsonl(root / f"{name}.jsonl", source_texts)
    tokenizer_path = train_tokenizer([t for ts in texts.values() for t in ts], root / "tok" / "tokenizer", vocab_size=300)
    build_dataset([f"{name}={root / name}.jsonl" for name in texts], tokenizer_path, root / "ds", seq_len=32,
                  rows_per_block=4, workers=1, shard_mb=0.01, progress=False)
    tokenizer = load_tokenizer(tokenizer_path)
    # Stored length: the document's ids plus its eos.
    lengths = {name: [len(ids) + 1 for ids in tokenizer.encode_batch(ts)] for name, ts in texts.items()}
    return {"dir": root / "ds", "texts": texts, "lengths": lengths, "root": root}


def test_inspect_statistics_samples_and_histogram(built, tmp_path):
    info = inspect_dataset(built["dir"], samples=4, histogram=tmp_path / "plots" / "lengths.png")
    all_lengths = np.array(built["lengths"]["short"] + built["lengths"]["long"])
    assert info["documents"] == 80 and info["tokens"] == int(all_lengths.sum())
    assert info["shards"] > 2 and info["dtype"] == "uint16" and info["seq_len"] == 32
    assert info["document_tokens"] == length_summary(all_lengths)
    assert info["document_tokens"]["min"] == all_lengths.min() and info["document_tokens"]["max"] == all_lengths.max()
    for name in ("short", "long"):
        assert info["sources"][name]["documents"] == len(built["texts"][name])
        assert info["sources"][name]["document_tokens"] == length_summary(np.array(built["lengths"][name]))
    assert info["sources"]["short"]["token_share"] + info["sources"]["long"]["token_share"] == pytest.approx(1, abs=1e-3)
    # Samples spread from the first to the last document, decoded back to their text.
    all_texts = built["texts"]["short"] + built["texts"]["long"]
    assert [sample["index"] for sample in info["samples"]] == [0, 26, 53, 79]
    for sample in info["samples"]:
        assert sample["text"] == all_texts[sample["index"]][:SAMPLE_CHARS]
        assert sample["tokens"] == all_lengths[sample["index"]]
        assert sample["source"] == ("short" if sample["index"] < 60 else "long")
    png = (tmp_path / "plots" / "lengths.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 5000


def test_cli_inspect_prints_json_and_refuses_existing_histogram(built, tmp_path, capsys):
    histogram = tmp_path / "h.png"
    status, out, err = _run_cli(capsys, "inspect", built["dir"], "--json", "--samples", "0", "--histogram", histogram)
    assert status == 0, err
    info = json.loads(out)
    assert info["documents"] == 80 and info["samples"] == [] and info["histogram"] == str(histogram)
    status, out, err = _run_cli(capsys, "inspect", built["dir"], "--histogram", histogram)
    assert status == 2 and "already exists; pass --overwrite" in err
    status, out, err = _run_cli(capsys, "inspect", built["dir"], "--histogram", histogram, "--overwrite")
    assert status == 0 and "tokens per document" in out and "document 79 (long" in out
    status, _, err = _run_cli(capsys, "inspect", built["dir"], "--histogram", tmp_path / "h.jpg")
    assert status == 2 and "must end in .png" in err


def test_inspect_bad_datasets(built, tmp_path, capsys):
    status, _, err = _run_cli(capsys, "inspect", tmp_path / "nope")
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1 and "does not exist" in err
    # A docs member that disagrees with the manifest is named, not silently miscounted.
    copy = shutil.copytree(built["dir"], tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][0]["documents"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    status, _, err = _run_cli(capsys, "inspect", copy, "--samples", "0")
    assert status == 2 and "shard-00000.tar has" in err and "document starts" in err


def test_data_quality_modules_do_not_import_torch():
    code = ("import sys, data_tools.quality_cli, data_tools.inspect_dataset, data_tools.dedup, data_tools.decontaminate, "
            "data_tools.outputs; assert 'torch' not in sys.modules, 'torch imported'")
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
