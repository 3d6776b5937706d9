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
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable

from megatrain.files import atomic_write_text
from megatrain.run_dir import RunDir

EXIT_RANK_LOST = 3
COLLECTIVE_FAILURES = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer",
                       "Broken pipe", "Watchdog caught collective operation timeout", "NCCL communicator was aborted")
"""What torch.distributed raises (gloo, NCCL) when a peer died or stopped answering."""


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
