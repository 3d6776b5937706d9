"""A real 2-node SLURM job: `megatrain submit --nodes 2` on node1 and node2, two slurmd each in its own
network namespace on this machine (launch/slurm_netns_nodes.sh), the two gloo ranks talking over a
veth/bridge network. Skips where the cluster cannot start or `ip netns` is not permitted.
"""

from __future__ import annotations

import subprocess

import pytest

from conftest import REPO, losses
from test_slurm import CLUSTER_DIR, JOB_ENV, job_id, slurm_cluster, submit, wait_done  # noqa: F401 (fixture)

NETNS = REPO / "launch" / "slurm_netns_nodes.sh"


@pytest.fixture(scope="module")
def netns_nodes(slurm_cluster):  # noqa: F811
    """node1 + node2 (partition `multi`) for the running cluster; removed again afterwards."""
    up = subprocess.run(["bash", str(NETNS), "up"], capture_output=True, text=True, timeout=120)
    if up.returncode != 0:
        down = subprocess.run(["bash", str(NETNS), "down"], capture_output=True, text=True, timeout=120)
        lines = (up.stderr.strip() or up.stdout.strip() or "no output").splitlines()
        if "not permitted" in lines[-1]:
            pytest.skip(f"no network namespaces here: {lines[-1]}")
        pytest.fail(f"launch/slurm_netns_nodes.sh up failed:\n{up.stdout}\n{up.stderr}\n{down.stdout}")
    # Clients in a job on node1/node2 (srun) reach the controller at the bridge address; gloo uses
    # the veth each namespace has (the host name resolves to 127.0.0.1, which is per namespace).
    yield dict(JOB_ENV, SLURM_CONF=str(CLUSTER_DIR / "etc" / "slurm-netns.conf"), GLOO_SOCKET_IFNAME="mt0")
    down = subprocess.run(["bash", str(NETNS), "down"], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not (CLUSTER_DIR / "netns").exists()
    assert "mt-node" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_two_node_job_trains_like_local_ranks(netns_nodes, dm_data, reference_run, tmp_path, deepspeed_ops):
    run = tmp_path / "run"
    result = submit(run, dm_data, "--nodes", "2", "--tasks-per-node", "1", "--partition", "multi", env=netns_nodes)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 node(s) x 1 task(s)" in result.stdout
    job = job_id(run)
    final = wait_done(run, timeout=180)
    assert final["state"] == "done" and final["step"] == 8 and final["restarts"] == 0
    nodes = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "NodeList", "-j", job], capture_output=True,
                           text=True).stdout.split()
    assert nodes == ["node[1-2]"], nodes
    # rank 0 on node1 (the master), rank 1 on node2: each task's log names its rank and the master node1
    logs = {i: (run / "slurm" / f"{job}_{i}_log.out").read_text() for i in (0, 1)}
    for rank, log in logs.items():
        assert f"rank {rank} of 2, master node1:" in log, log[-2000:]
    steps = subprocess.run(["sacct", "-n", "-P", "-o", "JobID,NodeList", "-j", job], capture_output=True,
                           text=True).stdout
    assert any(line.split("|")[1] == "node[1-2]" for line in steps.splitlines() if "." in line), steps
    # The same two gloo ranks as `--nproc 2`, only now on two network hosts: the same losses.
    assert losses(run) == losses(reference_run)
