"""`megatrain train CONFIG --nproc N`: start N local ranks without an external launcher.

The ranks get the same environment torchrun would give them (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), so the training code has one path for every launcher. If one rank
fails, the others are stopped, and the first failing rank's exit code is returned.

A rank that the launcher did not stop and that ended by SIGABRT or SIGKILL counts as lost, as one that
exited with EXIT_RANK_LOST: NCCL's watchdog ends a rank by std::abort (SIGABRT) when it tears the
process down, the kernel's OOM killer by SIGKILL, and neither runs any Python. The launcher then
returns EXIT_RANK_LOST too, for --auto-resume to continue from the latest checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from megatrain.heartbeat import EXIT_RANK_LOST
from megatrain.parallel.dims import free_port


def rank_env(rank: int, nproc: int, port: int, threads_per_rank: int | None = None) -> dict[str, str]:
    """The environment torchrun gives local rank `rank` of `nproc` (this process's, plus those keys)."""
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // nproc)
    return dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank),
                WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(threads)))


LOST_SIGNALS = (signal.SIGABRT, signal.SIGKILL)
"""How a rank ends when no Python runs: NCCL's watchdog (std::abort), the OOM killer."""


def lost_to_a_signal(codes: list[int | None], stopped: set[int]) -> list[tuple[int, str]]:
    """(rank, signal name) of the ranks that ended by a LOST_SIGNALS signal this launcher did not send."""
    return [(rank, signal.Signals(-code).name) for rank, code in enumerate(codes)
            if rank not in stopped and code is not None and code < 0 and -code in LOST_SIGNALS]


def run_local(nproc: int, argv: list[str], threads_per_rank: int | None = None) -> int:
    """Run `python -m megatrain <argv>` as `nproc` ranks on this machine; returns the exit code."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "megatrain", *argv],
                              env=rank_env(rank, nproc, port, threads_per_rank)) for rank in range(nproc)]

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code, failed_at, stopped = 0, None, set()
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed:
                code, failed_at = failed[0], failed_at or time.monotonic()
                for rank, p in enumerate(procs):
                    if p.poll() is None:
                        # SIGTERM first (a rank checkpoints on it); a rank that ignores it for 10 s
                        # (stopped, or stuck in a collective) is killed, at once when a rank was lost
                        # (the others cannot checkpoint without it).
                        lost = code == EXIT_RANK_LOST or time.monotonic() - failed_at > 10
                        p.kill() if lost else p.terminate()
                        stopped.add(rank)
            time.sleep(0.2)
        codes = [p.returncode for p in procs]
        if EXIT_RANK_LOST in codes:  # a survivor has named the lost rank (heartbeat.py)
            return EXIT_RANK_LOST
        signalled = lost_to_a_signal(codes, stopped)
        if signalled:  # no survivor could say it: all of them ended without Python
            who = ", ".join(f"rank {rank} ({name})" for rank, name in signalled)
            print(f"error: {who} ended by a signal, without a word (NCCL's watchdog aborts a rank whose collective "
                  "failed or timed out; the OOM killer sends SIGKILL). Exiting with code "
                  f"{EXIT_RANK_LOST}; --auto-resume continues from the latest checkpoint", file=sys.stderr, flush=True)
            return EXIT_RANK_LOST
        return code or next((c for c in codes if c), 0)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
