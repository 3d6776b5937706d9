"""A rank that died or hangs: the others fail within parallel.collective_timeout_s and name it.

A collective with a dead peer fails at once (gloo: "Connection closed by peer"); with a peer that
hangs (SIGSTOP, a stuck kernel, a dead node whose socket stays open) it fails when the process
group's timeout runs out (dims.init_world sets it for every group). Either way the survivors only
know that *a* peer is gone. So each rank notes its last finished step in
<run.dir>/heartbeats/rank<R>.json (at most every 10 s); a survivor whose collective fails
marks its note "failed", waits a few seconds for the other survivors to do the same, and names the
ranks whose notes are not marked: those stopped. It then prints one line and exits with
EXIT_RANK_LOST, which the local launcher and the SLURM job (scontrol requeue) turn into a restart
from the latest checkpoint.

On NCCL that exception only reaches Python with nccl_fault_env(): with torch's default
(TORCH_NCCL_ASYNC_ERROR_HANDLING=3, SkipCleanUp) the watchdog thread rethrows the timeout and the
process ends by SIGABRT with no Python frame run. The local launcher also counts a rank ended by
SIGABRT or SIGKILL as lost (launch/local.py). docs/reliability.md, "NCCL: a hung or dead GPU rank",
has the torch source this rests on.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping

from megatrain.files import atomic_write_text
from megatrain.run_dir import RunDir

EXIT_RANK_LOST = 3
COLLECTIVE_FAILURES = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer",
                       "Broken pipe", "Watchdog caught collective operation timeout", "NCCL communicator was aborted",
                       "remote process exited")
"""What torch.distributed raises (gloo, NCCL) when a peer died or stopped answering. NCCL's: a work's
timeout (WorkNCCL::checkTimeout), a collective on a communicator the watchdog aborted
(NCCLComm::getNcclComm), and ncclRemoteError ("remote process exited or there was a network error")."""

NCCL_ERROR_HANDLING_VARS = ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING",
                            "TORCH_NCCL_BLOCKING_WAIT", "NCCL_BLOCKING_WAIT")
"""torch's switches (and their old names) for what ProcessGroupNCCL does with a failed collective."""

NCCL_CLEAN_UP_ONLY = "2"
"""ErrorHandlingMode CleanUpOnly (ProcessGroupNCCL.hpp): abort the communicators, keep the process."""


def nccl_fault_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables a rank needs, before its NCCL process groups exist, for a collective that timed
    out or lost its peer to end in a Python exception (and so in exit_if_rank_lost) instead of SIGABRT.

    TORCH_NCCL_ASYNC_ERROR_HANDLING=2 (CleanUpOnly): the watchdog thread still bounds every collective by
    the group's timeout (parallel.collective_timeout_s), then aborts the communicators instead of
    rethrowing in its own thread (which ends the process by std::terminate); the rank's next collective
    raises "NCCL communicator was aborted". It costs nothing while collectives succeed, unlike
    TORCH_NCCL_BLOCKING_WAIT=1 (every wait() holds the CPU until the GPU finishes, and no watchdog).
    A user's own choice of either switch is kept: returns {} then. Gloo ignores these variables.
    """
    if any(name in environ for name in NCCL_ERROR_HANDLING_VARS):
        return {}
    return {"TORCH_NCCL_ASYNC_ERROR_HANDLING": NCCL_CLEAN_UP_ONLY}


def is_collective_failure(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and any(s in str(error) for s in COLLECTIVE_FAILURES)


_last_step: int | None = None  # this process's last finished step (the note on disk may be older)


class Heartbeat:
    """This rank's note of its last finished step (written at most every `every_s` seconds)."""

    def __init__(self, run_dir: str, rank: int, every_s: float = 10.0):
        self.path = RunDir(run_dir).heartbeat(rank)
        self.rank, self.every_s, self._last = rank, every_s, 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def beat(self, step: int, force: bool = False) -> None:
        global _last_step
        _last_step = step
        now = time.time()
        if force or now - self._last >= self.every_s:
            note = {"rank": self.rank, "step": step, "time": now, "host": socket.gethostname(), "pid": os.getpid()}
            atomic_write_text(self.path, json.dumps(note), durable=False)
            self._last = now


def exit_if_rank_lost(run_dir: str, rank: int, world_size: int, error: BaseException,
                      before_exit: Callable[[], None] | None = None) -> None:
    """If `error` is a collective that failed on a lost peer: one line naming it, `before_exit()` (a
    SLURM job requeues itself there), then exit code EXIT_RANK_LOST at once (a normal exit would wait
    on the broken process group). Otherwise returns, for the caller to raise `error`."""
    if not is_collective_failure(error):
        return
    print(f"error: {lost_rank_line(run_dir, rank, world_size, error)}", file=sys.stderr, flush=True)
    if before_exit is not None:
        before_exit()
    os._exit(EXIT_RANK_LOST)


def lost_rank_line(run_dir: str, rank: int, world_size: int, error: BaseException, grace_s: float = 3.0) -> str:
    """Mark this rank's note failed, wait `grace_s` for the other survivors to, and say who stopped."""
    run = RunDir(run_dir)
    mine = {**_read(run, rank), **({"step": _last_step} if _last_step is not None else {})}
    atomic_write_text(run.heartbeat(rank), json.dumps({**mine, "failed": time.time()}))
    time.sleep(grace_s)
    notes = [_read(run, r) for r in range(world_size)]
    lost = [n for n in notes if "failed" not in n]
    now = time.time()
    if lost:
        who = "; ".join(f"rank {n['rank']} ({n.get('host', '?')}) stopped answering (its last note: step "
                        f"{n.get('step', '?')}, {now - n.get('time', 0):.0f} s ago)" for n in lost[:4])
        who += f" (and {len(lost) - 4} more)" if len(lost) > 4 else ""
    else:
        who = "every rank reports the failure (a network fault?)"
    latest = run.latest()
    then = f"the run resumes from {latest.name}" if latest else "no checkpoint yet: the run starts over"
    cause = str(error).splitlines()[0].split("] ")[-1][:120]
    return (f"rank {rank}: a collective failed ({cause}); {who}. Exiting with code {EXIT_RANK_LOST} for the "
            f"scheduler to restart the job; {then} (--auto-resume)")


def _read(run: RunDir, rank: int) -> dict:
    try:
        return {"rank": rank, **json.loads(run.heartbeat(rank).read_text())}
    except (OSError, ValueError):
        return {"rank": rank}
