"""The process world: who am I, how many are we, and the process group between us.

Every launcher (megatrain's own `--nproc`, torchrun, the deepspeed launcher, SLURM through
launch/) ends in the same place: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the
environment. A plain `python -m megatrain ...` with none of them set is a world of one.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import warnings
from dataclasses import dataclass

import torch

# DeepSpeed 0.19.8 calls this deprecated torch collective itself; the warning is not the user's to act on.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor. is deprecated", category=FutureWarning)

# DeepSpeed picks its accelerator at import; say which one so it does not guess (and warn) on CPU.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    device_type: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_world() -> World:
    """Join (or, alone, create) the default process group through DeepSpeed's comm layer.

    gloo on CPU (DeepSpeed's CPU accelerator would ask for oneCCL, which is not installed), NCCL
    on GPUs.
    """
    import deepspeed

    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    dev = device_type()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dev == "cuda":
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        # DeepSpeed prints "DeepSpeed ...shm_comm_op built successfully" here on every rank; the run's
        # first line is megatrain's own (which precision, and why).
        with contextlib.redirect_stdout(io.StringIO()):
            deepspeed.init_distributed(dist_backend="nccl" if dev == "cuda" else "gloo", verbose=False)
    return World(rank=torch.distributed.get_rank(), local_rank=local_rank,
                 world_size=torch.distributed.get_world_size(), device_type=dev)


def shutdown() -> None:
    """Leave the process group cleanly, so no rank exits while another still talks to it."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few Python numbers over all ranks (float64, so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()
