"""The run folder's layout: the one module that knows where a run keeps what.

    <run.dir>/
        config.yaml          the resolved config (a comment heads it: how precision was chosen)
        metrics.jsonl        one line per log interval (a resumed run appends)
        tensorboard/         the same numbers as TensorBoard events
        loss.png             total and per-source loss, drawn when the run ends
        eval.json            the final evaluation (per module, with examples)
        DONE                 {"step": N} once the run reached train.steps
        slurm.json           the SLURM jobs submitted for it (`megatrain submit`)
        slurm/               submitit's folder: sbatch scripts, pickles, logs
        heartbeats/rank<R>.json  each rank's last finished step and when (heartbeat.py)
        checkpoints/
            step_<N>/        a complete checkpoint (what is inside: checkpoint.py)
            .tmp-step_<N>/   one being written; never loaded
            latest           the name of the newest complete checkpoint

Writers (trainer, checkpointer, metrics, evaluator, submit) and readers (`megatrain status`,
`eval`, `generate`, resume) all take their paths from here.
"""

from __future__ import annotations

import json
from pathlib import Path

STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"


class RunDir:
    """Paths inside one run folder (nothing is created until a writer needs it)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"

    @property
    def done(self) -> Path:
        return self.root / "DONE"

    @property
    def slurm_record(self) -> Path:
        return self.root / "slurm.json"

    @property
    def slurm_folder(self) -> Path:
        return self.root / "slurm"

    def heartbeat(self, rank: int) -> Path:
        return self.root / "heartbeats" / f"rank{rank}.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def latest_file(self) -> Path:
        return self.checkpoints / "latest"

    def has_checkpoint(self) -> bool:
        """Whether a checkpoint was ever completed (`latest` exists)."""
        return self.latest_file.is_file()

    def latest(self) -> Path | None:
        """The folder `latest` names (it may have been deleted since), or None without checkpoints."""
        if not self.has_checkpoint():
            return None
        return self.checkpoints / self.latest_file.read_text().strip()

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / f"{STEP_PREFIX}{step}"

    def tmp_step_dir(self, step: int) -> Path:
        return self.checkpoints / f"{TMP_PREFIX}{STEP_PREFIX}{step}"

    def step_dirs(self) -> list[tuple[int, Path]]:
        """(step, folder) of every complete checkpoint folder, oldest first."""
        found = [(int(p.name[len(STEP_PREFIX):]), p) for p in self.checkpoints.glob(f"{STEP_PREFIX}*")
                 if p.is_dir() and p.name[len(STEP_PREFIX):].isdigit()]
        return sorted(found)

    def tmp_dirs(self) -> list[Path]:
        """Checkpoints left half-written by a crash."""
        return sorted(self.checkpoints.glob(f"{TMP_PREFIX}*"))

    def done_step(self) -> int | None:
        """The step DONE records, or None when the run has not finished."""
        if not self.done.is_file():
            return None
        return int(json.loads(self.done.read_text() or "{}").get("step", 0))

    def mark_done(self, step: int) -> None:
        self.done.write_text(json.dumps({"step": step}) + "\n")
