"""Faults injected for real into 2-rank training runs, each with what must happen after it.

NaN losses (MEGATRAIN_INJECT_NAN_LOSS, guard.py), a rank hung with SIGSTOP or killed with SIGKILL,
checkpoint files truncated, deleted or replaced by a crafted pickle, a disk that fills up (a small
tmpfs), and .bin pickles in an import folder. Where the fault allows it, the run that recovers
ends on the uninterrupted reference's fp32 losses exactly.

Figures (time from fault to exit, steps lost) are appended to $MEGATRAIN_FAULT_REPORT when set
(docs/reliability.md quotes them).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, SMOKE, losses
from megatrain.checkpoint import CHECKSUMS, checkpoint_files, damage, sha256_of
from megatrain.launch.local import rank_env
from megatrain.parallel.dims import free_port
from test_bad_input import assert_one_clear_line, tree_digest


def report(**figures) -> None:
    path = os.environ.get("MEGATRAIN_FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(figures) + "\n")


def records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def nan_env(spec: str) -> dict:
    return {**os.environ, "MEGATRAIN_INJECT_NAN_LOSS": spec}


@pytest.fixture(scope="session")
def reference12(train_smoke, tmp_path_factory):
    """An uninterrupted 12-step run (checkpoints at 4, 8 and 12)."""
    run = tmp_path_factory.mktemp("faults") / "reference12"
    train_smoke(run, "--train.steps=12", "--eval.final_limit=0")
    return run


# --- non-finite losses ----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [(), ("--parallel.zero_stage=3", "--precision=bf16")], ids=["zero2_fp32", "zero3_bf16"])
def test_a_nan_loss_on_one_rank_skips_that_step_on_every_rank(train_smoke, reference_run, tmp_path, overrides):
    run = tmp_path / "run"
    train_smoke(run, "--eval.final_limit=0", *overrides, env=nan_env("3@1"))
    got, want = records(run), records(reference_run)
    assert got[3]["skipped"].startswith("loss=nan") and got[3]["train/skipped_steps"] == 1
    assert got[3]["data"]["consumed_samples"] == 32  # the samples of step 3: 2 steps of 16 before it
    assert got[4]["lr"] == want[3]["lr"]  # the LR schedule did not advance over the skipped step
    assert got[8]["train/skipped_steps"] == 1
    assert all(r["loss"] == r["loss"] for s, r in got.items() if s != 3)  # finite after it
    assert got[8]["loss"] < got[1]["loss"] - 1.0


def test_too_many_nonfinite_steps_stop_with_the_last_good_weights(train_smoke, tmp_path):
    run, one = tmp_path / "run", tmp_path / "one_step"
    result = train_smoke(run, "--eval.final_limit=0", "--train.max_skipped_steps=2", env=nan_env("2,3,4@1"),
                         check=False)
    assert result.returncode == 2
    assert_one_clear_line(result, "steps 2, 3, 4", "train.max_skipped_steps=2", "step_4", "--resume")
    # The weights saved at step 4 are those after step 1, bit for bit: three skipped steps changed nothing.
    train_smoke(one, "--eval.final_limit=0", "--train.exit_interval=1")
    saved, after_one = (load_file(r / "checkpoints" / s / "hf" / "model.safetensors")
                        for r, s in ((run, "step_4"), (one, "step_1")))
    assert saved.keys() == after_one.keys()
    assert all(torch.equal(saved[k], after_one[k]) for k in saved)
    train_smoke(run, "--eval.final_limit=0", "--resume")  # the run goes on from there
    assert losses(run)[8] < losses(run)[1] - 1.0


def test_zero0_fp32_cannot_skip_and_stops_at_once(train_smoke, tmp_path):
    result = train_smoke(tmp_path / "run", "--eval.final_limit=0", "--parallel.zero_stage=0", env=nan_env("2"),
                         check=False)
    assert_one_clear_line(result, "step 2", "ZeRO-0", "--resume")


# --- damaged and untrusted checkpoints ------------------------------------------------------------

class Payload:
    """Unpickling this runs a shell command (what a crafted checkpoint file would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def replace_file(step: Path, name: str, data: bytes) -> Path:
    """Overwrite a checkpoint file and update checksums.json to match, as a careful attacker would
    (else the resume would fall back to the checkpoint before)."""
    path = step / name
    path.write_bytes(data)
    manifest = json.loads((step / CHECKSUMS).read_text())
    manifest["files"][name] = {"size": path.stat().st_size, "sha256": sha256_of([name], step, None)[name]}
    (step / CHECKSUMS).write_text(json.dumps(manifest))
    return path


def every_rank(run: Path, dm_data, *overrides: str, nproc: int = 2) -> list[tuple[int, str]]:
    """Each rank's (exit code, stderr) from a `megatrain train` whose ranks are started directly, as
    torchrun or SLURM would (--nproc's launcher returns one exit code and stops the other ranks)."""
    port, logs = free_port(), [run.parent / f"rank{rank}.stderr" for rank in range(nproc)]
    argv = [sys.executable, "-m", "megatrain", "train", str(SMOKE), f"--run.dir={run}",
            f"--data.shards={dm_data['shards']}", f"--eval.released={dm_data['released']}", *overrides]
    procs = []
    try:
        for rank, log in enumerate(logs):
            with open(log, "w") as stderr:
                procs.append(subprocess.Popen(argv, cwd=REPO, env=rank_env(rank, nproc, port),
                                              stdout=subprocess.DEVNULL, stderr=stderr))
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(code, log.read_text()) for code, log in zip(codes, logs)]


