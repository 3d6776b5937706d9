"""Stop at a step boundary when the scheduler asks: SIGTERM, or SIGUSR2 (submitit's preemption and
time-limit signal, sent by SLURM `--signal=USR2@<seconds>` before the limit).

A signal reaches ranks at different moments, or only some of them, and a checkpoint needs every
rank. So the handler only sets a flag; the trainer sums it over all ranks once per step
(`train.stop_or_fail`), and every rank sees the same answer at the same step.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class StopRequest:
    """Turns SIGTERM/SIGUSR2 into a flag that all ranks agree on at a step boundary.

    Use as a context manager around training; the previous handlers (e.g. submitit's own) come back
    on exit, so whoever installed them can still act on them afterwards.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, _frame) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name
