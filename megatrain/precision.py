"""Which precision a run trains in, and why.

`precision: auto` takes bf16 only where the hardware computes it natively: a CUDA device that
supports bf16, or a CPU with avx512_bf16 or AMX. Elsewhere bf16 is emulated and slower than fp32 by
one to three orders of magnitude (measured: an AVX2-only EPYC ran 2048^2 matmuls at 0.29 GFLOP/s in
bf16 against 102 in fp32), so `auto` takes fp32 there. An explicit `bf16` is honoured with a warning
that states the slowdown a quick probe measured.

Every rank resolves `auto` from its own hardware, then the ranks agree (bf16 only if all of them run
it natively), so a mixed cluster never trains half its ranks in another precision.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of instructions that compute bf16 dot products in hardware."""

# oneDNN (torch's CPU matmul library) honours ONEDNN_MAX_CPU_ISA; capped below AVX512_CORE_BF16 it
# emulates bf16 even on a CPU that has the instructions (measured here: 80x slower than fp32).
_ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}

_ZERO0_BF16 = ("DeepSpeed's bf16 stage-0 optimizer takes a spurious step at start (parallel.zero_stage=0)")


@dataclass(frozen=True)
class Choice:
    precision: str
    """fp32 or bf16: what the run trains in."""
    reason: str
    """One phrase saying why, for the first log line and the run's config.yaml."""
    native_bf16: bool
    """Whether this rank's device computes bf16 natively."""
    evidence: str = ""
    """What native_bf16 rests on (e.g. "this CPU has avx512_bf16")."""
    from_hardware: bool = False
    """Chosen by `auto` from this rank's hardware (so the ranks must agree on it)."""


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo does not exist."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def native_bf16(device_type: str, flags: set[str] | None = None) -> tuple[bool, str]:
    """Whether this process's device computes bf16 natively, and a phrase naming the evidence."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        return (True, f"{name} supports bf16") if torch.cuda.is_bf16_supported() else \
            (False, f"{name} has no native bf16")
    flags = cpu_flags() if flags is None else flags
    found = [f for f in NATIVE_BF16_CPU_FLAGS if f in flags]
    if not flags:  # no /proc/cpuinfo (not Linux): ask torch's own CPU probe
        found = [name for name, probe in (("avx512_bf16", torch.cpu._is_avx512_bf16_supported),
                                          ("amx", torch.cpu._is_amx_tile_supported)) if probe()]
    if not found:
        return False, "this CPU has no avx512_bf16 or AMX, so bf16 would be emulated"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa in _ONEDNN_ISAS_WITHOUT_BF16:
        return False, f"ONEDNN_MAX_CPU_ISA={isa} keeps oneDNN from this CPU's {'/'.join(found)}, so bf16 would be emulated"
    return True, f"this CPU has {' and '.join(found)}"


def choose(requested: str, device_type: str, zero_stage: int, recorded: str | None = None,
           flags: set[str] | None = None) -> Choice:
    """This rank's choice (before the ranks agree; see `agree`).

    Args:
        requested: the config's precision: fp32, bf16 or auto.
        device_type: cpu or cuda.
        zero_stage: bf16 needs ZeRO >= 1 (see config.validate), so auto takes fp32 at stage 0.
        recorded: the precision a resumed checkpoint trained in; `auto` keeps it, so a run resumed on
            another kind of machine does not change precision unless the config says so.
        flags: the CPU's feature flags; None reads /proc/cpuinfo.
    """
    native, evidence = native_bf16(device_type, flags)
    if requested != "auto":
        return Choice(requested, "set in the config", native, evidence)
    if recorded in ("fp32", "bf16"):
        return Choice(recorded, "auto: kept from the checkpoint this run resumes", native, evidence)
    if native and zero_stage == 0:
        return Choice("fp32", f"auto: {evidence}, but {_ZERO0_BF16}", native, evidence)
    return Choice("bf16" if native else "fp32", f"auto: {evidence}", native, evidence, from_hardware=True)


def agree(choice: Choice, all_native: bool) -> Choice:
    """The choice every rank takes once `all_native` (every rank runs bf16 natively) is known."""
    if choice.from_hardware and choice.precision == "bf16" and not all_native:
        return Choice("fp32", "auto: another rank's device has no native bf16", choice.native_bf16,
                      choice.evidence, from_hardware=True)
    return choice


def bf16_slowdown(size: int = 256, budget_s: float = 2.0) -> float:
    """How many times slower a bf16 matmul runs than an fp32 one here (a probe of about `budget_s`).

    Each side keeps its fastest of up to 5 single-threaded calls, so a busy machine (other ranks
    starting up) does not make one side look slow.
    """
    best = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: no waiting for a peer thread that another process preempted
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # first call pays for kernel selection
        deadline = time.perf_counter() + budget_s / 2
        times = []
        while len(times) < 5 and (not times or time.perf_counter() < deadline):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        best[dtype] = min(times)
    torch.set_num_threads(threads)
    return best[torch.bfloat16] / best[torch.float32]


def emulation_warning(choice: Choice, device_type: str) -> str | None:
    """One warning line for an explicit bf16 on a CPU that emulates it; None when there is nothing to say."""
    if choice.precision != "bf16" or choice.native_bf16 or device_type != "cpu":
        return None
    return (f"warning: precision=bf16 is emulated here ({choice.evidence}): a 256x256 matmul probe ran "
            f"{bf16_slowdown():.0f}x slower than fp32; precision=auto (or fp32) would train faster")
