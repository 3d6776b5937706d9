"""Tests of the data path: DeepMind generation -> released files -> tokenizer -> shards -> reader.

Runs the real `mathematics_dataset` generator on small counts (a few seconds per run).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_tools import cli
from data_tools.deepmind import generate_released, split_train_count
from data_tools.shards import build_qa_shards
from data_tools.tokenizer import train_tokenizer
from megatrain.data.released import TEST_SPLIT, TRAIN_SPLITS, read_pairs, read_split
from megatrain.data.shards import ShardSet
from megatrain.data.tokenizer import Tokenizer
from megatrain.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[1]
MODULE = "algebra__linear_1d"
NUM_TRAIN, NUM_TEST = 300, 60
SEED = 7


def _tree_sha256(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _env_without_hash_seed() -> dict[str, str]:
    """Environment for a child that must take the PYTHONHASHSEED re-exec path."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONHASHSEED"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def _build_pipeline(released: Path, out: Path) -> tuple[Path, dict]:
    """read_split -> train tokenizer -> build shards (3 shards of 128 samples, blocks of 32)."""
    pairs = read_split(released, MODULE, TRAIN_SPLITS)
    model = train_tokenizer([text for pair in pairs for text in pair], out / "tok" / "tokenizer")
    manifest = build_qa_shards(
        pairs, model, out / "shards", samples_per_shard=128, block_size=32, source={"module": MODULE}
    )
    return out / "shards", manifest


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    """Problems generated through the Python API."""
    out = tmp_path_factory.mktemp("gen") / "released"
    generate_released(out, MODULE, NUM_TRAIN, NUM_TEST, SEED, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def released_same_seed_subprocess(tmp_path_factory) -> Path:
    """Same seed, through `python -m data_tools.cli` with PYTHONHASHSEED unset (re-exec path)."""
    out = tmp_path_factory.mktemp("gen_sub") / "released"
    command = [sys.executable, "-m", "data_tools.cli", "deepmind", "generate", "--module", MODULE,
               "--train", str(NUM_TRAIN), "--test", str(NUM_TEST), "--out", str(out), "--seed", str(SEED)]  # fmt: skip
    completed = subprocess.run(command, env=_env_without_hash_seed(), cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    return out


@pytest.fixture(scope="module")
def released_other_seed(tmp_path_factory) -> Path:
    """A different seed, through cli.main in this process."""
    out = tmp_path_factory.mktemp("gen_other") / "released"
    argv = ["deepmind", "generate", "--module", MODULE, "--train", str(NUM_TRAIN), "--test", str(NUM_TEST),
            "--out", str(out), "--seed", str(SEED + 1), "--workers", "1"]  # fmt: skip
    assert cli.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def pipeline(released, tmp_path_factory) -> tuple[Path, dict]:
    return _build_pipeline(released, tmp_path_factory.mktemp("pipe"))


# --- generation ---------------------------------------------------------------------------------


def test_generate_writes_released_layout(released):
    counts = split_train_count(NUM_TRAIN)
    for split in TRAIN_SPLITS:
        assert len(read_pairs(released / split / f"{MODULE}.txt")) == counts[split]
    test_pairs = read_pairs(released / TEST_SPLIT / f"{MODULE}.txt")
    assert len(test_pairs) == NUM_TEST
    question, answer = test_pairs[0]
    assert question.startswith("Solve ") and len(question) <= 160 and 0 < len(answer) <= 30
    # No temp folder is left next to the output.
    assert sorted(p.name for p in released.parent.iterdir()) == ["released"]


def test_split_train_count_gives_remainder_to_first_levels():
    assert list(split_train_count(10).values()) == [4, 3, 3]
    assert list(split_train_count(11).values()) == [4, 4, 3]
    assert sum(split_train_count(NUM_TRAIN).values()) == NUM_TRAIN


def test_same_seed_is_byte_identical_through_subprocess_reexec(released, released_same_seed_subprocess):
    assert _tree_sha256(released) == _tree_sha256(released_same_seed_subprocess)


def test_different_seed_differs(released, released_other_seed):
    reference, other = _tree_sha256(released), _tree_sha256(released_other_seed)
    assert reference.keys() == other.keys()
    assert all(reference[name] != other[name] for name in reference)


def test_output_does_not_depend_on_worker_count(tmp_path):
    # Small chunks so two workers really share the work.
    one = generate_released(tmp_path / "one", MODULE, 150, 30, SEED, workers=1, chunk_size=40, progress=False)
    two = generate_released(tmp_path / "two", MODULE, 150, 30, SEED, workers=2, chunk_size=40, progress=False)
    assert _tree_sha256(one) == _tree_sha256(two)


def test_generate_refuses_existing_dir_and_unknown_module(tmp_path):
    with pytest.raises(DataError, match="already exists"):
        generate_released(tmp_path, MODULE, 3, 3, SEED)
    with pytest.raises(DataError, match="unknown DeepMind module 'algebra__linear_1'; did you mean algebra__linear_1d"):
        generate_released(tmp_path / "new", "algebra__linear_1", 3, 3, SEED)


def test_generator_bridges_numpy2_itemset_for_polynomial_modules():
    # polynomials__* and *_composed modules need the np.object and ndarray.itemset bridges.
    from data_tools.deepmind import _Chunk, _generate_chunk

    lines = _generate_chunk(_Chunk("train-easy", "polynomials__expand", 0, 3, SEED)).splitlines()
    assert len(lines) == 6 and lines[0].startswith("Expand")


# --- released-format reader ---------------------------------------------------------------------


def test_read_pairs_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(DataError, match=str(missing)):
        read_pairs(missing)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match=f"{empty} is empty"):
        read_pairs(empty)
    odd = tmp_path / "odd.txt"
    odd.write_text("What is 1+1?\n2\nWhat is 2+2?\n")
    with pytest.raises(DataError, match=f"{odd} has 3 lines; .* must be even"):
        read_pairs(odd)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n1\n".encode("latin-1"))
    with pytest.raises(DataError, match=f"{latin1} is not UTF-8"):
        read_pairs(latin1)


def test_read_pairs_strips_only_the_newline(tmp_path):
    path = tmp_path / "m.txt"
    path.write_text("  Solve x = 2 for x. \n2\nq2\n 3 \n")
    assert read_pairs(path) == [("  Solve x = 2 for x. ", "2"), ("q2", " 3 ")]


def test_read_split_errors_list_what_is_there(tmp_path, released):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'} does not exist; .*megatrain-data deepmind generate"):
        read_split(tmp_path / "nope", MODULE, TRAIN_SPLITS)
    with pytest.raises(DataError, match="extrapolate does not exist; .* has interpolate, train-easy"):
        read_split(released, MODULE, ["extrapolate"])
    with pytest.raises(DataError, match=f"numbers__gcd.txt does not exist; .* has modules {MODULE}"):
        read_split(released, "numbers__gcd", TRAIN_SPLITS)


def test_read_split_concatenates_in_order(released):
    pairs = read_split(released, MODULE, [TEST_SPLIT, "train-easy"])
    assert pairs[:NUM_TEST] == read_pairs(released / TEST_SPLIT / f"{MODULE}.txt")
    assert len(pairs) == NUM_TEST + split_train_count(NUM_TRAIN)["train-easy"]


# --- tokenizer ----------------------------------------------------------------------------------


def test_tokenizer_training_is_deterministic_and_round_trips(released, tmp_path):
    texts = [text for pair in read_split(released, MODULE, TRAIN_SPLITS) for text in pair]
    first = train_tokenizer(texts, tmp_path / "a" / "tok")
    second = train_tokenizer(texts, tmp_path / "b" / "tok")
    assert first.read_bytes() == second.read_bytes()
    tokenizer = Tokenizer(first)
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.sep_id) == (0, 2, 3, 4)
    assert tokenizer.vocab_size <= 512
    text = "Solve  -12*x + 3 = 0 for x."  # double space must survive
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.sep_id, tokenizer.eos_id, tokenizer.pad_id]) == text
    # split_digits: every digit is its own token.
    assert [tokenizer.decode([i]) for i in tokenizer.encode("1234")] == ["1", "2", "3", "4"]


