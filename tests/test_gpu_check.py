"""bench/gpu_check.py on a machine without a GPU: its plan, arguments, refusal, report and judging.

What needs the GPU (NCCL, the flash kernel, the figures) runs only there (docs/benchmarks.md says how);
here the plan is checked against megatrain's own config tree, so a renamed key fails in CI, not in
the few minutes of a lent GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("gpu_check", gpu_check)  # dataclasses look their module up there
_spec.loader.exec_module(gpu_check)


def _runs(stages):
    return {run["name"]: run for stage in stages for run in stage.runs}


def test_plan_fits_the_budget_and_covers_every_path(tmp_path):
    stages = gpu_check.plan(tmp_path)
    assert [s.name for s in stages] == ["setup", "data", "llama_zero2", "llama_zero3_offload", "families", "mfu"]
    assert sum(s.budget_s for s in stages) == pytest.approx(gpu_check.DEFAULT_BUDGET_S) and \
        gpu_check.DEFAULT_BUDGET_S <= 8 * 60
    assert sum(s.budget_s for s in gpu_check.plan(tmp_path, 240)) == pytest.approx(240)
    runs = _runs(stages)
    assert set(runs) == {"llama_zero2", "llama_zero3_offload", "moe", "dropless_moe", "t5", "switch_t5", "mfu"}
    for name, run in runs.items():
        if name == "mfu":
            assert "--flash-sdpa" in run["argv"] and any(a.startswith("--json=") for a in run["argv"])
            continue
        assert run["argv"][:4] == ["train", "configs/cpu-smoke.yaml", "--nproc", "1"], name
        assert "--precision=bf16" in run["argv"], name
    zero2, zero3 = runs["llama_zero2"]["argv"], runs["llama_zero3_offload"]["argv"]
    assert runs["llama_zero2"]["flash"] and runs["llama_zero3_offload"]["flash"]
    assert {"--parallel.zero_stage=2", "--parallel.activation_checkpointing=true"} <= set(zero2)
    assert {"--parallel.zero_stage=3", "--parallel.offload_optimizer=true", "--parallel.offload_params=true",
            "--parallel.activation_checkpointing=true"} <= set(zero3)


def test_every_planned_run_is_a_valid_megatrain_config(tmp_path):
    """Each command's recipe and overrides load through megatrain's config tree and pass validate()."""
    from megatrain.config import load_config, validate

    for name, run in _runs(gpu_check.plan(tmp_path)).items():
        if name == "mfu":
            continue
        config, overrides = run["argv"][1], run["argv"][4:]
        cfg = load_config(REPO / config, overrides)
        validate(cfg, 1)
        assert cfg.model.family == {"llama_zero2": "llama", "llama_zero3_offload": "llama"}.get(name, name)
        assert cfg.run.dir == run["run_dir"] and cfg.train.steps == run["min_steps"]  # every step must be logged
        packed = name not in ("t5", "switch_t5")  # the seq2seq families train on question/answer shards
        assert bool(cfg.data.sources) == packed, name


def test_select_adds_what_a_stage_needs_and_refuses_unknown_names(tmp_path):
    stages = gpu_check.plan(tmp_path)
    assert [s.name for s in gpu_check.select(stages, ["mfu"])] == ["setup", "mfu"]
    assert [s.name for s in gpu_check.select(stages, ["families"])] == ["setup", "data", "families"]
    assert gpu_check.select(stages, []) == stages
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        gpu_check.select(stages, ["nope"])


def test_plan_flag_prints_json_and_bad_arguments_exit_2(tmp_path, capsys):
    assert gpu_check.main(["--plan", "--stages", "mfu", "--work", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in printed] == ["setup", "mfu"]
    assert printed[1]["runs"][0]["command"][1].endswith("bench/mfu.py")
    assert gpu_check.main(["--plan", "--stages", "nope"]) == 2
    assert "error: unknown stage 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(["--budget", "0"])
    assert exit_info.value.code == 2


def test_refuses_without_cuda_in_one_line_and_writes_the_report(tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU even where one exists
    env.pop("OUT", None)
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--work", str(tmp_path / "work")],
                            check=False, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: bench/gpu_check.py needs a CUDA GPU"), result.stderr
    report = json.loads(out.read_text())
    assert report["schema"] == gpu_check.SCHEMA and report["status"] == "refused"
    assert report["reason"] == lines[0].removeprefix("error: ") and report["stages"] == []
    assert {"started", "finished", "wall_s", "budget_s", "host", "wheels", "logs"} <= set(report)
    assert not (tmp_path / "work").exists()  # refused before touching anything


def test_a_failing_stage_is_recorded_and_the_next_one_still_runs(tmp_path):
    """Two stages whose megatrain run stops at once (a recipe that does not exist): each is recorded
    with its exit status and log, the run goes on to the second, and the report says which failed."""
    bad = gpu_check.Stage("first", 60, runs=[{"name": "a", "flash": False, "min_steps": 1,
                                              "run_dir": str(tmp_path / "a"),
                                              "argv": ["train", "configs/missing.yaml", "--nproc", "1"]}])
    second = gpu_check.Stage("second", 60, runs=[{**bad.runs[0], "name": "b", "run_dir": str(tmp_path / "b")}])
    report = gpu_check.Report(tmp_path / "out" / "report.json", 120)
    args = gpu_check.parse_args(["--work", str(tmp_path / "work"), "--wheels", str(tmp_path / "none"),
                                 "--budget", "120"])
    assert gpu_check.run_all(args, [bad, second], report) == 1
    saved = json.loads(report.path.read_text())
    assert saved["status"] == "fail" and saved["reason"] == "failed: first, second"
    assert [s["name"] for s in saved["stages"]] == ["first", "second"]
    with tarfile.open(saved["logs"]) as tar:  # the logs travel back beside the report
        assert {"logs/a.log", "logs/b.log", "child/a.json"} <= set(tar.getnames())
    for stage in saved["stages"]:
        (run,) = stage["runs"]
        assert stage["status"] == "fail" and run["status"] == "fail" and run["rc"] == 2
        assert run["error"] == "exit status 2" and "configs/missing.yaml does not exist" in run["log_tail"]
        assert run["command"][:4] == ["python", "-m", "megatrain", "train"]
        assert run["figures"]["backend"] is None and run["figures"]["sdpa_calls"] == 0


def test_a_stage_past_its_limit_is_killed_with_its_process_group(tmp_path):
    proc = gpu_check._spawn([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ),
                            tmp_path / "sleep.log")
    start = time.monotonic()
    assert gpu_check._wait([proc], time.monotonic() + 0.5) == [None]
    assert time.monotonic() - start < 10 and proc.poll() is not None


def test_read_metrics_and_judge(tmp_path):
    rows = [{"step": 1, "loss": 7.5, "tokens_per_s": 10.0}, {"step": 2, "loss": 6.0, "tokens_per_s": 100.0},
            {"step": 3, "loss": 5.0, "tokens_per_s": 300.0, "mfu": 0.3},
            {"step": 4, "loss": 4.0, "tokens_per_s": 500.0, "mfu": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = gpu_check.read_metrics(tmp_path)
    assert metrics == {"steps": 4, "loss_first": 7.5, "loss_last": 4.0, "tokens_per_s": 400.0, "skipped_steps": 0,
                       "mfu": 0.4}
    assert gpu_check.read_metrics(tmp_path / "absent") == {}
    run = {"name": "llama_zero2", "flash": True, "min_steps": 4}
    good = {"backend": "nccl", "sdpa_calls": 16}
    assert gpu_check.judge(run, 0, good, metrics) is None
    assert gpu_check.judge(run, None, good, metrics) == "killed at the stage's time limit"
    assert gpu_check.judge(run, 0, {**good, "backend": "gloo"}, metrics) == "process group backend 'gloo', not nccl"
    assert "no SDPA call" in gpu_check.judge(run, 0, {**good, "sdpa_calls": 0}, metrics)
    assert "expected 20" in gpu_check.judge({**run, "min_steps": 20}, 0, good, metrics)
    flat = {**metrics, "loss_last": 7.5}
    assert "did not fall" in gpu_check.judge({**run, "min_steps": 12}, 0, good, {**flat, "steps": 12})
    assert "not finite" in gpu_check.judge(run, 0, good, {**metrics, "loss_last": float("nan")})


def test_synthetic_data_is_deterministic_and_its_arithmetic_holds():
    docs = gpu_check.synthetic_documents(20, seed=3)
    assert docs == gpu_check.synthetic_documents(20, seed=3) != gpu_check.synthetic_documents(20, seed=4)
    for line in "\n".join(docs).splitlines():
        a, op, b, _, value = line.split(": ", 1)[1].rstrip(".").split()
        a, b = int(a), int(b)
        assert int(value) == {"+": a + b, "-": a - b, "*": a * b, "%": a % b}[op]
    pairs = gpu_check.synthetic_pairs(50, seed=1)
    assert pairs == gpu_check.synthetic_pairs(50, seed=1)
    for question, answer in pairs:
        a, sign, b = question.removeprefix("What is ").removeprefix("Calculate ").rstrip("?.").split()
        assert int(answer) == (int(a) + int(b) if sign == "+" else int(a) - int(b))


def test_write_data_lays_out_both_kinds_of_input(tmp_path):
    gpu_check.write_data(tmp_path)
    docs = [json.loads(line)["text"] for line in (tmp_path / "text" / "synth.jsonl").read_text().splitlines()]
    assert len(docs) == 2500
    for split, n in (("train-easy", 3000), ("interpolate", 200)):
        lines = (tmp_path / "released" / split / f"{gpu_check.QA_MODULE}.txt").read_text().split("\n")
        assert len(lines) == 2 * n + 1 and lines[-1] == ""  # question, answer, ... and the final newline
    commands = gpu_check.data_commands(tmp_path)
    assert [c[3:5] for c in commands] == [["tokenizer", "train"], ["build", "--source"], ["deepmind", "shards"]]


def test_wheels_report(tmp_path, capsys):
    info, error = gpu_check.wheels_report(tmp_path)
    assert "no wheels" in error and info["total_mib"] == 0
    (tmp_path / "deepspeed-0.19.8-py3-none-any.whl").write_bytes(b"x" * 2**20)
    (tmp_path / "hjson-3.1.0-py3-none-any.whl").write_bytes(b"x" * 1024)
    info, error = gpu_check.wheels_report(tmp_path)
    assert error is None and info["total_mib"] == 1.0 and len(info["wheels"]) == 2
    assert "exceeds 0.5 MiB" in gpu_check.wheels_report(tmp_path, limit_mib=0.5)[1]
    (tmp_path / "hjson-3.0.0-py3-none-any.whl").write_bytes(b"x")
    assert "hjson twice" in gpu_check.wheels_report(tmp_path)[1]
    assert gpu_check.main(["--wheels-report", str(tmp_path)]) == 1
    assert "total (3 wheels" in capsys.readouterr().out
