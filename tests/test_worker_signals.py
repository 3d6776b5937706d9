"""DataLoader workers under the scheduler's signals, and a worker that dies: on 2 real local ranks.

SLURM (preemption, time limit, node drain) and a `kill -TERM -<pgid>` signal every process,
DataLoader workers included. The run must stop at a step boundary with a checkpoint there and
continue from it, with 1 and 2 workers per rank (the SLURM form is in test_slurm.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, SMOKE, losses


def start(run: Path, dm_data, *overrides: str) -> subprocess.Popen:
    """`megatrain train --nproc 2` in its own process group, as a batch system starts it."""
    return subprocess.Popen(
        [sys.executable, "-m", "megatrain", "train", str(SMOKE), "--nproc", "2", f"--run.dir={run}",
         f"--data.shards={dm_data['shards']}", f"--eval.released={dm_data['released']}", *overrides],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_steps(run: Path, proc: subprocess.Popen, steps: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    path = run / "metrics.jsonl"
    while not (path.is_file() and len(path.read_text().splitlines()) >= steps):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no {steps} steps within {timeout} s"
        time.sleep(0.1)


def latest_step(run: Path) -> int:
    return int((run / "checkpoints" / "latest").read_text().split("_")[1])


def workers_of(launcher: subprocess.Popen) -> list[psutil.Process]:
    """The DataLoader workers: children of the ranks, which are children of the launcher."""
    ranks = psutil.Process(launcher.pid).children()
    return [w for r in ranks for w in r.children()]


@pytest.mark.parametrize("num_workers", [1, 2])
def test_sigterm_to_the_process_group_checkpoints_and_resumes(dm_data, deepspeed_ops, tmp_path, num_workers):
    run = tmp_path / "run"
    interval = 50
    proc = start(run, dm_data, f"--data.num_workers={num_workers}", "--train.steps=3000",
                 f"--checkpoint.interval={interval}", "--eval.final_limit=0")
    wait_for_steps(run, proc, 5)
    assert len(workers_of(proc)) == 2 * num_workers  # the workers are up and will get the signal too
    os.killpg(proc.pid, signal.SIGTERM)
    signalled = time.monotonic()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "DataLoader worker" not in err and "Traceback" not in err, err[-3000:]
    stopped = max(losses(run))
    assert latest_step(run) == stopped  # the checkpoint is at the step the signal stopped, none lost
    print(f"SIGTERM to exit: {time.monotonic() - signalled:.1f} s")
    # Continue (a shorter schedule keeps the test short; the step count may change on resume).
    end = stopped + 5
    result = subprocess.run([sys.executable, "-m", "megatrain", "train", str(SMOKE), "--nproc", "2",
                             f"--run.dir={run}", f"--data.shards={dm_data['shards']}",
                             f"--eval.released={dm_data['released']}", f"--data.num_workers={num_workers}",
                             f"--train.steps={end}", f"--checkpoint.interval={interval}", "--eval.final_limit=0",
                             "--auto-resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run / "DONE").read_text())["step"] == end
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, end + 1))  # 0 steps repeated, none skipped


def test_a_killed_worker_is_one_clear_error_after_a_checkpoint(dm_data, deepspeed_ops, tmp_path):
    run = tmp_path / "run"
    proc = start(run, dm_data, "--data.num_workers=1", "--train.steps=3000", "--checkpoint.interval=1000",
                 "--eval.final_limit=0")
    wait_for_steps(run, proc, 5)
    victim = workers_of(proc)[-1]  # rank 1's worker
    victim.kill()
    killed = time.monotonic()
    out, err = proc.communicate(timeout=120)
    detect_s = time.monotonic() - killed
    assert proc.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    # It names the worker, the micro-batch it owed and the shard file that batch reads.
    assert f"a DataLoader worker died (rank 1: DataLoader worker (pid(s) {victim.pid}) exited unexpectedly: " \
           "worker 0 of 1 owed micro-batch" in errors[0]
    assert f"read from {dm_data['shards']}/shard-" in errors[0]
    stopped = latest_step(run)
    assert f"the run saved a checkpoint at step {stopped}: continue with --resume" in errors[0]
    assert stopped == max(losses(run))  # at the boundary of the last step every rank finished
    print(f"worker killed to exit: {detect_s:.1f} s")