def test_tokenizer_vocab_too_small_for_corpus(tmp_path):
    with pytest.raises(DataError, match="--vocab-size 262 is too small for this corpus"):
        train_tokenizer(["abcdefghij klmnop"] * 10, tmp_path / "tok", vocab_size=262)


def test_tokenizer_missing_or_invalid_model(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "none.model")):
        Tokenizer(tmp_path / "none.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match=f"{bad} is not a valid sentencepiece model"):
        Tokenizer(bad)


# --- shards -------------------------------------------------------------------------------------


def test_shards_round_trip_equals_encode(released, pipeline):
    shard_dir, manifest = pipeline
    pairs = read_split(released, MODULE, TRAIN_SPLITS)
    shard_set = ShardSet(shard_dir, verify=True)
    tokenizer = Tokenizer(shard_set.tokenizer_path)
    assert shard_set.num_samples == len(pairs) == manifest["samples"]
    assert [shard["samples"] for shard in manifest["shards"]] == [128, 128, 44]
    assert shard_set.block_lengths == [32] * 9 + [12]
    assert manifest["dtype"] == "uint16" and manifest["sep_id"] == tokenizer.sep_id
    samples = [sample for block in range(shard_set.num_blocks) for sample in shard_set.read_block(block)]
    total_tokens = 0
    for (question_tokens, answer_tokens), (question, answer) in zip(samples, pairs, strict=True):
        assert question_tokens.dtype == np.int64
        assert question_tokens.tolist() == tokenizer.encode(question)
        assert answer_tokens.tolist() == tokenizer.encode(answer)
        total_tokens += question_tokens.size + answer_tokens.size
    assert total_tokens == manifest["tokens"]


def test_shards_are_byte_identical_for_same_seed(pipeline, released_same_seed_subprocess, tmp_path):
    shard_dir, manifest = pipeline
    other_dir, other_manifest = _build_pipeline(released_same_seed_subprocess, tmp_path)
    assert _tree_sha256(shard_dir) == _tree_sha256(other_dir)
    assert other_manifest == manifest


def test_shards_differ_for_other_seed(pipeline, released_other_seed, tmp_path):
    _, manifest = pipeline
    _, other_manifest = _build_pipeline(released_other_seed, tmp_path)
    hashes = {shard["sha256"] for shard in manifest["shards"]}
    assert hashes.isdisjoint(shard["sha256"] for shard in other_manifest["shards"])


def test_shards_match_webdataset_tarwriter_bytes(pipeline):
    # The writer uses stdlib tarfile (webdataset imports torch); prove the bytes are TarWriter's.
    import webdataset

    shard_path = pipeline[0] / "shard-00000.tar"
    samples: dict[str, dict] = {}
    with tarfile.open(shard_path) as tar:
        for member in tar:
            key, extension = member.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[extension] = tar.extractfile(member).read()
    buffer = io.BytesIO()
    writer = webdataset.TarWriter(buffer, user="", group="", mode=0o644, encoder=False, mtime=0,
                                  format=tarfile.USTAR_FORMAT)  # fmt: skip
    for sample in samples.values():
        writer.write(sample)
    writer.close()
    assert buffer.getvalue() == shard_path.read_bytes()


def test_verify_detects_flipped_byte(pipeline, tmp_path, capsys):
    shard_dir = shutil.copytree(pipeline[0], tmp_path / "copy")
    shard_path = shard_dir / "shard-00001.tar"
    data = bytearray(shard_path.read_bytes())
    data[1000] ^= 0xFF
    shard_path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="shard shard-00001.tar: sha256 mismatch"):
        ShardSet(shard_dir).verify()
    assert cli.main(["verify", str(shard_dir)]) == 2
    assert capsys.readouterr().err.count("error: shard shard-00001.tar: sha256 mismatch") == 1


