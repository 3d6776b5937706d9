"""precision: auto -- bf16 only where the hardware computes it natively, the same on every rank,
kept across a resume; an explicit bf16 on an emulating CPU warns with a measured slowdown.

A CPU without native bf16 is made for real on this machine with ONEDNN_MAX_CPU_ISA=AVX2: oneDNN,
which computes torch's CPU matmuls, then may not use avx512_bf16/AMX and emulates bf16 (measured
~80x slower than fp32 on a 256^2 matmul), as an AVX2-only CPU does.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, SMOKE, run_megatrain
from megatrain import precision

EMULATED = {"ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_native_bf16_from_cpu_flags(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert precision.native_bf16("cpu", {"avx2", "fma"})[0] is False
    assert precision.native_bf16("cpu", {"avx2", "avx512f", "avx512_bf16"})[0] is True
    assert precision.native_bf16("cpu", {"avx2", "amx_bf16", "amx_tile"})[0] is True
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    native, why = precision.native_bf16("cpu", {"avx512_bf16"})
    assert not native and "ONEDNN_MAX_CPU_ISA=AVX2" in why


def test_choose_auto_explicit_and_recorded(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    native, plain = {"avx512_bf16"}, {"avx2"}
    assert precision.choose("auto", "cpu", 2, flags=native).precision == "bf16"
    no = precision.choose("auto", "cpu", 2, flags=plain)
    assert no.precision == "fp32" and "no avx512_bf16 or AMX" in no.reason
    assert precision.choose("auto", "cpu", 0, flags=native).precision == "fp32"  # bf16 needs ZeRO >= 1
    assert precision.choose("bf16", "cpu", 2, flags=plain).precision == "bf16"  # explicit is honoured
    assert precision.choose("fp32", "cpu", 2, flags=native).precision == "fp32"
    kept = precision.choose("auto", "cpu", 2, recorded="bf16", flags=plain)
    assert kept.precision == "bf16" and "kept from the checkpoint" in kept.reason
    assert precision.choose("fp32", "cpu", 2, recorded="bf16", flags=plain).precision == "fp32"
    # The ranks agree: one rank without native bf16 makes auto take fp32 everywhere.
    mine = precision.choose("auto", "cpu", 2, flags=native)
    assert precision.agree(mine, all_native=False).precision == "fp32"
    assert precision.agree(mine, all_native=True).precision == "bf16"
    assert precision.agree(kept, all_native=False).precision == "bf16"  # recorded, not chosen by hardware


def test_bf16_slowdown_probe_sees_emulation():
    code = "from megatrain.precision import bf16_slowdown; print(bf16_slowdown())"
    env = {**os.environ, **EMULATED}
    slow = float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True, cwd=REPO).stdout)
    assert slow > 5  # emulated: measured ~80x here; native bf16 runs at 0.5-1.5x fp32's time


def saved_precision(run_dir) -> tuple[str, str]:
    text = (run_dir / "config.yaml").read_text()
    return yaml.safe_load(text)["precision"], text.splitlines()[0]


def test_auto_resolves_in_the_run_config_and_first_line(train_smoke, tmp_path):
    want = "bf16" if precision.native_bf16("cpu")[0] else "fp32"
    result = train_smoke(tmp_path / "run", "--precision=auto", "--train.steps=2", "--eval.final_limit=0")
    assert result.stdout.splitlines()[0].startswith(f"precision: {want} (auto: ")
    chosen, comment = saved_precision(tmp_path / "run")
    assert chosen == want and comment.startswith(f"# precision: {want} (auto: ")
    assert saved_precision(tmp_path / "run" / "checkpoints" / "step_2")[0] == want


def test_auto_takes_fp32_where_bf16_is_emulated(train_smoke, tmp_path):
    result = train_smoke(tmp_path / "run", "--precision=auto", "--train.steps=2", "--eval.final_limit=0",
                         env={**os.environ, **EMULATED})
    first = result.stdout.splitlines()[0]
    assert first.startswith("precision: fp32 (auto: ") and first.endswith("so bf16 would be emulated)")
    assert saved_precision(tmp_path / "run")[0] == "fp32"


@pytest.mark.skipif(not precision.native_bf16("cpu")[0],
                    reason="needs a CPU with native bf16, so that one rank can lack it and the other not")
def test_ranks_agree_when_one_lacks_native_bf16(dm_data, deepspeed_ops, tmp_path):
    """Rank 1 runs with bf16 emulated, rank 0 natively: both must train in fp32 (else DeepSpeed's
    collectives would mix dtypes); rank 0's config.yaml says why."""
    from megatrain.parallel.dims import free_port

    run = tmp_path / "run"
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
               **(EMULATED if rank == 1 else {})}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "megatrain", "train", str(SMOKE), f"--run.dir={run}", "--precision=auto",
             f"--data.shards={dm_data['shards']}", f"--eval.released={dm_data['released']}",
             "--train.steps=2", "--eval.final_limit=0"], cwd=REPO, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert outs[0][0].splitlines()[0] == "precision: fp32 (auto: another rank's device has no native bf16)"
    assert saved_precision(run)[0] == "fp32"


def test_resume_keeps_the_checkpoint_precision_and_warns_when_emulated(train_smoke, tmp_path):
    run = tmp_path / "run"
    train_smoke(run, "--precision=bf16", "--train.steps=4", "--train.exit_interval=2", "--eval.final_limit=0")
    # The same run continued on a "machine" that emulates bf16, with the recipe's auto: still bf16.
    result = train_smoke(run, "--resume", "--precision=auto", "--train.steps=4", "--eval.final_limit=0",
                         env={**os.environ, **EMULATED})
    lines = result.stdout.splitlines()
    assert lines[0] == "precision: bf16 (auto: kept from the checkpoint this run resumes)"
    assert lines[1].startswith("warning: precision=bf16 is emulated here") and "x slower than fp32" in lines[1]
    assert saved_precision(run)[0] == "bf16"
    assert saved_precision(run / "checkpoints" / "step_4")[0] == "bf16"


def test_bad_precision_is_one_line(tmp_path):
    result = run_megatrain("train", SMOKE, "--precision=fp16", f"--run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: precision='fp16': use auto, fp32 or bf16 (on the command line)"
