"""`megatrain submit` against a real single-node SLURM cluster (launch/slurm_cluster_start.sh), real
submitit and real 2-rank DeepSpeed engines on gloo; plus the checks that need no cluster.

The cluster is started once per session where that is possible (root; packages installed or the
Debian registry reachable) and stopped afterwards if this session started it. Elsewhere the
cluster tests skip with the reason.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SMOKE, losses, run_megatrain
from test_bad_input import assert_one_clear_line, tree_digest

CLUSTER_DIR = Path(os.environ.get("MEGATRAIN_SLURM_DIR", "/tmp/megatrain-slurm"))
# Jobs inherit the submitting environment (sbatch --export=ALL): this makes them import this checkout.
JOB_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def _daemon_running(name: str) -> bool:
    pid = (CLUSTER_DIR / "run" / f"{name}.pid")
    try:
        return Path(f"/proc/{pid.read_text().strip()}/comm").read_text().strip() == name
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node cluster with accounting; its default partition is `debug`."""
    if os.geteuid() != 0:
        pytest.skip("starting a SLURM cluster needs root (it installs packages and runs slurmctld/slurmd)")
    started_here = not _daemon_running("slurmctld")
    start = subprocess.run(["bash", str(REPO / "launch" / "slurm_cluster_start.sh")], capture_output=True, text=True,
                           timeout=600)
    if start.returncode != 0:
        lines = (start.stderr.strip() or start.stdout.strip() or "no output").splitlines()
        pytest.skip(f"could not start a SLURM cluster here: {lines[-1]}")
    yield
    if started_here:
        subprocess.run(["bash", str(REPO / "launch" / "slurm_cluster_stop.sh"), "--purge"], capture_output=True,
                       timeout=300)


def submit(run_dir: Path, dm_data, *args: str, **kw) -> subprocess.CompletedProcess:
    return run_megatrain("submit", SMOKE, f"--run.dir={run_dir}", f"--data.shards={dm_data['shards']}",
                         f"--eval.released={dm_data['released']}", *args, env=kw.pop("env", JOB_ENV), **kw)


def job_id(run_dir: Path) -> str:
    return json.loads((run_dir / "slurm.json").read_text())["jobs"][-1]["job_id"]


