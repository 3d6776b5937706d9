"""megatrain on one GPU, in one command: every path one H100/H200 can run, one JSON report.

The GPU machine (shared/notes/gpu.md) has torch, transformers 5.17 and sentencepiece but no DeepSpeed
and no network. This script installs the wheels carried in the working tree (`make gpu-wheels` builds
them into .whl/, ~27 MB), writes its own data, and runs each stage under its own time limit; the
limits add up to --budget (480 s), so the whole run ends within 8 minutes. A stage that fails is
recorded with the end of its log and the next one runs. Stages, each a real `python -m megatrain
train CONFIG --nproc 1 ...` (an NCCL world of one rank) unless said otherwise:

    setup               install the wheels into --work/site (pip --no-index --no-deps --target), probe
                        the GPU, torch, CUDA, nvcc, DeepSpeed and transformers
    data                synthetic text -> `megatrain-data tokenizer train` + `build` (packed rows of
                        1024 tokens); synthetic Q/A in the released format -> `deepmind shards`
    llama_zero2         bf16, ZeRO-2, activation checkpointing, packed data, 20 steps
    llama_zero3_offload bf16, ZeRO-3, optimizer and parameter offload (DeepSpeedCPUAdam, JIT-built in
                        the background from the end of setup), activation checkpointing, 12 steps
    families            moe (ZeRO-2), dropless_moe (ZeRO-3, AutoEP), t5 and switch_t5 (Q/A data,
                        ZeRO-2), 6 steps each, bf16, run side by side (their tokens/s are not comparable)
    mfu                 bench/mfu.py: ~1.1B Llama, seq 4096, bf16, activation checkpointing off and on

Figures per stage: loss first/last, tokens/s (median of the logged steps after the second), peak
GPU memory (torch.cuda.max_memory_allocated of the training process), the process group's backend,
and the SDPA calls. The llama stages and mfu run inside
`torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION)`: every SDPA call must take the flash
kernel or fail, so a passing stage with sdpa_calls > 0 proves the backend.

Run it where a GPU is lent (the device tool), after `make gpu-wheels` here:

    run(command="set -o pipefail; PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT/gpu_check.json
                 2>&1 | tee $OUT/gpu_check.log", carry=[".whl"], timeout_s=600)

The report comes back with gpu_check_logs.tar.gz beside it (every stage's log, each run's
metrics.jsonl and config.yaml). Without CUDA it prints one `error:` line, writes the report with
status "refused" and exits 2.
`--plan` prints the stages, limits and commands without running anything; `--stages a,b` runs a
subset (setup and data are added when a later stage needs them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Run as a script or loaded by path (tests/test_gpu_check.py): its sibling module is found beside it.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check_data import (  # noqa: E402,F401  (the tests read the data helpers through this module)
    PACKED_SEQ_LEN, QA_MODULE, data_commands, synthetic_documents, synthetic_pairs, write_data)

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "megatrain-gpu-check/1"
DEFAULT_BUDGET_S = 480
WHEELS_LIMIT_MIB = 64 - 8  # the device tool carries 64 MiB in all; leave room for the working tree


# ----------------------------------------------------------------------------- the plan

@dataclass
class Stage:
    name: str
    budget_s: float
    """Wall-clock limit; the stages' limits add up to the run's budget."""
    needs: tuple[str, ...] = ()
    runs: list[dict] = field(default_factory=list)
    """Each: {"name", "argv", "flash": bool, "run_dir"?, "min_steps"?}; several run side by side."""


def _train_argv(config: str, run_dir: Path, overrides: list[str]) -> list[str]:
    return ["train", config, "--nproc", "1", f"--run.dir={run_dir}", *overrides]


def plan(work: Path, budget_s: float = DEFAULT_BUDGET_S) -> list[Stage]:
    """The stages in order, with commands and limits (limits scaled to `budget_s`)."""
    data = work / "data"
    packed = [f"--data.sources.synth.path={data / 'packed'}", "--data.num_workers=1", "--eval.interval=0",
              "--eval.final_limit=0", f"--model.max_seq_len={PACKED_SEQ_LEN}"]
    qa = [f"--data.shards={data / 'qa'}", f"--eval.released={data / 'released'}", f"--eval.modules={QA_MODULE}",
          "--eval.final_limit=16", "--eval.batch_size=16", "--eval.max_new_tokens=8", "--model.max_seq_len=64",
          "--data.num_workers=1"]
    common = ["--precision=bf16", "--log.interval=1", "--log.progress=false", "--log.tensorboard=false",
              "--checkpoint.interval=0", "--optim.warmup_steps=2", "--optim.lr=0.001", "--run.seed=7"]
    decoder = ["--model.hidden_size=1024", "--model.num_layers=8", "--model.num_heads=16",
               "--model.intermediate_size=2816", "--train.micro_batch_size=8", "--train.global_batch_size=16"]
    small = ["--model.hidden_size=512", "--model.num_layers=4", "--model.num_heads=8",
             "--model.intermediate_size=1408", "--train.steps=6", "--train.micro_batch_size=8",
             "--train.global_batch_size=8", "--model.moe.num_experts=8", "--model.moe.every=2"]
    # The smoke recipe with our data: one data.sources entry turns it into a packed-row (pretraining) run.
    config = "configs/cpu-smoke.yaml"
    runs = work / "runs"

    def train(name, cfg, overrides, flash=False, min_steps=6):
        return {"name": name, "argv": _train_argv(cfg, runs / name, overrides), "flash": flash,
                "run_dir": str(runs / name), "min_steps": min_steps}

    stages = [
        Stage("setup", 35),
        Stage("data", 40, ("setup",)),
        Stage("llama_zero2", 75, ("setup", "data"), [train(
            "llama_zero2", config, [*packed, *common, *decoder, "--train.steps=20", "--parallel.zero_stage=2",
                                    "--parallel.activation_checkpointing=true", "--model.attention=sdpa"],
            flash=True, min_steps=20)]),
        Stage("llama_zero3_offload", 100, ("setup", "data"), [train(
            "llama_zero3_offload", config,
            [*packed, *common, *decoder, "--train.steps=12", "--parallel.zero_stage=3",
             "--parallel.offload_optimizer=true", "--parallel.offload_params=true",
             "--parallel.activation_checkpointing=true", "--model.attention=sdpa"], flash=True, min_steps=12)]),
        Stage("families", 90, ("setup", "data"), [
            train("moe", config, [*packed, *common, *small, "--model.family=moe", "--parallel.zero_stage=2"]),
            train("dropless_moe", config, [*packed, *common, *small, "--model.family=dropless_moe",
                                           "--parallel.zero_stage=3"]),
            train("t5", config, [*qa, *common, *small, "--model.family=t5",
                                                   "--parallel.zero_stage=2"]),
            train("switch_t5", config, [*qa, *common, *small, "--model.family=switch_t5",
                                                          "--parallel.zero_stage=2"]),
        ]),
        Stage("mfu", 140, ("setup",), [{"name": "mfu", "flash": False, "argv": [
            str(ROOT / "bench" / "mfu.py"), "--flash-sdpa", f"--json={work / 'mfu.json'}", "--steps=8",
            "--warmup=2"]}]),
    ]
    scale = budget_s / sum(s.budget_s for s in stages)
    for s in stages:
        s.budget_s = round(s.budget_s * scale, 1)
    return stages


def select(stages: list[Stage], names: list[str] | None) -> list[Stage]:
    """The named stages and what they need, in plan order; unknown names raise ValueError."""
    if not names:
        return stages
    known = {s.name: s for s in stages}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; stages: {', '.join(known)}")
    wanted = set(names)
    for n in names:
        wanted.update(known[n].needs)
    return [s for s in stages if s.name in wanted]


# ----------------------------------------------------------------------------- running

class Report:
    """The JSON report, rewritten (atomically) after every stage: a run cut short still leaves one."""

    def __init__(self, path: Path, budget_s: float):
        self.path = path
        self.data = {"schema": SCHEMA, "status": "running", "reason": None,
                     "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                     "finished": None, "wall_s": None, "budget_s": budget_s, "host": {}, "wheels": {},
                     "logs": None, "stages": []}
        self.t0 = time.monotonic()

    def stage(self, record: dict) -> None:
        self.data["stages"].append(record)
        self.write()

    def finish(self, status: str, reason: str | None = None) -> None:
        self.data.update(status=status, reason=reason, wall_s=round(time.monotonic() - self.t0, 1),
                         finished=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=False) + "\n")
        os.replace(tmp, self.path)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _spawn(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    # A session of its own, so a timeout ends the whole tree this script started (ranks, ninja).
    with open(log, "w") as handle:  # the child keeps its own copy of the file
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _wait(procs: list[subprocess.Popen], deadline: float) -> list[int | None]:
    """Return codes; None for a process killed at the deadline (its process group with it)."""
    codes: list[int | None] = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the group this script created for p, nothing else
            p.wait()
            codes.append(None)
    return codes


def read_metrics(run_dir: Path) -> dict:
    """Loss first/last, median tokens/s and MFU from a run's metrics.jsonl (steps after the second)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    if not steps:
        return {"skipped_steps": sum(1 for r in rows if "skipped" in r)}
    steady = [r for r in steps if r["step"] > 2] or steps
    out = {"steps": steps[-1]["step"], "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"],
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
           "skipped_steps": sum(1 for r in rows if "skipped" in r)}
    if all("mfu" in r for r in steady):
        out["mfu"] = statistics.median(r["mfu"] for r in steady)
    return out