def assert_refused_on_every_rank(ranks: list[tuple[int, str]], *needles: str) -> None:
    """Exit 2 from every rank; one `error:` line (rank 0 prints it) with the needles; no traceback, and
    no rank taken for lost."""
    for rank, (code, stderr) in enumerate(ranks):
        assert code == 2 and "Traceback" not in stderr and "stopped answering" not in stderr, (rank, stderr[-3000:])
    errors = [line for _, stderr in ranks for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), errors


def test_a_damaged_checkpoint_falls_back_to_the_previous_intact_one(train_smoke, reference12, tmp_path):
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    train_smoke(run, "--train.steps=12", "--train.exit_interval=8", "--eval.final_limit=0")
    optim = sorted((ckpt / "step_8").glob("*optim_states.pt"))[-1]
    with open(optim, "r+b") as f:
        f.truncate(1000)  # a write cut short by a crash of the disk, not of megatrain
    result = train_smoke(run, "--train.steps=12", "--resume", "--eval.final_limit=0")
    assert f"damaged checkpoint step_8 ({optim.name} has 1000 bytes" in result.stdout
    assert "resuming from step_4" in result.stdout
    assert losses(run) == losses(reference12)  # nothing lost but the steps after step_4, retrained
    # `latest` naming a folder that is gone: the newest intact one instead.
    (ckpt / "latest").write_text("step_99")
    train_smoke(run, "--train.steps=14", "--resume", "--eval.final_limit=0")
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_12", "step_14"]
    # A deleted file in one, a changed byte in the other: no intact checkpoint is left.
    (ckpt / "step_14" / "trainer.json").unlink()
    model = ckpt / "step_12" / "hf" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(data)
    before = tree_digest(ckpt)
    result = train_smoke(run, "--train.steps=16", "--resume", check=False)
    assert_one_clear_line(result, "no intact checkpoint", "step_14 (trainer.json is missing)",
                          "step_12 (hf/model.safetensors differs from its sha256")
    assert tree_digest(ckpt) == before


