"""Shared fixtures: a small real DeepMind dataset, its shards, and a runner for real 2-rank jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "cpu-smoke.yaml"


@pytest.fixture(scope="session")
def deepspeed_ops():
    """Build DeepSpeed's C++ ops once per session, before any rank needs them.

    They land in TORCH_EXTENSIONS_DIR (shared by every process), so the ~60 s shm-comm and ~90 s
    cpu_adam compiles are paid here once, and never concurrently by two ranks inside a test.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    for name in ("ShareMemCommBuilder", "CPUAdamBuilder"):
        get_accelerator().create_op_builder(name).load(verbose=False)


@pytest.fixture(scope="session")
def dm_data(tmp_path_factory):
    """Real generated algebra__linear_1d problems in the released format, and shards built from them."""
    from data_tools.deepmind import generate_released
    from data_tools.shards import build_qa_shards
    from data_tools.tokenizer import train_tokenizer
    from megatrain.data.released import TRAIN_SPLITS, read_split

    root = tmp_path_factory.mktemp("dm")
    released = generate_released(root / "released", "algebra__linear_1d", train=1200, test=64, seed=3,
                                 progress=False)
    pairs = read_split(released, "algebra__linear_1d", TRAIN_SPLITS)
    tokenizer = train_tokenizer((t for pair in pairs for t in pair), root / "tok", vocab_size=512)
    build_qa_shards(pairs, tokenizer, root / "shards", samples_per_shard=512, block_size=128)
    return {"released": released, "shards": root / "shards"}