def test_shard_set_pickles_after_use(pipeline):
    shard_set = ShardSet(pipeline[0])
    expected = shard_set.read_block(5)
    clone = pickle.loads(pickle.dumps(shard_set))
    assert clone._tars._files == {}  # open files do not travel; the member index does
    assert all(
        np.array_equal(q1, q2) and np.array_equal(a1, a2)
        for (q1, a1), (q2, a2) in zip(clone.read_block(5), expected, strict=True)
    )
    with pytest.raises(IndexError):
        shard_set.read_block(shard_set.num_blocks)
    shard_set.close()


@pytest.mark.parametrize("bad_name", ["../block-000000.tokens.npy", "/tmp/block-000000.tokens.npy"])
def test_shard_with_unsafe_member_path_is_refused(pipeline, tmp_path, bad_name):
    shard_dir = shutil.copytree(pipeline[0], tmp_path / "copy")
    with tarfile.open(shard_dir / "shard-00000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(bad_name)
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(DataError, match="absolute path or '..'; refusing"):
        ShardSet(shard_dir).read_block(0)


def test_shard_set_errors(tmp_path, pipeline):
    with pytest.raises(DataError, match="does not exist; run `megatrain-data deepmind shards"):
        ShardSet(tmp_path / "nope")
    shard_dir = shutil.copytree(pipeline[0], tmp_path / "copy")
    manifest_path = shard_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "version": 2}))
    with pytest.raises(DataError, match="is version 2"):
        ShardSet(shard_dir)
    manifest_path.write_text(json.dumps(manifest))
    (shard_dir / "shard-00002.tar").unlink()
    with pytest.raises(DataError, match="shard-00002.tar listed in .* is missing"):
        ShardSet(shard_dir)