def test_a_crafted_pickle_in_a_checkpoint_is_refused(train_smoke, reference_run, tmp_path):
    """A model-states file replaced by one whose unpickling would run a command (and its checksum
    updated to match): refused before DeepSpeed's torch.load(weights_only=False) reads it."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    step = run / "checkpoints" / "step_8"
    marker = tmp_path / "payload_ran"
    states = step / "mp_rank_00_model_states.pt"
    buffer = io.BytesIO()
    torch.save({**torch.load(states, weights_only=False), "x": Payload(marker)}, buffer)
    replace_file(step, states.name, buffer.getvalue())
    before = tree_digest(run / "checkpoints")
    result = train_smoke(run, "--resume", "--train.steps=10", check=False)
    assert_one_clear_line(result, "mp_rank_00_model_states.pt", "pickled posix.system")
    assert not marker.exists()
    assert tree_digest(run / "checkpoints") == before


# The ranks take the sorted .pt files of step_8 in turn (mp_rank_00_model_states.pt, rng_rank0.pt,
# rng_rank1.pt, zero_pp_rank_0_..., zero_pp_rank_1_...): rank 1 checks the first and third kind's file.
@pytest.mark.parametrize("kind, name", [
    ("pickle_dump", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ("truncated_zip", "mp_rank_00_model_states.pt"),
    ("random_bytes", "rng_rank0.pt"),
])
def test_a_file_that_torch_save_did_not_write_is_refused_on_every_rank(dm_data, reference_run, tmp_path, kind, name):
    """Not torch's zip format (plain pickle.dump: torch.load(weights_only=False) would unpickle it, payload
    and all), a zip cut short, or other bytes: the same refusal and exit 2 on every rank, not a traceback
    on the rank that read it and a lost-rank exit 3 (a SLURM requeue) on the others."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    step = run / "checkpoints" / "step_8"
    marker = tmp_path / "payload_ran"
    original = (step / name).read_bytes()
    if kind == "pickle_dump":
        data = pickle.dumps({"x": Payload(marker)})
    elif kind == "truncated_zip":
        data = original[: len(original) // 2]
    else:
        data = random.Random(0).randbytes(len(original))
    path = replace_file(step, name, data)
    before = tree_digest(run / "checkpoints")
    # A lower collective timeout only bounds how long a rank left waiting (before the fix) takes to fail.
    ranks = every_rank(run, dm_data, "--resume", "--train.steps=10", "--parallel.collective_timeout_s=60")
    assert_refused_on_every_rank(ranks, str(path), "is not a file torch.save writes")
    assert not marker.exists()
    assert tree_digest(run / "checkpoints") == before


def test_a_failed_layout_conversion_is_one_line_on_every_rank(dm_data, reference_run, tmp_path):
    """Resuming the 2-rank TP-1 run at tp_degree 2 converts step_8 to DeepSpeed's universal checkpoint
    on rank 0. An optimizer shard that passes the pickle check but holds no ZeRO state makes the
    converter fail: every rank raises the same error and exits 2, none waits for rank 0 in a collective
    until it takes it for lost."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    step = run / "checkpoints" / "step_8"
    buffer = io.BytesIO()
    torch.save({"optimizer_state_dict": {}}, buffer)
    replace_file(step, "zero_pp_rank_1_mp_rank_00_optim_states.pt", buffer.getvalue())
    before = tree_digest(run / "checkpoints")
    ranks = every_rank(run, dm_data, "--resume", "--train.steps=10", "--parallel.tp_degree=2",
                       "--parallel.collective_timeout_s=60")
    assert_refused_on_every_rank(ranks, f"converting {step}", "ds_to_universal exited with 1",
                                 "KeyError: 'param_slice_mappings'", "on 2 ranks with parallel.tp_degree=1")
    assert tree_digest(run / "checkpoints") == before  # no universal/, no .tmp-universal/ left


def test_checksums_cover_every_file_of_a_checkpoint(reference_run):
    step = reference_run / "checkpoints" / "step_8"
    manifest = json.loads((step / CHECKSUMS).read_text())
    assert sorted(manifest["files"]) == checkpoint_files(step)
    assert {"trainer.json", "hf/model.safetensors", "rng_rank1.pt", "zero_to_fp32.py"} <= manifest["files"].keys()
    assert damage(step) is None
    # DeepSpeed's recovery scripts live in each checkpoint, not beside them (where a failed save
    # would leave them or not, depending on which rank failed first).
    assert sorted(p.name for p in (reference_run / "checkpoints").iterdir()) == ["latest", "step_4", "step_8"]


def test_bin_weights_in_an_import_folder_need_an_opt_in(train_smoke, reference_run, tmp_path):
    folder = tmp_path / "bin_import"  # the trained export, its weights as an older transformers wrote them
    shutil.copytree(reference_run / "checkpoints" / "step_8" / "hf", folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    result = train_smoke(tmp_path / "refused", f"--model.from_pretrained={folder}", check=False)
    assert_one_clear_line(result, str(folder), ".bin", "model.allow_bin_weights=true")
    train_smoke(tmp_path / "opted_in", f"--model.from_pretrained={folder}", "--model.allow_bin_weights=true",
                "--train.steps=2", "--optim.warmup_steps=1", "--eval.final_limit=0")
    assert losses(tmp_path / "opted_in")[1] < losses(reference_run)[1] - 1.0  # the trained weights came in


# --- a full disk ----------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size (root only; skipped elsewhere)."""
    mounts = []

    def mount(size_bytes: int) -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the disk-full tests need root")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", str(where)], check=False)


