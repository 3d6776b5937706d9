"""`megatrain submit`: training runs as SLURM jobs through submitit, and the task that runs in them.

One SLURM task per GPU (or `--tasks-per-node` on CPU nodes). Each task exports torch's rank
variables with submitit's TorchDistributedEnvironment, trains, and on SIGUSR2 (submitit's
preemption / time-limit signal) or SIGTERM stops all ranks at the next step boundary with a
checkpoint. Rank 0 then hands over to submitit's own handler, which calls `checkpoint()` (this
callable, unchanged: the run folder holds the state), re-pickles it and runs `scontrol requeue`.
The requeued job resumes from `checkpoints/latest` by itself.

A rank that dies or hangs makes the others exit 3 after they requeue the job (heartbeat.py). Where
no rank is left to do it (every task killed: the OOM killer, NCCL's watchdog abort under a user's
TORCH_NCCL_ASYNC_ERROR_HANDLING=3), the batch script does, after srun returns: `after_step`, run as
submitit's teardown, reads srun's exit status.

Every check on the user's input (config, world size, data, run folder, sbatch, partition) runs
before anything is written or submitted.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import submitit
import yaml

from megatrain.config import Config, load_config
from megatrain.errors import ConfigError, MegatrainError
from megatrain.heartbeat import exit_if_rank_lost
from megatrain.resume_policy import config_changes, refuse
from megatrain.run_dir import RunDir


@dataclass
class Resources:
    """What one run asks SLURM for."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    """Tasks (ranks) per node; defaults to gpus_per_node, or 1 on CPU nodes."""
    cpus_per_task: int | None = None
    partition: str | None = None
    time_min: int = 60
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem: str | None = None
    """Memory per node in SLURM's syntax, e.g. 64G."""
    signal_delay_s: int = 90
    """Seconds before the time limit at which SLURM sends SIGUSR2 (time to checkpoint)."""

    @property
    def ranks_per_node(self) -> int:
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise ConfigError(f"--tasks-per-node {self.tasks_per_node} with --gpus-per-node {self.gpus_per_node}: "
                              "megatrain runs one task per GPU; drop --tasks-per-node")
        return self.gpus_per_node or self.tasks_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    def sbatch_parameters(self, job_name: str) -> dict:
        """Parameters of submitit's SlurmExecutor (the sbatch flags) for these resources."""
        params = {"job_name": job_name, "nodes": self.nodes, "ntasks_per_node": self.ranks_per_node,
                  "time": self.time_min, "signal_delay_s": self.signal_delay_s,
                  # The first line after srun in the batch script: $? is srun's exit status.
                  "teardown": [f"{shlex.quote(sys.executable)} -m megatrain.launch.slurm after-step $? "
                               "$SLURM_JOB_ID"]}
        optional = {"gpus_per_node": self.gpus_per_node or None, "cpus_per_task": self.cpus_per_task,
                    "partition": self.partition, "account": self.account, "qos": self.qos,
                    "constraint": self.constraint, "mem": self.mem}
        params.update({k: v for k, v in optional.items() if v is not None})
        return params


class SlurmTrain(submitit.helpers.Checkpointable):
    """The function every SLURM task runs: `megatrain train CONFIG OVERRIDES --auto-resume`, in-process.

    Args:
        config: the YAML recipe (absolute path).
        overrides: `--section.key=value` overrides, run.dir among them (absolute).
    """

    def __init__(self, config: str, overrides: list[str]):
        self.config, self.overrides = config, list(overrides)

    def __call__(self) -> dict:
        from megatrain.preemption import StopRequest

        # submitit's USR2 handler: checkpoint() + re-pickle + `scontrol requeue` + exit. Kept to call
        # once all ranks have written the checkpoint; until then the stop flag takes the signals.
        submitit_requeue = signal.getsignal(signal.SIGUSR2)
        with StopRequest() as stop:  # first, so a signal during start-up still stops cleanly
            # set_cuda_visible_devices=False: each rank picks cuda:LOCAL_RANK itself (parallel/dims.py).
            dist = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
            import megatrain
            from megatrain.train import train

            cfg = load_config(self.config, self.overrides)
            resume = RunDir(cfg.run.dir).has_checkpoint()
            print(f"megatrain from {Path(megatrain.__file__).parent}: rank {dist.rank} of {dist.world_size}, "
                  f"master {dist.master_addr}:{dist.master_port}, restart "
                  f"{os.environ.get('SLURM_RESTART_COUNT', 0)}, {'resuming' if resume else 'starting'}", flush=True)
            try:
                summary = train(cfg, resume=resume, stop=stop)
            except RuntimeError as error:
                exit_if_rank_lost(cfg.run.dir, dist.rank, dist.world_size, error,
                                  before_exit=functools.partial(requeue_after_lost_rank, dist.rank))
                raise
        if "stopped_at" not in summary:
            return summary
        if dist.rank == 0:
            state = _job_state(submitit.JobEnvironment().job_id)
            if summary["signal"] == "SIGTERM" and state not in ("RUNNING", None):
                # scancel and the hard time limit send SIGTERM too, to a job SLURM is already ending
                # (COMPLETING); `scontrol requeue` would revive a cancelled job.
                print(f"job {state.lower()}: checkpoint at step {summary['stopped_at']}, not requeued", flush=True)
                sys.exit(128 + signal.SIGTERM)
            print(f"stopped by {summary['signal']} at step {summary['stopped_at']}; requeueing", flush=True)
            submitit_requeue(signal.SIGUSR2, None)  # exits this process once the job is requeued
        # The other ranks wait for the requeue to end them: a task that exits early can make srun
        # (KillOnBadExit) kill rank 0 before it has requeued the job.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(60)
        raise RuntimeError("rank 0 did not requeue the job within 60 s; see its log")


