"""DeepSpeed hostfiles: written from a SLURM node list, or read and checked.

A hostfile has one line per node, `HOST slots=N`, N ranks (GPUs) on that host. Inside a SLURM
allocation the node list is SLURM_JOB_NODELIST and the slots SLURM_GPUS_ON_NODE (or the tasks
per node on CPU nodes):

    python -m megatrain.launch.hostfile -o hostfile            # inside salloc/sbatch
    python -m megatrain.launch.hostfile --nodelist 'node[01-02]' --slots 8 -o hostfile
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from megatrain.errors import MegatrainError
from megatrain.parallel.launcher_env import expand_nodelist


def hostfile_text(hosts: list[str], slots: int) -> str:
    """The hostfile for `slots` ranks on each of `hosts`."""
    if slots < 1 or not hosts:
        raise MegatrainError(f"a hostfile needs hosts and at least one slot each, got {hosts} with {slots} slots")
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def slots_from_slurm(environ=os.environ) -> int:
    """GPUs per node of the allocation, or its tasks per node where it has no GPUs."""
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        match = re.match(r"(?:\w+:)?(\d+)", environ.get(key, ""))  # SLURM_GPUS_PER_NODE may read "a100:8"
        if match:
            return int(match.group(1))
    raise MegatrainError("cannot tell the slots per node from this SLURM environment; pass --slots")


def read_hostfile(path: str | Path) -> dict[str, int]:
    """host -> slots of a DeepSpeed hostfile (comments and blank lines skipped)."""
    hosts: dict[str, int] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not match or match.group(1) in hosts:
            raise MegatrainError(f"{path}:{number}: expected one 'HOST slots=N' line per host, got {line!r}")
        hosts[match.group(1)] = int(match.group(2))
    if not hosts:
        raise MegatrainError(f"{path} names no hosts; write one 'HOST slots=N' line per node")
    return hosts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatrain.launch.hostfile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodelist", default=os.environ.get("SLURM_JOB_NODELIST"),
                   help="SLURM node list (default: SLURM_JOB_NODELIST)")
    p.add_argument("--slots", type=int, default=None, help="ranks per host (default: from the allocation)")
    p.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")
    args = p.parse_args(argv)
    try:
        if not args.nodelist:
            raise MegatrainError("no node list: run inside a SLURM allocation or pass --nodelist")
        text = hostfile_text(expand_nodelist(args.nodelist), args.slots or slots_from_slurm())
    except MegatrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