def test_build_qa_shards_rejects_bad_sizes(pipeline, tmp_path):
    with pytest.raises(DataError, match="multiple of --block-size"):
        build_qa_shards([("q", "a")], pipeline[0] / "tokenizer.model", tmp_path / "s", 100, 32)
    with pytest.raises(DataError, match="no samples"):
        build_qa_shards([], pipeline[0] / "tokenizer.model", tmp_path / "s")


# --- command line -------------------------------------------------------------------------------


def test_cli_missing_released_folder_prints_one_error_line(tmp_path, capsys):
    argv = ["deepmind", "shards", "--released", str(tmp_path / "nope"), "--module", MODULE,
            "--out", str(tmp_path / "s")]  # fmt: skip
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert str(tmp_path / "nope") in captured.err and "Traceback" not in captured.err
    assert not (tmp_path / "s").exists()


def test_cli_shards_verify_and_overwrite(released, tmp_path, capsys):
    out = tmp_path / "shards"
    argv = ["deepmind", "shards", "--released", str(released), "--module", MODULE, "--out", str(out),
            "--splits", "interpolate", "--vocab-size", "400",
            "--samples-per-shard", "32", "--block-size", "16"]  # fmt: skip
    assert cli.main(argv) == 0
    assert f"wrote {NUM_TEST} samples" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["splits"] == ["interpolate"] and len(manifest["shards"]) == 2
    assert cli.main(["verify", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"OK {out}: 2 shards, 4 blocks, {NUM_TEST} samples")
    assert cli.main(argv) == 2
    assert "already holds shards; pass --overwrite" in capsys.readouterr().err
    assert cli.main([*argv, "--overwrite"]) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["shards"]  # no temp folder left


def test_data_tools_do_not_import_torch():
    code = (
        "import sys, data_tools.cli, data_tools.deepmind, data_tools.shards, data_tools.tokenizer; "
        "assert 'torch' not in sys.modules and 'webdataset' not in sys.modules, 'torch imported'"
    )
    completed = subprocess.run([sys.executable, "-c", code], env=_env_without_hash_seed(), cwd=REPO_ROOT,
                               capture_output=True, text=True)  # fmt: skip
    assert completed.returncode == 0, completed.stderr