def requeue_after_lost_rank(rank: int) -> None:
    """`scontrol requeue` of this job after a peer died or hangs (heartbeat.py); the requeued job
    resumes from the latest checkpoint. Every survivor asks: SLURM takes the first, and its
    MaxBatchRequeue (5 by default) caps a loop of failing attempts."""
    job = submitit.JobEnvironment().job_id
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    print(f"rank {rank}: scontrol requeue {job}: {(done.stderr or 'requeued').strip()}", file=sys.stderr, flush=True)


KILLED_BY = {128 + s: s.name for s in (signal.SIGABRT, signal.SIGBUS, signal.SIGKILL, signal.SIGSEGV)}
"""srun's exit status when a task ended by one of these signals (srun(1): 128 + the signal): a rank that
crashed or was killed, not one that stopped on purpose (exit 2 for bad input, 143 for a job SLURM
is ending)."""


def after_step(step_status: int, job_id: str) -> int:
    """The batch script's last step (submitit's teardown), after srun returned `step_status`.

    If a task was killed by a signal and the job is still RUNNING, no rank requeued it (a requeue or
    a cancel has changed its state by then): `scontrol requeue`, and the requeued job resumes from
    the latest checkpoint. SLURM's MaxBatchRequeue (5 by default) caps a loop of crashing attempts.
    Returns the step's status, for the batch script to exit with.
    """
    if step_status in KILLED_BY and _job_state(job_id) == "RUNNING":
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        print(f"the job step ended by {KILLED_BY[step_status]} (srun exit status {step_status}) and no rank "
              f"requeued the job: scontrol requeue {job_id}: {(done.stderr or 'requeued').strip()}",
              file=sys.stderr, flush=True)
    return step_status


def _job_state(job_id: str) -> str | None:
    """SLURM's JobState of a job (COMPLETING while scancel ends it), None where scontrol cannot tell."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    return next((f.split("=", 1)[1] for f in out.stdout.split() if f.startswith("JobState=")), None)


# ----------------------------------------------------------------------------- checks before submitting

def parse_sweeps(sweeps: list[str]) -> list[tuple[str, list[str]]]:
    """`KEY=v1,v2` strings to (key, values); several sweeps make their cross product."""
    out = []
    for sweep in sweeps:
        key, sep, values = sweep.partition("=")
        key = key.removeprefix("--")
        if not sep or not key or not values or "" in values.split(","):
            raise ConfigError(f"--sweep {sweep!r}: expected KEY=v1,v2,... such as optim.lr=1e-3,3e-3")
        out.append((key, values.split(",")))
    return out


def plan_runs(config: str, overrides: list[str], sweeps: list[str]) -> list[tuple[list[str], Config]]:
    """The runs to submit: (overrides, resolved config) each, with an absolute run.dir.

    One run without sweeps; with `--sweep KEY=v1,v2` one run per value, in `<run.dir>/KEY=v`.
    """
    base = load_config(config, overrides)
    root = Path(base.run.dir).resolve()
    grid = parse_sweeps(sweeps)
    runs = []
    for values in itertools.product(*(vs for _, vs in grid)) if grid else [()]:
        pairs = [(key, value) for (key, _), value in zip(grid, values)]
        run_dir = root.joinpath(",".join(f"{k}={v}" for k, v in pairs)) if pairs else root
        run_overrides = [*overrides, *(f"--{k}={v}" for k, v in pairs), f"--run.dir={run_dir}"]
        runs.append((run_overrides, load_config(config, run_overrides)))
    return runs


def check_run_folder(cfg: Config) -> None:
    """Refuse a run folder that another config wrote, or one whose run has finished.

    The same config, up to what megatrain/resume_policy.py lets a resume change, continues the run from
    its latest checkpoint (whose own config and layout preflight then checks).
    """
    run = RunDir(cfg.run.dir)
    if run.config.is_file():
        _check_same_config(cfg, run.config)
    if (run.done_step() or 0) >= cfg.train.steps:
        raise ConfigError(f"{run.root} holds a finished run (DONE at step {cfg.train.steps}); raise train.steps to "
                          "continue it, or set --run.dir to a new folder (nothing was submitted)")


def _check_same_config(cfg: Config, saved_path: Path) -> None:
    changes = config_changes(yaml.safe_load(saved_path.read_text()) or {}, cfg, f" (in {saved_path})")
    refuse(changes, f"{saved_path.parent} belongs to another config", "folder",
           "submit that config to continue it, or set --run.dir to a new folder (nothing was submitted)", ConfigError)


def partitions() -> tuple[list[str], str | None]:
    """The cluster's partitions and its default one, from sinfo."""
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True)
    if out.returncode != 0:
        raise MegatrainError(f"sinfo failed ({(out.stderr.strip().splitlines() or ['no output'])[-1]}); "
                             "is the SLURM controller reachable from here?")
    names = out.stdout.split()
    default = next((n.rstrip("*") for n in names if n.endswith("*")), None)
    return sorted({n.rstrip("*") for n in names}), default