def checkpoint_bytes(run: Path) -> int:
    return sum(p.stat().st_size for p in (run / "checkpoints" / "step_8").rglob("*") if p.is_file())


def test_a_disk_that_fills_mid_save_stops_cleanly(train_smoke, reference_run, small_disk):
    disk = small_disk(int(0.6 * checkpoint_bytes(reference_run)))  # not even one checkpoint fits
    result = train_smoke(disk / "run", "--eval.final_limit=0", check=False)
    assert_one_clear_line(result, "saving checkpoint step_4 failed", "MiB free", "no checkpoint was written yet")
    assert list((disk / "run" / "checkpoints").iterdir()) == []  # the half-written one is gone


@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_no_room_for_the_next_checkpoint_keeps_the_last_one(train_smoke, reference_run, small_disk, policy):
    disk = small_disk(int(2.5 * checkpoint_bytes(reference_run)))  # two checkpoints fit, a third does not
    run = disk / "run"
    result = train_smoke(run, "--train.steps=12", "--eval.final_limit=0", f"--checkpoint.on_save_failure={policy}",
                         check=False)
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_8"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step_4", "step_8"]
    assert damage(ckpt / "step_8") is None
    if policy == "stop":
        assert_one_clear_line(result, "saving checkpoint step_12 failed", "step_8 and `latest` are unchanged")
    else:
        assert result.returncode == 0 and "warning: saving checkpoint step_12 failed" in result.stdout
        assert max(losses(run)) == 12


# --- a rank that hangs or dies --------------------------------------------------------------------

def start(run: Path, dm_data, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "megatrain", "train", str(SMOKE), "--nproc", "2", f"--run.dir={run}",
         f"--data.shards={dm_data['shards']}", "--eval.final_limit=0", *overrides],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(launcher.pid).children():
        if child.environ().get("RANK") == str(rank):
            return child
    raise AssertionError(f"no rank {rank} under the launcher")


def wait_for_step(run: Path, step: int, launcher: subprocess.Popen, timeout: float = 180) -> None:
    path, deadline = run / "metrics.jsonl", time.monotonic() + timeout
    while not (path.is_file() and len(path.read_text().splitlines()) >= step):
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.fixture(scope="session")
def reference300(train_smoke, tmp_path_factory):
    run = tmp_path_factory.mktemp("faults") / "reference300"
    train_smoke(run, "--train.steps=300", "--checkpoint.interval=50", "--log.interval=10", "--eval.final_limit=0")
    return run


@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
def test_a_hung_or_dead_rank_ends_the_job_and_the_run_resumes(train_smoke, dm_data, reference300, tmp_path, fault):
    run, timeout = tmp_path / "run", 10
    overrides = ("--train.steps=300", "--checkpoint.interval=50", "--log.interval=10",
                 f"--parallel.collective_timeout_s={timeout}")
    launcher = start(run, dm_data, *overrides)
    wait_for_step(run, 8, launcher)  # 8 log lines: past step 80, past the first checkpoint
    victim = rank_process(launcher, 1)
    victim.send_signal(getattr(signal, fault))
    t0 = time.monotonic()
    _, stderr = launcher.communicate(timeout=timeout + 120)
    detected = time.monotonic() - t0
    assert launcher.returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "rank 1" in errors[0] and "stopped answering" in errors[0], stderr[-3000:]
    if fault == "SIGSTOP":
        assert launcher.returncode == 3 and detected < timeout + 30
    latest = int((run / "checkpoints" / "latest").read_text().split("_")[1])
    reached = max(json.loads((run / "heartbeats" / f"rank{r}.json").read_text())["step"] for r in range(2))
    train_smoke(run, *overrides, "--eval.final_limit=0", "--auto-resume")
    assert losses(run) == losses(reference300)  # exact: resumed from the checkpoint, same data after it
    assert reached - latest <= 50  # at most one checkpoint interval retrained
    report(fault=fault, timeout_s=timeout, fault_to_exit_s=round(detected, 1), steps_lost=reached - latest)
