"""Collectives over host values: votes, counts, small Python objects. The one module that issues them.

NCCL carries CUDA tensors only: on a GPU world the default group refuses a CPU tensor ("No backend
type associated with device type cpu"), and `all_gather_object` there pickles through the current
CUDA device. So host-side agreement runs on a gloo group made beside the device group, as
Megatron-LM keeps one for its CPU work (`get_data_parallel_group_gloo`). On a CPU world, whose
default group is gloo already, that group is the default group itself.

Every rank calls each of these in the same order (they are collectives); without a process group,
or in a world of one, they return the rank's own value.

Emulated on CPU by a world started as `init_process_group("cuda:gloo")`, whose default group refuses
CPU tensors in NCCL's words (tests/test_host_collectives.py).
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

_group = None
"""The gloo group for host values; None: the default group (a gloo world)."""


def setup(timeout_s: float) -> None:
    """Make the host group once the default group exists (init_world calls it on every rank).

    A collective on it waits at most timeout_s for a rank that stopped answering
    (parallel.collective_timeout_s), as the device groups do.
    """
    global _group
    _group = None
    if dist.get_backend() != "gloo":  # nccl, or a per-device mix such as "cpu:gloo,cuda:nccl"
        _group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few Python numbers over all ranks (float64, so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64)
    if _world() > 1:
        dist.all_reduce(t, group=_group)
    return t.tolist()


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if _world() == 1:
        return [obj]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, obj, group=_group)
    return everyone


def gather_object(obj) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 (None on the others): for what only rank 0 writes,
    such as experts held on other ranks. Tensors inside travel pickled: keep them on the host."""
    if _world() == 1:
        return [obj]
    everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, everyone, dst=0, group=_group)
    return everyone


def barrier() -> None:
    if _world() > 1:
        dist.barrier(group=_group)