def status(run_dir: Path) -> dict:
    result = run_megatrain("status", run_dir, "--json", env=JOB_ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def sacct_history(job: str) -> list[str]:
    """Every state the job has been in, requeues included (sacct -D lists each attempt)."""
    out = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-o", "State", "-j", job], capture_output=True, text=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def wait_for(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def wait_done(run_dir: Path, timeout: float = 240) -> dict:
    """Until the run has DONE and SLURM says COMPLETED; returns its status."""
    job = job_id(run_dir)
    wait_for(lambda: (run_dir / "DONE").is_file() and sacct_history(job)[-1:] == ["COMPLETED"], timeout,
             f"job {job} to complete ({run_dir / 'slurm'})")
    return status(run_dir)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- on the cluster

def test_two_task_job_trains_like_local_ranks(slurm_cluster, dm_data, reference_run, tmp_path, deepspeed_ops):
    run = tmp_path / "run"
    result = submit(run, dm_data, "--tasks-per-node", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    job = job_id(run)
    assert f"submitted job {job}" in result.stdout and f"megatrain status {run}" in result.stdout
    final = wait_done(run)
    assert final["state"] == "done" and final["step"] == 8 and final["restarts"] == 0
    assert final["jobs"][0]["state"] == "COMPLETED"
    log = (run / "slurm" / f"{job}_0_log.out").read_text()
    assert f"megatrain from {REPO / 'megatrain'}: rank 0 of 2" in log  # this checkout, two ranks
    # Two SLURM tasks are the same two gloo ranks as `--nproc 2`: the same losses, step for step.
    assert losses(run) == losses(reference_run)
    assert losses(run)[8] < losses(run)[1]


def test_preemption_checkpoints_requeues_and_resumes(slurm_cluster, dm_data, tmp_path, deepspeed_ops):
    import submitit

    run = tmp_path / "run"
    interval = 50
    # 200 steps take ~12 s on an idle 2-core machine: the signal lands mid-run, not after the end.
    result = submit(run, dm_data, "--tasks-per-node", "2", "--train.steps=200", f"--checkpoint.interval={interval}")
    assert result.returncode == 0, result.stderr[-3000:]
    job = job_id(run)
    wait_for(lambda: steps_logged(run) >= 3, 120, "the first steps", poll=0.2)
    submitit.SlurmJob(run / "slurm", job, tasks=[0, 1])._interrupt()  # SIGTERM + USR2, as a preemption
    final = wait_done(run)
    assert "REQUEUED" in sacct_history(job)
    assert final["step"] == 200 and final["restarts"] == 1
    steps = [(r["step"], r["restarts"]) for r in records(run)]
    before = [s for s, restarts in steps if restarts == 0]
    after = [s for s, restarts in steps if restarts == 1]
    assert before == list(range(1, len(before) + 1)) and after[-1] == 200
    # The stop wrote a checkpoint at its own step, so at most one interval is trained twice (here: none).
    repeated = before[-1] - (after[0] - 1)
    assert 0 <= repeated <= interval, steps
    assert after == list(range(after[0], 201))
    assert records(run)[-1]["loss"] < records(run)[0]["loss"]


def test_a_dead_rank_requeues_the_job_and_it_resumes(slurm_cluster, dm_data, tmp_path, deepspeed_ops):
    """SIGKILL of one task (not the job): the other fails its next collective, names rank 1, requeues
    the job, and the requeued job resumes from the latest checkpoint to the end."""
    import psutil

    run = tmp_path / "run"
    result = submit(run, dm_data, "--tasks-per-node", "2", "--train.steps=300", "--checkpoint.interval=50",
                    "--parallel.collective_timeout_s=10")
    assert result.returncode == 0, result.stderr[-3000:]
    job = job_id(run)
    wait_for(lambda: steps_logged(run) >= 80, 120, "80 steps", poll=0.1)

    def rank1():
        for p in psutil.process_iter(["environ", "cmdline"]):
            env = p.info["environ"] or {}
            if env.get("SLURM_JOB_ID") == job and env.get("SLURM_PROCID") == "1" and "submitit" in " ".join(
                    p.info["cmdline"] or []):
                return p
    wait_for(rank1, 30, "rank 1's process", poll=0.2).kill()
    killed = time.monotonic()
    err = run / "slurm" / f"{job}_0_log.err"
    wait_for(lambda: err.is_file() and "scontrol requeue" in err.read_text(), 120, "the requeue", poll=0.1)
    print(f"rank 1 killed -> job requeued: {time.monotonic() - killed:.1f} s")
    final = wait_done(run, timeout=300)
    assert "REQUEUED" in sacct_history(job)
    assert final["step"] == 300 and final["restarts"] == 1
    log = err.read_text()
    assert "rank 1 (" in log and "stopped answering" in log and f"scontrol requeue {job}" in log
    restarted = [r for r in records(run) if r["restarts"] == 1]
    assert restarted[0]["step"] in (51, 101)  # from the last checkpoint before the kill


def test_a_job_whose_every_task_is_killed_is_requeued_by_its_batch_script(slurm_cluster, tmp_path):
    """No rank is left to requeue when every task dies by a signal: the teardown line `megatrain submit`
    puts after srun reads srun's exit status (137) and requeues the job; its next attempt runs. A job
    of plain tasks, so the test is about the batch script, not about training (the resume after a requeue
    is the test above's)."""
    from megatrain.launch.slurm import Resources

    teardown = Resources(tasks_per_node=2).sbatch_parameters("killed")["teardown"]
    script = tmp_path / "job.sh"
    script.write_text("\n".join([
        "#!/bin/bash", "#SBATCH --ntasks=2", f"#SBATCH --output={tmp_path}/%j.out", f"#SBATCH --error={tmp_path}/%j.err",
        "#SBATCH --open-mode=append",
        # The first attempt's tasks are killed; the requeued attempt's (SLURM_RESTART_COUNT=1) finish.
        """if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then srun bash -c 'kill -KILL $$'; else srun true; fi""",
        *teardown, ""]))
    submitted = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=JOB_ENV,
                               cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    wait_for(lambda: sacct_history(job)[-1:] == ["COMPLETED"], 180, f"job {job} to complete after its requeue")
    assert "REQUEUED" in sacct_history(job)
    log = (tmp_path / f"{job}.err").read_text()
    assert (f"the job step ended by SIGKILL (srun exit status 137) and no rank requeued the job: "
            f"scontrol requeue {job}: requeued") in log, log[-3000:]


@pytest.mark.parametrize("num_workers", [2])  # 1 worker takes the same path
def test_sigterm_with_dataloader_workers_requeues_and_resumes(slurm_cluster, dm_data, tmp_path, deepspeed_ops,
                                                               num_workers):
    """`scancel --signal=TERM`: SLURM signals every process of the step, DataLoader workers included
    (as on preemption, a node drain or the hard limit). The workers must outlive it, the ranks
    checkpoint at the step boundary, and the job requeues and finishes."""
    run = tmp_path / "run"
    interval = 50
    result = submit(run, dm_data, "--tasks-per-node", "2", "--train.steps=300", f"--checkpoint.interval={interval}",
                    f"--data.num_workers={num_workers}", "--eval.final_limit=0")
    assert result.returncode == 0, result.stderr[-3000:]
    job = job_id(run)
    wait_for(lambda: steps_logged(run) >= 3, 120, "the first steps", poll=0.2)
    subprocess.run(["scancel", "--signal=TERM", job], check=True, capture_output=True)
    final = wait_done(run, timeout=300)
    history = sacct_history(job)
    assert "REQUEUED" in history and history[-1] == "COMPLETED" and "FAILED" not in history, history
    assert final["step"] == 300 and final["restarts"] == 1
    steps = [(r["step"], r["restarts"]) for r in records(run)]
    before = [s for s, restarts in steps if restarts == 0]
    after = [s for s, restarts in steps if restarts == 1]
    repeated = before[-1] - (after[0] - 1)
    assert 0 <= repeated <= interval, steps
    assert after == list(range(after[0], 301))
    log = (run / "slurm" / f"{job}_0_log.err").read_text() + (run / "slurm" / f"{job}_1_log.err").read_text()
    assert "DataLoader worker" not in log


def test_time_limit_requeues_and_resumes(slurm_cluster, dm_data, tmp_path, deepspeed_ops):
    # slurmctld checks time limits every 30 s and sends the --signal warning at the first check where
    # the limit is at most `signal-delay + 30` s away, to the job's running steps only. With --time 1
    # and a 40 s warning that is the very first check, which can come before srun has started the
    # tasks, and then no task gets it (CI saw the job run to its end). --time 2 puts the warning 50-80 s
    # into the job; no machine trains a million steps by then. The resumed attempt is cancelled once it
    # has trained: what matters is that it continues right after the step the warning stopped.
    run = tmp_path / "run"
    result = submit(run, dm_data, "--tasks-per-node", "2", "--train.steps=1000000",
                    "--checkpoint.interval=1000000", "--time", "2", "--signal-delay", "40")
    assert result.returncode == 0, result.stderr[-3000:]
    job = job_id(run)
    wait_for(lambda: "REQUEUED" in sacct_history(job), 240, "the time-limit requeue")
    # As an admin would, so the resumed attempt is not warned again while the test watches it.
    subprocess.run(["scontrol", "update", f"jobid={job}", "timelimit=10"], check=True, capture_output=True)
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.read_text().count('"restarts": 1,') >= 5, 240, "the resumed attempt's steps", poll=0.2)
    subprocess.run(["scancel", job], check=True, capture_output=True)
    wait_for(lambda: status(run)["state"] == "cancelled", 60, "the CANCELLED state")
    log = (run / "slurm" / f"{job}_0_log.out").read_text()
    assert "this job is timed-out" in log, log[-3000:]
    stopped = int(re.search(r"stopped by SIGUSR2 at step (\d+); requeueing", log)[1])
    assert "restart 1, resuming" in log
    steps = [(r["step"], r["restarts"]) for r in records(run)]
    before = [s for s, restarts in steps if restarts == 0]
    after = [s for s, restarts in steps if restarts == 1]
    # The stop checkpointed its own step (the only checkpoint): nothing is trained twice or skipped.
    assert before == list(range(1, stopped + 1)), steps[-20:]
    assert after == list(range(stopped + 1, stopped + 1 + len(after))) and len(after) >= 5, after[:20]


def test_cancel_ends_the_job_without_requeue(slurm_cluster, dm_data, tmp_path, deepspeed_ops):
    import submitit

    run = tmp_path / "run"
    result = submit(run, dm_data, "--tasks-per-node", "2", "--train.steps=2000")
    assert result.returncode == 0, result.stderr[-3000:]
    job = job_id(run)
    wait_for(lambda: steps_logged(run) >= 2, 120, "the first steps", poll=0.2)
    submitit.SlurmJob(run / "slurm", job, tasks=[0, 1]).cancel()
    wait_for(lambda: status(run)["state"] == "cancelled", 60, "the CANCELLED state")
    # A requeue would show within cred_expire (10 s); the SIGTERM checkpoint's requeue must not bring it back.
    time.sleep(15)
    assert sacct_history(job) == ["CANCELLED"]
    assert not (run / "DONE").exists()
    assert status(run)["state"] == "cancelled"


def test_sweep_is_one_job_array(slurm_cluster, dm_data, tmp_path, deepspeed_ops):
    root = tmp_path / "sweep"
    result = submit(root, dm_data, "--sweep", "optim.lr=0.003,0.001")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [root / "optim.lr=0.003", root / "optim.lr=0.001"]
    ids = [job_id(run) for run in runs]
    array = ids[0].split("_")[0]
    assert ids == [f"{array}_0", f"{array}_1"] and f"job array {array} (2 runs)" in result.stdout
    finals = [wait_done(run) for run in runs]
    assert all(f["step"] == 8 and f["state"] == "done" for f in finals)
    assert finals[0]["last_loss"] != finals[1]["last_loss"]
    import yaml
    assert [yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] for run in runs] == [0.003, 0.001]