def check_cluster(res: Resources) -> None:
    """sbatch on the PATH, and the partition asked for exists."""
    if not shutil.which("sbatch"):
        raise MegatrainError("no sbatch on the PATH: submit from a SLURM login node (or load its module); "
                             "--dry-run prints the script without SLURM")
    names, default = partitions()
    if res.partition and res.partition not in names:
        raise ConfigError(f"partition {res.partition!r} does not exist on this cluster; its partitions: "
                          f"{', '.join(names) or 'none'}")
    if not res.partition and default is None:
        raise ConfigError(f"this cluster has no default partition; pass --partition (one of {', '.join(names)})")


def preflight_runs(runs: list[tuple[list[str], Config]], res: Resources) -> None:
    """The trainer's own checks for `res.world_size` ranks, plus the run folder's, for every run."""
    from megatrain.config import batch_plan
    from megatrain.parallel.dims import ParallelDims
    from megatrain.train import preflight

    for _, cfg in runs:
        try:  # the checks that depend on the world size, named by the flags that set it
            batch_plan(cfg, ParallelDims(res.world_size, cfg.parallel.tp_degree, cfg.parallel.ep_degree))
        except ConfigError as e:
            raise ConfigError(f"--nodes {res.nodes} x {res.ranks_per_node} tasks per node = {res.world_size} "
                              f"ranks does not fit the config: {e}") from None
        check_run_folder(cfg)  # before preflight: "another config" says more than its checkpoint's shape
        preflight(cfg, res.world_size, resume=RunDir(cfg.run.dir).has_checkpoint())


# ----------------------------------------------------------------------------- submitting

def sbatch_script(res: Resources, folder: Path, job_name: str, array_size: int | None) -> str:
    """The sbatch script submitit writes for these resources (what --dry-run prints)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([sys.executable, "-u -m submitit.core._submit", str(folder)])
    return _make_sbatch_string(command=command, folder=str(folder), map_count=array_size,
                               **res.sbatch_parameters(job_name))


def _record(run_dir: Path, job: submitit.Job, res: Resources) -> None:
    path = RunDir(run_dir).slurm_record
    record = json.loads(path.read_text()) if path.is_file() else {"jobs": []}
    record["jobs"].append({"job_id": job.job_id, "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "nodes": res.nodes, "tasks_per_node": res.ranks_per_node,
                           "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)})
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


def submit(config: str, overrides: list[str], res: Resources, sweeps: list[str] = (),
           dry_run: bool = False, out=sys.stdout) -> list[submitit.Job]:
    """Check everything, then submit one job (or one job array for sweeps) through submitit.

    Returns:
        The submitted jobs (one per run), or [] for a dry run.
    """
    runs = plan_runs(config, overrides, list(sweeps))
    preflight_runs(runs, res)
    root = Path(load_config(config, overrides).run.dir).resolve()
    folder = RunDir(root).slurm_folder
    job_name = f"megatrain-{root.name}"
    array_size = len(runs) if len(runs) > 1 else None
    if dry_run:
        print(sbatch_script(res, folder, job_name, array_size), file=out)
        for run_overrides, cfg in runs:
            print(f"# run {cfg.run.dir}: megatrain train {config} {' '.join(run_overrides)} --auto-resume", file=out)
        return []
    check_cluster(res)
    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(**res.sbatch_parameters(job_name))
    config = str(Path(config).resolve())
    if array_size:
        with executor.batch():
            jobs = [executor.submit(SlurmTrain(config, run_overrides)) for run_overrides, _ in runs]
    else:
        jobs = [executor.submit(SlurmTrain(config, runs[0][0]))]
    for job, (_, cfg) in zip(jobs, runs):
        _record(Path(cfg.run.dir), job, res)
    what = f"job array {jobs[0].job_id.split('_')[0]} ({len(jobs)} runs)" if array_size else f"job {jobs[0].job_id}"
    print(f"submitted {what}: {res.nodes} node(s) x {res.ranks_per_node} task(s)", file=out)
    for job, (_, cfg) in zip(jobs, runs):
        print(f"  {job.job_id}  {cfg.run.dir}\n    log:    {job.paths.stdout}\n    errors: {job.paths.stderr}\n"
              f"    follow: tail -f {job.paths.stdout}   |   megatrain status {cfg.run.dir}", file=out)
    return jobs


if __name__ == "__main__":
    if sys.argv[1:2] != ["after-step"] or len(sys.argv) != 4:
        sys.exit("usage: python -m megatrain.launch.slurm after-step STEP_STATUS JOB_ID")
    sys.exit(after_step(int(sys.argv[2]), sys.argv[3]))
