"""A lost GPU rank on NCCL ends in exit 3 (a requeue) like one on gloo: what can be checked without a GPU.

With torch's default TORCH_NCCL_ASYNC_ERROR_HANDLING (3, SkipCleanUp) the NCCL watchdog ends every
rank whose collective timed out or failed by SIGABRT, and no Python (heartbeat.exit_if_rank_lost)
runs. megatrain therefore gives each rank CleanUpOnly (2), under which the failure reaches Python as
on gloo, and the local launcher counts a rank ended by SIGABRT/SIGKILL as lost. Here: the env each
launcher gives a rank, torch's own header for what "2" means, the NCCL messages the heartbeat path
recognises, and a real 2-rank run whose ranks are all ended by SIGABRT, as the watchdog would.
docs/reliability.md, "NCCL: a hung or dead GPU rank", has the torch source lines.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import REPO, SMOKE
from megatrain.heartbeat import EXIT_RANK_LOST, is_collective_failure, nccl_fault_env
from megatrain.launch.local import lost_to_a_signal

HEADER = Path(torch.__file__).parent / "include/torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp"


def test_a_rank_gets_clean_up_only_unless_the_user_chose_an_nccl_error_mode(monkeypatch):
    assert nccl_fault_env({}) == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}
    for name in ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT",
                 "NCCL_BLOCKING_WAIT"):
        assert nccl_fault_env({name: "1"}) == {}, name  # the user's choice (or torch's old name for it) stands
    # Every launcher's ranks (--nproc, torchrun, deepspeed, srun, submit) set it in init_world, before the
    # process groups exist.
    env = {k: v for k, v in os.environ.items() if "NCCL" not in k}
    code = ("import os; from megatrain.parallel.dims import init_world, shutdown; init_world(); "
            "print(os.environ['TORCH_NCCL_ASYNC_ERROR_HANDLING']); shutdown()")
    for chosen, want in ((None, "2"), ("3", "3")):
        run = subprocess.run([sys.executable, "-c", code], env=dict(env, **({"TORCH_NCCL_ASYNC_ERROR_HANDLING": chosen}
                                                                          if chosen else {})),
                             capture_output=True, text=True, timeout=120, cwd=REPO)
        assert run.returncode == 0 and run.stdout.split()[-1] == want, run.stderr[-2000:]


@pytest.mark.skipif(not HEADER.is_file(), reason="this torch wheel ships no C++ headers to read the modes from")
def test_the_mode_megatrain_sets_cleans_up_without_tearing_the_process_down():
    """Against the installed torch's ProcessGroupNCCL.hpp: "2" is CleanUpOnly, which aborts the
    communicators (SHOULD_CLEAN_UP) and does not rethrow in the watchdog (SHOULD_TEAR_DOWN), and the
    default, "3" SkipCleanUp, is the one that tears the process down."""
    text = HEADER.read_text()
    modes = {name: int(value) for name, value in re.findall(r"^\s*(\w+) = (\d),?$", text.split("enum ErrorHandlingMode")[1]
                                                             .split("}")[0], re.M)}
    assert modes == {"NoHandling": 0, "TearDown": 1, "CleanUpOnly": 2, "SkipCleanUp": 3}
    assert "#define SHOULD_CLEAN_UP(a) (a != NoHandling && a != SkipCleanUp)" in text
    assert "#define SHOULD_TEAR_DOWN(a) (a != NoHandling && a != CleanUpOnly)" in text
    assert nccl_fault_env({})["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == str(modes["CleanUpOnly"])


def test_nccl_failures_take_the_lost_rank_path():
    """What a collective raises under CleanUpOnly: the communicator the watchdog aborted
    (NCCLComm::getNcclComm), a work whose timeout it found (WorkNCCL::checkTimeout) and NCCL's
    ncclRemoteError. torch raises them as DistBackendError, a RuntimeError."""
    raised = [
        "NCCL communicator was aborted on rank 0. Original reason for failure was: [PG ID 0 PG GUID 0(default_pg) "
        "Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE, NumelIn=1, "
        "NumelOut=1, Timeout(ms)=600000) ran for 600075 milliseconds before timing out.",
        "[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE) ran for 600075 "
        "milliseconds before timing out.",
        "NCCL error: remote process exited or there was a network error, NCCL version 2.27.5\nncclRemoteError: A call "
        "failed possibly due to a network error or a remote process exiting prematurely.",
    ]
    for message in raised:
        assert is_collective_failure(torch.distributed.DistBackendError(message)), message
    assert not is_collective_failure(torch.distributed.DistBackendError("NCCL error: invalid usage"))


def test_only_a_rank_the_launcher_did_not_stop_counts_as_lost():
    codes = [-signal.SIGKILL, -signal.SIGABRT, -signal.SIGTERM, 3, 0, None]
    assert lost_to_a_signal(codes, stopped={0}) == [(1, "SIGABRT")]
    assert lost_to_a_signal(codes, stopped=set()) == [(0, "SIGKILL"), (1, "SIGABRT")]


def test_ranks_ended_by_sigabrt_end_the_job_with_code_3_and_the_run_resumes(train_smoke, dm_data, tmp_path):
    """Every rank aborted at once, as NCCL's watchdog does under torch's default mode: no rank prints a
    line or exits 3 itself; the launcher says which rank ended how and exits 3; --auto-resume finishes."""
    run, steps, interval = tmp_path / "run", 40, 10
    overrides = (f"--train.steps={steps}", f"--checkpoint.interval={interval}", "--log.interval=1",
                 "--eval.final_limit=0")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "megatrain", "train", str(SMOKE), "--nproc", "2", f"--run.dir={run}",
         f"--data.shards={dm_data['shards']}", *overrides],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= interval + 5):  # past a checkpoint
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run did not reach step 15"
        time.sleep(0.02)
    ranks = {int(p.environ()["RANK"]): p for p in psutil.Process(launcher.pid).children()}
    for rank in (1, 0):
        ranks[rank].send_signal(signal.SIGABRT)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == EXIT_RANK_LOST, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "rank 1 (SIGABRT)" in errors[0] and "--auto-resume" in errors[0], stderr[-3000:]
    latest = int((run / "checkpoints" / "latest").read_text().split("_")[1])
    assert latest >= interval
    train_smoke(run, *overrides, "--auto-resume")  # asserts exit 0
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert json.loads((run / "DONE").read_text())["step"] == steps
    assert [r["step"] for r in records if "loss" in r][-(steps - latest):] == list(range(latest + 1, steps + 1))
