"""Rank environment from the scheduler, for launchers that do not export torch's variables.

torchrun, the deepspeed launcher's pdsh path and megatrain's own `--nproc` set RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Two ways of starting ranks do not:
- `srun` (SLURM, and `deepspeed --launcher slurm`, which is srun underneath): SLURM_PROCID,
  SLURM_LOCALID, SLURM_STEP_NUM_TASKS and the node list;
- `mpirun` (`deepspeed --launcher openmpi`): OMPI_COMM_WORLD_{RANK,LOCAL_RANK,SIZE}.
This module maps those onto torch's names, so the trainer keeps one path for every launcher.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping

from megatrain.errors import MegatrainError

TORCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a SLURM node list such as `node[01-02],gpu7`.

    Asks `scontrol show hostnames` (SLURM's own parser) where it is installed; elsewhere, e.g. on a
    login host without SLURM, submitit's parser of the same syntax.
    """
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()
    from submitit.slurm.slurm import _parse_node_list

    return _parse_node_list(nodelist)


def master_port_for_job(job_id: str) -> int:
    """A port every task of a job derives alike (20000-59999), as submitit's TorchDistributedEnvironment.

    A requeued job keeps its id, hence its port; two jobs sharing a node rarely collide.
    """
    digits = "".join(c for c in job_id if c.isdigit()) or "0"
    return 20000 + int(digits) % 40000


def rank_env(environ: Mapping[str, str]) -> dict[str, str]:
    """torch's rank variables derived from a launcher's environment; empty when nothing applies.

    Variables already present in `environ` win (MASTER_ADDR/MASTER_PORT given by the user or the
    launcher), so this only fills in what is missing.

    Raises:
        MegatrainError: an MPI world without MASTER_ADDR (mpirun does not provide one).
    """
    if "WORLD_SIZE" in environ:
        return {}
    if "SLURM_STEP_NUM_TASKS" in environ and "SLURM_PROCID" in environ:
        # Inside an srun step. The batch script itself also has SLURM_PROCID=0, but no step task
        # count: there `megatrain train --nproc` is the way to start ranks.
        world = int(environ["SLURM_STEP_NUM_TASKS"])
        nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
        num_nodes = int(environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_NNODES") or 1)
        env = {"RANK": environ["SLURM_PROCID"], "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
               "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world // max(1, num_nodes)),
               "MASTER_ADDR": environ.get("MASTER_ADDR") or expand_nodelist(nodes)[0],
               "MASTER_PORT": environ.get("MASTER_PORT") or str(master_port_for_job(environ.get("SLURM_JOB_ID", "0")))}
        return env
    if "OMPI_COMM_WORLD_SIZE" in environ:
        if "MASTER_ADDR" not in environ:
            raise MegatrainError("started by mpirun without MASTER_ADDR; pass --master_addr HOST to the deepspeed "
                                 "launcher, or -x MASTER_ADDR=HOST -x MASTER_PORT=PORT to mpirun")
        return {"RANK": environ["OMPI_COMM_WORLD_RANK"], "LOCAL_RANK": environ["OMPI_COMM_WORLD_LOCAL_RANK"],
                "WORLD_SIZE": environ["OMPI_COMM_WORLD_SIZE"],
                "LOCAL_WORLD_SIZE": environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", environ["OMPI_COMM_WORLD_SIZE"]),
                "MASTER_ADDR": environ["MASTER_ADDR"], "MASTER_PORT": environ.get("MASTER_PORT", "29500")}
    return {}


def export_rank_env() -> int:
    """Fill os.environ with rank_env(os.environ); returns the world size (1 without a launcher)."""
    os.environ.update(rank_env(os.environ))
    return int(os.environ.get("WORLD_SIZE", 1))