def judge(run: dict, rc: int | None, child: dict, metrics: dict) -> str | None:
    """Why a training run failed, or None when it passed."""
    if rc is None:
        return "killed at the stage's time limit"
    if rc != 0:
        return f"exit status {rc}"
    if run["name"] == "mfu":
        return None
    if child.get("backend") != "nccl":
        return f"process group backend {child.get('backend')!r}, not nccl"
    if metrics.get("steps", 0) < run.get("min_steps", 1):
        return f"{metrics.get('steps', 0)} steps logged, expected {run.get('min_steps', 1)}"
    losses = (metrics.get("loss_first"), metrics.get("loss_last"))
    if any(v is None or not math.isfinite(v) for v in losses):
        return f"loss not finite: {losses}"
    if metrics.get("skipped_steps"):
        return f"{metrics['skipped_steps']} steps skipped (non-finite)"
    if run.get("min_steps", 0) >= 12 and not losses[1] < losses[0]:
        return f"loss did not fall over {metrics['steps']} steps: {losses[0]:.4f} -> {losses[1]:.4f}"
    if run["flash"] and not child.get("sdpa_calls"):
        return "no SDPA call was seen, so the flash kernel is not proven"
    return None


def run_stage(stage: Stage, env: dict, work: Path, deadline: float, background: dict) -> dict:
    """One stage: its runs side by side, each judged; the stage passes when every run does."""
    t0 = time.monotonic()
    limit = min(t0 + stage.budget_s, deadline)
    record = {"name": stage.name, "status": "pass", "budget_s": stage.budget_s, "wall_s": None, "runs": []}
    if stage.name == "setup":
        record.update(_setup(env, work, limit, background))
    elif stage.name == "data":
        record.update(_data(env, work, limit))
    else:
        if stage.name == "llama_zero3_offload" and "cpu_adam" in background:
            proc, started, log = background.pop("cpu_adam")
            (code,) = _wait([proc], limit)
            record["cpu_adam_build"] = {"rc": code, "wall_s": round(time.monotonic() - started, 1),
                                        **({"log_tail": _tail(log)} if code != 0 else {})}
        procs = []
        for run in stage.runs:
            result = work / "child" / f"{run['name']}.json"
            result.unlink(missing_ok=True)
            if run["name"] == "mfu":
                argv = [sys.executable, *run["argv"]]
            else:
                argv = [sys.executable, str(Path(__file__).resolve()), "--child", str(result),
                        *(["--flash"] if run["flash"] else []), "--", *run["argv"]]
            procs.append(_spawn(argv, env, work / "logs" / f"{run['name']}.log"))
        codes = _wait(procs, limit)
        for run, rc in zip(stage.runs, codes):
            child_path = work / "child" / f"{run['name']}.json"
            child = json.loads(child_path.read_text()) if child_path.is_file() else {}
            if run["name"] == "mfu":
                mfu_path = work / "mfu.json"
                figures = {"rows": json.loads(mfu_path.read_text()) if mfu_path.is_file() else []}
                if rc == 0 and (not figures["rows"] or any("error" in r for r in figures["rows"])):
                    rc = 1
            else:
                figures = {**read_metrics(Path(run["run_dir"])), **child}
            error = judge(run, rc, child, figures)
            entry = {"name": run["name"], "status": "pass" if error is None else "fail", "rc": rc,
                     "flash_enforced": run["flash"], "figures": figures, "error": error,
                     "command": ["python", "-m", "megatrain", *run["argv"]] if run["name"] != "mfu"
                     else ["python", *run["argv"]]}
            if error:
                entry["log_tail"] = _tail(work / "logs" / f"{run['name']}.log")
            record["runs"].append(entry)
        if any(r["status"] != "pass" for r in record["runs"]):
            record["status"] = "fail"
    record["wall_s"] = round(time.monotonic() - t0, 1)
    return record


