"""`megatrain train CONFIG --nproc N`: start N local ranks without an external launcher.

The ranks get the same environment torchrun would give them (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), so the training code has one path for every launcher. If one rank
fails, the others are stopped, and the first failing rank's exit code is returned.
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
    return dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(threads)))


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
        code, failed_at = 0, None
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed:
                code, failed_at = failed[0], failed_at or time.monotonic()
                for p in procs:
                    if p.poll() is None:
                        # SIGTERM first (a rank checkpoints on it); a rank that ignores it for 10 s
                        # (stopped, or stuck in a collective) is killed, at once when a rank was lost
                        # (the others cannot checkpoint without it).
                        lost = code == EXIT_RANK_LOST or time.monotonic() - failed_at > 10
                        p.kill() if lost else p.terminate()
            time.sleep(0.2)
        return code or next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