def test_unknown_partition_is_refused_before_submitting(slurm_cluster, dm_data, tmp_path):
    run = tmp_path / "run"
    result = submit(run, dm_data, "--tasks-per-node", "2", "--partition", "gpu-h100")
    assert_one_clear_line(result, "partition 'gpu-h100' does not exist", "debug")
    assert not run.exists()


# ----------------------------------------------------------------------------- no cluster needed

def test_world_size_that_does_not_fit_the_config(dm_data, tmp_path):
    result = submit(tmp_path / "run", dm_data, "--nodes", "1", "--tasks-per-node", "3")
    assert_one_clear_line(result, "--nodes 1 x 3 tasks per node = 3 ranks", "train.global_batch_size=16")
    assert not (tmp_path / "run").exists()


def test_no_sbatch_on_the_path(dm_data, tmp_path):
    env = dict(JOB_ENV, PATH=str(Path(sys.executable).parent))  # python, but no SLURM client
    result = submit(tmp_path / "run", dm_data, "--tasks-per-node", "2", env=env)
    assert_one_clear_line(result, "no sbatch on the PATH")
    assert not (tmp_path / "run").exists()


def test_run_folder_of_another_config_is_left_alone(dm_data, reference_run, tmp_path):
    before = tree_digest(reference_run)
    result = submit(reference_run, dm_data, "--tasks-per-node", "2", "--model.hidden_size=32")
    assert_one_clear_line(result, str(reference_run), "another config", "model.hidden_size")
    assert tree_digest(reference_run) == before


