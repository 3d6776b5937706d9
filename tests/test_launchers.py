"""The same job under torchrun and the deepspeed launcher: the ranks come from their environment."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import REPO, SMOKE, losses
from megatrain.parallel.dims import free_port

LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "megatrain"],
    # The multi-node form (one node here): c10d rendezvous at an endpoint, as on a SLURM allocation.
    "torchrun-c10d": [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                      "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:{port}", "--rdzv-id", "megatrain-test",
                      "-m", "megatrain"],
    # On CPU `deepspeed` counts NUMA nodes as devices; --num_gpus asks for 2 ranks explicitly.
    "deepspeed": ["deepspeed", "--num_gpus", "2", "--module", "megatrain"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_launcher_gives_the_same_run_as_nproc(launcher, dm_data, reference_run, tmp_path, deepspeed_ops):
    if launcher == "deepspeed" and not shutil.which("deepspeed"):
        pytest.skip("the deepspeed launcher script is not on PATH (pip install deepspeed puts it there)")
    port = free_port()
    cmd = [*(arg.format(port=port) for arg in LAUNCHERS[launcher]), "train", str(SMOKE), f"--run.dir={tmp_path / 'run'}",
           f"--data.shards={dm_data['shards']}", f"--eval.released={dm_data['released']}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(tmp_path / "run") == losses(reference_run)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "step_8").glob("rng_rank*")) == [
        "rng_rank0.pt", "rng_rank1.pt"]