def _setup(env: dict, work: Path, limit: float, background: dict) -> dict:
    wheels = sorted(Path(env["GPU_CHECK_WHEELS"]).glob("*.whl"))
    out: dict = {"wheels": [w.name for w in wheels]}
    if not wheels:  # the probe below still says what the image lacks
        out.update(status="fail", error=f"no wheels in {env['GPU_CHECK_WHEELS']}: run `make gpu-wheels` and carry .whl")
    else:
        site = work / "site"
        proc = _spawn([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                       "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)], env,
                       work / "logs" / "pip.log")
        (code,) = _wait([proc], limit)
        if code != 0:
            return {**out, "status": "fail", "error": f"pip install exit {code}",
                    "log_tail": _tail(work / "logs" / "pip.log")}
    probe = ("import json, subprocess, torch, transformers, deepspeed\n"
             "p = torch.cuda.get_device_properties(0)\n"
             "try: nvcc = subprocess.run(['nvcc', '--version'], capture_output=True, text=True).stdout.split()[-1]\n"
             "except OSError: nvcc = None\n"
             "print(json.dumps({'device': p.name, 'memory_gib': round(p.total_memory / 2**30, 1),\n"
             "  'capability': list(torch.cuda.get_device_capability()), 'torch': torch.__version__,\n"
             "  'cuda': torch.version.cuda, 'nccl': str(torch.cuda.nccl.version()),\n"
             "  'nvcc': nvcc, 'deepspeed': deepspeed.__version__, 'transformers': transformers.__version__,\n"
             "  'python': '.'.join(map(str, __import__('sys').version_info[:3])),\n"
             "  'flash_sdp_enabled': torch.backends.cuda.flash_sdp_enabled()}))\n")
    proc = _spawn([sys.executable, "-c", probe], env, work / "logs" / "probe.log")
    (code,) = _wait([proc], limit)
    if code != 0:
        return {**out, "status": "fail", "error": f"probe exit {code}", "log_tail": _tail(work / "logs" / "probe.log")}
    out["host"] = json.loads((work / "logs" / "probe.log").read_text().strip().splitlines()[-1])
    # DeepSpeedCPUAdam (optimizer offload) JIT-compiles once: start it now, the offload stage waits for it.
    build = ("from deepspeed.ops.op_builder import CPUAdamBuilder\nCPUAdamBuilder().load(verbose=False)\n"
             "print('cpu_adam built')\n")
    background["cpu_adam"] = (_spawn([sys.executable, "-c", build], env, work / "logs" / "cpu_adam.log"),
                              time.monotonic(), work / "logs" / "cpu_adam.log")
    return out


def _data(env: dict, work: Path, limit: float) -> dict:
    data = work / "data"
    write_data(data)
    steps = []
    for i, argv in enumerate(data_commands(data)):
        log = work / "logs" / f"data_{i}.log"
        (code,) = _wait([_spawn(argv, env, log)], limit)
        steps.append({"command": argv[2:], "rc": code})
        if code != 0:
            return {"status": "fail", "steps": steps, "error": f"{' '.join(argv[3:5])}: exit {code}",
                    "log_tail": _tail(log)}
    manifest = json.loads((data / "packed" / "manifest.json").read_text())
    return {"steps": steps, "figures": {"packed_tokens": manifest.get("tokens"), "vocab": manifest.get("vocab_size")}}


def pack_logs(work: Path, archive: Path) -> Path:
    """Every stage's log and each run's metrics.jsonl and config.yaml, in one file beside the report
    (the device tool brings back few files, and only from $OUT)."""
    import tarfile

    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted([*work.glob("logs/*.log"), *work.glob("runs/*/metrics.jsonl"),
                            *work.glob("runs/*/config.yaml"), *work.glob("child/*.json")]):
            tar.add(path, arcname=str(path.relative_to(work)))
    return archive


def child_env(work: Path, wheels: Path) -> dict:
    """The environment of every process the stages start: carried wheels first on the path, offline."""
    env = dict(os.environ)
    paths = [str(work / "site"), str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    env.update(PYTHONPATH=os.pathsep.join(paths), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TORCH_EXTENSIONS_DIR=str(work / "torch_extensions"), PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", GPU_CHECK_WHEELS=str(wheels))
    return env


def run_all(args: argparse.Namespace, stages: list[Stage], report: Report) -> int:
    work = Path(args.work)
    env = child_env(work, Path(args.wheels))
    deadline = report.t0 + args.budget
    background: dict = {}
    failed = []
    try:
        for stage in stages:
            print(f"[gpu_check] {stage.name} (limit {stage.budget_s:.0f} s)", flush=True)
            if time.monotonic() >= deadline:
                report.stage({"name": stage.name, "status": "skipped", "error": "out of time"})
                failed.append(stage.name)
                continue
            record = run_stage(stage, env, work, deadline, background)
            if stage.name == "setup":
                report.data["host"] = record.pop("host", {})
            report.stage(record)
            print(f"[gpu_check] {stage.name}: {record['status']} in {record['wall_s']} s"
                  + (f" ({record.get('error')})" if record.get("error") else ""), flush=True)
            for run in record.get("runs", []):
                if run["status"] != "pass":
                    print(f"[gpu_check]   {run['name']}: {run['error']}", flush=True)
            if record["status"] != "pass":
                failed.append(stage.name)
    finally:
        for proc, _, _ in background.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        report.data["logs"] = str(pack_logs(work, report.path.parent / "gpu_check_logs.tar.gz"))
    report.finish("pass" if not failed else "fail", f"failed: {', '.join(failed)}" if failed else None)
    print(f"[gpu_check] {report.data['status']} in {report.data['wall_s']} s; report: {report.path}", flush=True)
    return 0 if not failed else 1


# ----------------------------------------------------------------------------- the training process

def child(result: Path, flash: bool, argv: list[str]) -> int:
    """`python -m megatrain ARGV` in this process, counting SDPA calls (under the flash kernel alone
    with `flash`), and recording the process group's backend and the peak GPU memory."""
    import torch
    import torch.distributed as dist

    seen = {"sdpa_calls": 0, "sdpa_masked_calls": 0, "sdpa_dtypes": set(), "backend": None}
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted(query, key, value, attn_mask=None, *rest, **kwargs):
        seen["sdpa_calls"] += 1
        seen["sdpa_masked_calls"] += attn_mask is not None
        seen["sdpa_dtypes"].add(str(query.dtype).removeprefix("torch."))
        return sdpa(query, key, value, attn_mask, *rest, **kwargs)

    init = dist.init_process_group

    def init_recorded(*a, **kw):
        out = init(*a, **kw)
        seen["backend"] = str(dist.get_backend())
        return out

    torch.nn.functional.scaled_dot_product_attention = counted
    dist.init_process_group = init_recorded
    rc = 1
    sys.argv = ["megatrain", *argv]
    # cli.main, not `python -m megatrain` (cli.entry): entry ends the process with os._exit, before the
    # `finally` below could record anything.
    from megatrain.cli import main
    try:
        if flash:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                rc = main()
        else:
            rc = main()
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        out = {**seen, "sdpa_dtypes": sorted(seen["sdpa_dtypes"]), "rc": rc,
               "attention_backend": "flash (forced by sdpa_kernel)" if flash else "sdpa (any backend)"}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out.update(peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                       peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3))
        result.parent.mkdir(parents=True, exist_ok=True)
        result.write_text(json.dumps(out))
    return rc


# ----------------------------------------------------------------------------- wheels

def wheels_report(folder: Path, limit_mib: float = WHEELS_LIMIT_MIB) -> tuple[dict, str | None]:
    """Each wheel's size and the total; an error when there are none, a package twice, or too much."""
    wheels = sorted(folder.glob("*.whl"))
    sizes = {w.name: w.stat().st_size for w in wheels}
    total = sum(sizes.values())
    names = [w.name.split("-")[0].lower().replace("_", "-") for w in wheels]
    twice = sorted({n for n in names if names.count(n) > 1})
    info = {"folder": str(folder), "wheels": sizes, "total_mib": round(total / 2**20, 2), "limit_mib": limit_mib}
    if not wheels:
        return info, f"no wheels in {folder}; run `make gpu-wheels`"
    if twice:
        return info, (f"{', '.join(twice)} twice in {folder}: pip --no-deps stops on two versions; "
                      "rerun `make gpu-wheels`")
    if total > limit_mib * 2**20:
        return info, f"{info['total_mib']} MiB of wheels exceeds {limit_mib} MiB (the device tool carries 64 MiB)"
    return info, None


# ----------------------------------------------------------------------------- command line

def default_out() -> Path:
    return Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else ROOT / "runs" / "gpu_check.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="the JSON report (default $OUT/gpu_check.json, else "
                                                          "runs/gpu_check.json)")
    p.add_argument("--work", type=Path, default=Path("/tmp/megatrain-gpu-check"),
                   help="data, runs, logs and the installed wheels (emptied first)")
    p.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="the wheels `make gpu-wheels` built")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all stages together")
    p.add_argument("--stages", default="", help="comma-separated subset (default: all)")
    p.add_argument("--plan", action="store_true", help="print the stages, limits and commands as JSON; run nothing")
    p.add_argument("--wheels-report", type=Path, default=None, metavar="DIR",
                   help="print the wheels' sizes and total; exit 1 when over the limit")
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--flash", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is None and args.rest:
        p.error(f"unexpected arguments: {' '.join(args.rest)}")
    if not args.budget > 0:
        p.error(f"--budget {args.budget}: must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        return child(args.child, args.flash, rest)
    if args.wheels_report is not None:
        info, error = wheels_report(args.wheels_report)
        for name, size in info["wheels"].items():
            print(f"{size / 2**20:8.2f} MiB  {name}")
        print(f"{info['total_mib']:8.2f} MiB  total ({len(info['wheels'])} wheels; limit {info['limit_mib']} MiB)")
        if error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        return 0
    try:
        stages = select(plan(args.work, args.budget), [s for s in args.stages.split(",") if s.strip()])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.plan:
        print(json.dumps([{"name": s.name, "budget_s": s.budget_s, "needs": list(s.needs),
                           "runs": [{"name": r["name"], "flash": r["flash"],
                                     "command": ["python", "-m", "megatrain", *r["argv"]]
                                     if r["name"] != "mfu" else ["python", *r["argv"]]} for r in s.runs]}
                          for s in stages], indent=1))
        return 0
    report = Report(args.out or default_out(), args.budget)
    import torch  # only here: --plan, --wheels-report and the tests need no torch import

    if not torch.cuda.is_available():
        reason = (f"bench/gpu_check.py needs a CUDA GPU; torch {torch.__version__} sees none here "
                  "(run it through the device tool: see docs/benchmarks.md)")
        report.finish("refused", reason)
        print(f"error: {reason}", file=sys.stderr)
        return 2
    report.data["wheels"] = wheels_report(Path(args.wheels))[0]
    work = Path(args.work)
    if work.exists():
        import shutil
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return run_all(args, stages, report)


if __name__ == "__main__":
    sys.exit(main())
