"""Host-side collectives work where the default group is NCCL's, which carries CUDA tensors only.

A CPU machine has no NCCL, but `init_process_group("cuda:gloo")` makes a default group that, like
NCCL's, refuses CPU tensors ("No backend type associated with device type cpu"): the helpers in
megatrain/parallel/host.py must not depend on the default group taking them.
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatrain.parallel.dims import free_port

REPO = Path(__file__).resolve().parents[1]


def _rank(rank: int, world: int, port: int, out: str) -> None:
    from megatrain.parallel import host

    dist.init_process_group("cuda:gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        try:  # the emulation holds: the default group refuses a host tensor, as NCCL's does
            dist.all_reduce(torch.ones(1))
            refused = ""
        except RuntimeError as e:
            refused = str(e).splitlines()[0]
        host.setup(timeout_s=60)
        result = {
            "refused": refused,
            "sum": host.all_reduce_sum([1.0, float(rank), 2.5]),
            "objects": host.all_gather_object({"rank": rank, "name": f"r{rank}"}),
            "gathered": host.gather_object([rank] * (rank + 1)),
        }
        host.barrier()
        Path(out, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_host_collectives_run_beside_a_default_group_that_refuses_host_tensors(tmp_path):
    mp.spawn(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for rank, got in enumerate(results):
        assert "No backend type associated with device type cpu" in got["refused"]
        assert got["sum"] == [2.0, 1.0, 5.0]
        assert got["objects"] == [{"rank": 0, "name": "r0"}, {"rank": 1, "name": "r1"}]
    assert results[0]["gathered"] == [[0], [1, 1]] and results[1]["gathered"] is None


# A collective called on the torch.distributed module (dist.all_reduce(...), torch.distributed.barrier(),
# ...). DeepSpeed's own device collectives live inside DeepSpeed and are not matched.
COLLECTIVE = re.compile(r"\b(?:dist|torch\.distributed)\.(all_reduce|all_gather\w*|gather\w*|broadcast\w*|reduce\w*|"
                        r"scatter\w*|barrier|all_to_all\w*|send|recv|monitored_barrier)\(")


@pytest.mark.parametrize("folder", ["megatrain", "data_tools", "bench"])
def test_no_module_but_host_issues_a_collective_itself(folder):
    """Everything host-side goes through megatrain/parallel/host.py (a gloo group beside NCCL)."""
    found = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
             for path in sorted((REPO / folder).rglob("*.py")) if path != REPO / "megatrain/parallel/host.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if COLLECTIVE.search(line)]
    assert not found, "collectives outside megatrain/parallel/host.py:\n" + "\n".join(found)