def test_dry_run_prints_the_sbatch_script_and_submits_nothing(dm_data, tmp_path):
    run = tmp_path / "run"
    result = submit(run, dm_data, "--nodes", "2", "--gpus-per-node", "2", "--partition", "a100", "--time", "30",
                    "--account", "math", "--dry-run", "--train.global_batch_size=32")
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2", "--partition=a100", "--time=30",
                 "--account=math", "--signal=USR2@90"):
        assert f"#SBATCH {flag}\n" in result.stdout
    assert "srun --unbuffered" in result.stdout and "submitit.core._submit" in result.stdout
    assert not run.exists()


def test_sweep_needs_values(dm_data, tmp_path):
    assert_one_clear_line(submit(tmp_path / "run", dm_data, "--sweep", "optim.lr", "--dry-run"), "--sweep")


# ----------------------------------------------------------------------------- multi-node, on a made-up node list
# Two real nodes are not available to these tests (one slurmd here); what a task on the second of
# two nodes derives is checked on the environment SLURM would give it.

TWO_NODES = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_STEP_NODELIST": "node[01-02]",
             "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
             "SLURM_STEP_ID": "0", "SLURM_GPUS_ON_NODE": "2"}


def test_rank_env_of_the_last_task_on_two_nodes():
    from megatrain.parallel.launcher_env import master_port_for_job, rank_env

    env = rank_env(TWO_NODES)
    assert env == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "node01", "MASTER_PORT": str(master_port_for_job("4242"))}
    # Every task of the job derives the same rendezvous; a launcher's own values win.
    assert rank_env({**TWO_NODES, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"})["MASTER_PORT"] == env["MASTER_PORT"]
    assert rank_env({**TWO_NODES, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"})["MASTER_ADDR"] == "10.0.0.1"
    assert rank_env({**TWO_NODES, "WORLD_SIZE": "4"}) == {}  # torchrun / deepspeed already said it
    batch_script = {k: v for k, v in TWO_NODES.items() if not k.startswith("SLURM_STEP")}
    assert rank_env(batch_script) == {}  # not inside srun: `--nproc` starts the ranks there


def test_rank_env_under_mpirun():
    from megatrain.errors import MegatrainError
    from megatrain.parallel.launcher_env import rank_env

    ompi = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_SIZE": "8",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    assert rank_env({**ompi, "MASTER_ADDR": "node01", "MASTER_PORT": "29500"}) == {
        "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "node01",
        "MASTER_PORT": "29500"}
    with pytest.raises(MegatrainError, match="MASTER_ADDR"):
        rank_env(ompi)


def test_hostfile_from_a_two_node_allocation(tmp_path):
    from megatrain.launch.hostfile import read_hostfile

    out = tmp_path / "hostfile"
    result = subprocess.run([sys.executable, "-m", "megatrain.launch.hostfile", "-o", str(out)], cwd=REPO, capture_output=True,
                            text=True, env={**JOB_ENV, **TWO_NODES})
    assert result.returncode == 0, result.stderr
    assert out.read_text() == "node01 slots=2\nnode02 slots=2\n"
    assert read_hostfile(out) == {"node01": 2, "node02": 2}
    result = subprocess.run([sys.executable, "-m", "megatrain.launch.hostfile", "--nodelist", "gpu[7,9-10]", "--slots", "8"],
                            cwd=REPO, capture_output=True, text=True, env=JOB_ENV)
    assert result.stdout == "gpu7 slots=8\ngpu9 slots=8\ngpu10 slots=8\n"


def test_nodelist_without_scontrol_matches_scontrol():
    # Where scontrol is installed, expand_nodelist asks it; submitit's parser is the fallback.
    from submitit.slurm.slurm import _parse_node_list

    from megatrain.parallel.launcher_env import expand_nodelist

    for nodelist in ("node[01-02]", "gpu[7,9-10],cpu3"):
        assert _parse_node_list(nodelist) == expand_nodelist(nodelist)


def test_srun_and_deepspeed_hostfile_inside_an_allocation(slurm_cluster, dm_data, reference_run, tmp_path,
                                                          deepspeed_ops):
    # `srun python -m megatrain train` is what `deepspeed --launcher slurm` runs on each node; the ranks
    # take their rank variables from srun (parallel/launcher_env.py). Then the deepspeed launcher with a
    # hostfile written from the allocation (one node here, so DeepSpeed starts its local ranks itself).
    data = f"--data.shards={dm_data['shards']} --eval.released={dm_data['released']}"
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
set -e
cd {REPO}
srun --kill-on-bad-exit=1 {sys.executable} -m megatrain train {SMOKE} --run.dir={tmp_path / 'srun'} {data}
{sys.executable} -m megatrain.launch.hostfile -o {tmp_path / 'hostfile'}
deepspeed --hostfile {tmp_path / 'hostfile'} --launcher slurm --no_ssh_check --master_addr "$(scontrol show hostnames \
  "$SLURM_JOB_NODELIST" | head -n1)" --module megatrain train {SMOKE} --run.dir={tmp_path / 'ds'} {data}
""")
    result = subprocess.run(["sbatch", "--wait", "--ntasks-per-node=2", "-o", str(tmp_path / "job.out"), str(script)],
                            capture_output=True, text=True, env=JOB_ENV, timeout=300)
    assert result.returncode == 0, (tmp_path / "job.out").read_text()[-3000:]
    assert (tmp_path / "hostfile").read_text() == f"{os.uname().nodename.split('.')[0]} slots=2\n"
    for run in ("srun", "ds"):
        assert (tmp_path / run / "DONE").is_file()
        assert losses(tmp_path / run) == losses(reference_run)
