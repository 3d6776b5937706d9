"""The process world and how it is split: who am I, how many are we, which ranks share what.

`ParallelDims` splits the world into data-parallel (dp) x tensor-parallel (tp) ranks, in DeepSpeed
0.19.8's layout: a TP group is `tp` contiguous ranks, a DP group the ranks `tp` apart
(deepspeed/utils/groups.py `_init_tp_mesh_device`). `BatchPlan` is the one place batch arithmetic
is done; config validation, the loader, the DeepSpeed JSON and the metrics all read it.

Every launcher (megatrain's own `--nproc`, torchrun, the deepspeed launcher, SLURM through
launch/) ends in the same place: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the
environment. A plain `python -m megatrain ...` with none of them set is a world of one.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import socket
import warnings
from dataclasses import dataclass

import torch

from megatrain.errors import ConfigError
from megatrain.heartbeat import nccl_fault_env
from megatrain.parallel import host

# DeepSpeed 0.19.8 calls these deprecated torch collectives itself (ZeRO-3: at every gather and reduce, and
# the warning registry is reset whenever a filter changes, so it came back hundreds of times a run); the
# warning is not the user's to act on.
warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor). is deprecated",
                        category=FutureWarning)

# DeepSpeed picks its accelerator at import; say which one so it does not guess (and warn) on CPU.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class ParallelDims:
    """How many ranks hold each slice: world_size = dp x tp. Expert parallelism borrows from dp: groups
    of `ep` consecutive data-parallel ranks split the experts (DeepSpeed's _create_expert_and_data_parallel)."""

    world_size: int
    tp: int = 1
    ep: int = 1

    def __post_init__(self):
        if self.world_size < 1:
            raise ConfigError(f"world size {self.world_size}: need at least one rank")
        if self.tp < 1 or self.world_size % self.tp:
            raise ConfigError(f"parallel.tp_degree={self.tp} does not divide the world size {self.world_size}; "
                              f"use a tp_degree that divides {self.world_size}, or start a multiple of "
                              f"{self.tp} ranks")
        if self.ep < 1 or self.dp % self.ep:
            raise ConfigError(f"parallel.ep_degree={self.ep} does not divide the {self.dp} data-parallel ranks; "
                              f"use an ep_degree that divides {self.dp}, or start a multiple of {self.ep} ranks")

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    def dp_rank(self, rank: int) -> int:
        """The data-parallel rank: every rank of one TP group reads the same batches."""
        return rank // self.tp

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def ep_rank(self, rank: int) -> int:
        """Which slice of the experts a rank holds: experts [ep_rank * E/ep, (ep_rank + 1) * E/ep)."""
        return self.dp_rank(rank) % self.ep


@dataclass(frozen=True)
class BatchPlan:
    """global batch = micro batch x accumulation x data-parallel ranks (gpt-neox's check_batch_parameters)."""

    micro_batch_size: int
    accumulation: int
    dp: int

    @classmethod
    def of(cls, micro_batch_size: int, global_batch_size: int, dp: int) -> BatchPlan:
        """From train.micro_batch_size and train.global_batch_size (0: one micro batch per DP rank)."""
        per_step = micro_batch_size * dp
        global_batch = global_batch_size or per_step
        if global_batch % per_step:
            raise ConfigError(
                f"train.global_batch_size={global_batch} does not divide by train.micro_batch_size="
                f"{micro_batch_size} x {dp} data-parallel ranks = {per_step}; "
                f"set train.global_batch_size to a multiple of {per_step}")
        return cls(micro_batch_size, global_batch // per_step, dp)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulation * self.dp


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    device_type: str
    tp: int = 1
    """Tensor-parallel degree: ranks [k*tp, (k+1)*tp) form one TP group."""
    ep: int = 1
    """Expert-parallel degree (ParallelDims.ep)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dims(self) -> ParallelDims:
        return ParallelDims(self.world_size, self.tp, self.ep)

    @property
    def dp_rank(self) -> int:
        return self.dims.dp_rank(self.rank)

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def tp_rank(self) -> int:
        return self.dims.tp_rank(self.rank)

    @property
    def model_group(self) -> tuple[int, int, bool]:
        """(index, count, leads) of the groups of ranks that hold one whole model between them (a TP
        group, or an EP group): each such group must run the same inputs in lockstep, e.g. when
        generating, where ranks stop after different numbers of tokens; `leads` on one rank each."""
        d = self.dims
        return self.dp_rank // d.ep, d.dp // d.ep, self.tp_rank == 0 and d.ep_rank(self.rank) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_world(tp: int = 1, ep: int = 1, timeout_s: float = 600) -> World:
    """Join (or, alone, create) the default process group through DeepSpeed's comm layer, and with
    tp > 1 the tensor- and data-parallel groups (DeepSpeed's `groups`, which the engine then uses).

    gloo on CPU (DeepSpeed's CPU accelerator would ask for oneCCL, which is not installed), NCCL
    on GPUs. timeout_s: how long a collective waits for a rank that stopped answering before it
    fails (parallel.collective_timeout_s; DeepSpeed's default is 30 minutes).
    """
    import deepspeed

    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    dev = device_type()
    # Read when the NCCL groups are made: a failed collective must raise in Python (then
    # heartbeat.exit_if_rank_lost names the rank, exit 3, a requeue), not end the rank by SIGABRT.
    os.environ.update(nccl_fault_env(os.environ))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dev == "cuda":
        torch.cuda.set_device(local_rank)
    # DeepSpeed makes its data-, expert- and tensor-parallel groups later with new_group(), which takes
    # torch's module default (30 minutes), not the world's timeout: make that the default too.
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = \
        datetime.timedelta(seconds=timeout_s)
    if not torch.distributed.is_initialized():
        # DeepSpeed prints "DeepSpeed ...shm_comm_op built successfully" here on every rank; the run's
        # first line is megatrain's own (which precision, and why).
        with contextlib.redirect_stdout(io.StringIO()):
            deepspeed.init_distributed(dist_backend="nccl" if dev == "cuda" else "gloo", verbose=False,
                                       timeout=datetime.timedelta(seconds=timeout_s))
    host.setup(timeout_s)
    dims = ParallelDims(torch.distributed.get_world_size(), tp, ep)  # against the world really started
    world = World(rank=torch.distributed.get_rank(), local_rank=local_rank, world_size=dims.world_size,
                  device_type=dev, tp=tp, ep=ep)
    if tp > 1:
        tensor_parallel_groups(tp)
    return world


def tensor_parallel_groups(tp: int):
    """DeepSpeed's `groups` module with its TP/DP mesh made: passed to deepspeed.initialize as the mpu.

    Made before the engine so that DeepSpeed reads the data-parallel size (not the world size) in
    every batch check; the engine reuses the mesh it finds (a second call is a no-op).
    """
    from deepspeed.utils import groups

    groups._init_tp_mesh_device(tensor_model_parallel_size=tp)
    return groups


def shutdown() -> None:
    """Leave the process group cleanly, so no rank exits while another still talks to it."""
    if torch.distributed.is_initialized():
        host.barrier()
        torch.distributed.destroy_process_group()