def run_megatrain(*args: str, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """`python -m megatrain ARGS` as a user would run it; output captured for the assertions."""
    return subprocess.run([sys.executable, "-m", "megatrain", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, **popen)


@pytest.fixture(scope="session")
def train_smoke(dm_data, deepspeed_ops):
    """Train configs/cpu-smoke.yaml on the test data with 2 local ranks; returns the run folder."""
    def train(run_dir: Path, *overrides: str, nproc: int = 2, check: bool = True, **popen) -> subprocess.CompletedProcess:
        result = run_megatrain("train", SMOKE, "--nproc", nproc, f"--run.dir={run_dir}",
                               f"--data.shards={dm_data['shards']}", f"--eval.released={dm_data['released']}",
                               *overrides, **popen)
        if check:
            assert result.returncode == 0, result.stderr[-3000:]
        return result
    return train


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl (later lines win: a resumed run rewrites the steps it repeats)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def assert_checkpoint_scores_as_in_the_run(run_dir: Path) -> None:
    """`megatrain eval` of the run's last checkpoint, on one process, gives the scores of the run's own final
    eval, and `megatrain generate` the answer the run gave to its first example."""
    summary = json.loads((run_dir / "eval.json").read_text())
    out = run_megatrain("eval", run_dir, "--limit", "16")
    assert out.returncode == 0, out.stderr[-2000:]
    alone = json.loads(out.stdout)
    for key in ("n", "exact_match", "numeric_match", "teacher_forced_exact_match"):
        assert alone[key] == summary[key], key
    example = summary["examples"]["algebra__linear_1d"][0]
    out = run_megatrain("generate", run_dir, example["question"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.rstrip("\n") == example["answer"]


@pytest.fixture(scope="session")
def reference_run(train_smoke, tmp_path_factory):
    """The fp32 ZeRO-2 run every parity test compares with (8 steps, cosine schedule)."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    train_smoke(run_dir)
    return run_dir


@pytest.fixture(scope="session")
def tp_runs(train_smoke, tmp_path_factory):
    """TP=2 runs of cpu-smoke by (ZeRO stage, ranks), each trained once for every test that reads it (the
    parity, export and eval tests); returns (run folder, the launcher's stderr). A test may add files to
    the run (an export of an interval checkpoint) but not change what is there."""
    done = {}

    def get(stage: int, nproc: int) -> tuple[Path, str]:
        if (stage, nproc) not in done:
            run = tmp_path_factory.mktemp("tp") / f"tp2-zero{stage}-{nproc}ranks"
            result = train_smoke(run, "--parallel.tp_degree=2", f"--parallel.zero_stage={stage}", nproc=nproc)
            done[stage, nproc] = run, result.stderr
        return done[stage, nproc]
    return get


DEBIAN_PACKAGES = ("pari-doc", "gap-doc", "libcoq-stdlib")
DEBIAN_CACHE = Path.home() / ".cache" / "megatrain-tests" / "debian"


@pytest.fixture(scope="session")
def debian_corpus():
    """Real math text from Debian packages, as `--source` strings over small subsets (~3.7 MB):
    pari-doc's LaTeX manual (*.tex), its gzipped changelogs (*.gz), gap-doc's HPC-GAP book (HTML)
    and Coq's Init library (*.v). The .debs are fetched once with `apt-get download` into
    ~/.cache/megatrain-tests/debian and unpacked with `dpkg -x` (nothing is installed)."""
    import shutil

    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        pytest.skip("apt-get/dpkg not available: the Debian real-text corpus cannot be fetched")
    DEBIAN_CACHE.mkdir(parents=True, exist_ok=True)
    unpacked = DEBIAN_CACHE / "unpacked"
    unpacked.mkdir(exist_ok=True)  # dpkg -x creates the target folder, not its parents
    for package in DEBIAN_PACKAGES:
        target = unpacked / package
        if (target / ".complete").is_file():
            continue
        debs = sorted(DEBIAN_CACHE.glob(f"{package}_*.deb"))
        if not debs:
            result = subprocess.run(["apt-get", "download", package], cwd=DEBIAN_CACHE, capture_output=True,
                                    text=True, timeout=300)
            debs = sorted(DEBIAN_CACHE.glob(f"{package}_*.deb"))
            if result.returncode != 0 or not debs:
                pytest.skip(f"apt-get download {package} failed (registry unreachable?): {result.stderr.strip()[-300:]}")
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        subprocess.run(["dpkg", "-x", str(debs[-1]), str(target)], check=True, timeout=300)
        (target / ".complete").touch()
    return {
        "pari-doc": f"pari-doc={unpacked}/pari-doc/usr/share/pari/doc/*.tex",
        "pari-changes": f"pari-changes={unpacked}/pari-doc/usr/share/doc/pari-doc/CHANGES-*.gz",
        "gap-doc": f"gap-doc={unpacked}/gap-doc/usr/share/doc/gap/doc/hpc/*.html",
        "libcoq-stdlib": f"libcoq-stdlib={unpacked}/libcoq-stdlib/usr/lib/ocaml/coq/theories/Init/*.v",
    }


@pytest.fixture(scope="session")
def mix_data(debian_corpus, dm_data, tmp_path_factory):
    """A real four-source mixture built with `megatrain-data build`'s code: pari-doc LaTeX, gap-doc
    HTML, Coq's Init library and generated DeepMind math, one dataset each, one shared tokenizer."""
    from data_tools.build import build_dataset
    from data_tools.sources import parse_source
    from data_tools.tokenizer import train_tokenizer_on_sources

    root = tmp_path_factory.mktemp("mix")
    specs = {
        "tex": parse_source(debian_corpus["pari-doc"].replace("pari-doc=", "tex=", 1)),
        "html": parse_source(debian_corpus["gap-doc"].replace("gap-doc=", "html=", 1)),
        "coq": parse_source(debian_corpus["libcoq-stdlib"].replace("libcoq-stdlib=", "coq=", 1)),
        "math": parse_source(f"math=deepmind:{dm_data['released']}#module=algebra__linear_1d"),
    }
    tokenizer = train_tokenizer_on_sources(list(specs.values()), root / "tokenizer", vocab_size=1024,
                                           max_sentences=20_000)
    datasets = {}
    for name, spec in specs.items():
        datasets[name] = root / name
        build_dataset([spec], tokenizer, datasets[name], seq_len=128, rows_per_block=16, workers=1,
                      shard_mb=0.25, progress=False)
    return {"datasets": datasets, "tokenizer": tokenizer}


MODULES = ["algebra__linear_1d", "numbers__place_value"]


@pytest.fixture(scope="session")
def mm_data(tmp_path_factory):
    """Two real modules generated and sharded by `megatrain-data` as a user runs it."""
    root = tmp_path_factory.mktemp("modules")
    cli = [sys.executable, "-m", "data_tools.cli", "deepmind"]
    subprocess.run([*cli, "generate", "--module", ",".join(MODULES), "--train", "900", "--test", "40", "--seed", "5",
                    "--out", str(root / "released")], check=True, capture_output=True, cwd=REPO)
    subprocess.run([*cli, "shards", "--released", str(root / "released"), "--module", ",".join(MODULES),
                    "--out", str(root / "shards"), "--samples-per-shard", "512", "--block-size", "128"],
                   check=True, capture_output=True, cwd=REPO)
    return {"released": root / "released", "shards": root / "shards", "root": root}
