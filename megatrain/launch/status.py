"""`megatrain status RUN_DIR`: where a run stands, from its folder and, when reachable, from SLURM."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from megatrain.errors import MegatrainError
from megatrain.run_dir import RunDir


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """job id -> SLURM state (sacct, else squeue for jobs still queued); {} without SLURM."""
    if not job_ids:
        return {}
    states: dict[str, str] = {}
    if shutil.which("sacct"):
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
                             capture_output=True, text=True)
        for line in out.stdout.splitlines() if out.returncode == 0 else []:
            job_id, _, state = line.partition("|")
            states[job_id] = state.split()[0] if state else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
    elif shutil.which("squeue"):
        out = subprocess.run(["squeue", "-h", "-o", "%i|%T", "-j", ",".join(job_ids)], capture_output=True, text=True)
        for line in out.stdout.splitlines() if out.returncode == 0 else []:
            job_id, _, state = line.partition("|")
            states[job_id] = state
    return states


def run_status(run_dir: str | Path) -> dict:
    """What the run folder says: state, step, last loss, restarts, SLURM jobs.

    Raises:
        MegatrainError: `run_dir` is not a megatrain run folder.
    """
    run = RunDir(run_dir)
    if not run.config.is_file() and not run.slurm_record.is_file():
        raise MegatrainError(f"{run.root} is not a megatrain run folder (no {run.config.name} or "
                             f"{run.slurm_record.name}); pass the run.dir of a run")
    records = []
    if run.metrics.is_file():
        records = [json.loads(line) for line in run.metrics.read_text().splitlines() if line.strip()]
    losses = [r for r in records if "loss" in r]
    latest = run.latest()
    jobs = json.loads(run.slurm_record.read_text())["jobs"] if run.slurm_record.is_file() else []
    states = slurm_states([j["job_id"] for j in jobs])
    slurm_state = states.get(jobs[-1]["job_id"]) if jobs else None
    if run.done.is_file():
        state = "done"
    elif slurm_state:
        state = slurm_state.lower()
    else:
        state = "started" if records else "not started"
    return {"run_dir": str(run.root), "state": state,
            "step": losses[-1]["step"] if losses else 0,
            "checkpoint": latest.name if latest else None,
            "last_loss": losses[-1]["loss"] if losses else None,
            "restarts": max((r.get("restarts", 0) for r in records), default=0),
            "jobs": [{"job_id": j["job_id"], "state": states.get(j["job_id"]), "stdout": j["stdout"]} for j in jobs]}


def format_status(status: dict) -> str:
    """A few human-readable lines."""
    loss = f"{status['last_loss']:.4f}" if status["last_loss"] is not None else "-"
    lines = [f"{status['run_dir']}: {status['state']}",
             f"  step {status['step']}, last loss {loss}, checkpoint {status['checkpoint'] or '-'}, "
             f"restarts {status['restarts']}"]
    for job in status["jobs"]:
        lines.append(f"  job {job['job_id']}: {job['state'] or 'state unknown'}   log {job['stdout']}")
    return "\n".join(lines)
