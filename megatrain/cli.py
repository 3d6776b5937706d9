"""`megatrain train | eval | generate | export | plan | submit | status`."""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys

from megatrain.errors import MegatrainError


def _train(args, overrides: list[str]) -> int:
    from megatrain.config import load_config
    from megatrain.train import preflight, train

    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(resolved_config(cfg, args.nproc), end="")
        return 0
    if args.auto_resume:
        from megatrain.run_dir import RunDir
        args.resume = RunDir(cfg.run.dir).has_checkpoint()
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from megatrain.launch.local import run_local

        preflight(cfg, args.nproc, args.resume)  # fail here, once, before starting any rank
        argv = ["train", args.config, *(["--resume"] if args.resume else []), *overrides]
        return run_local(args.nproc, argv)
    try:
        summary = train(cfg, resume=args.resume)
    except RuntimeError as e:
        from megatrain.heartbeat import exit_if_rank_lost

        exit_if_rank_lost(cfg.run.dir, int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), e)
        raise
    if "stopped_at" in summary:  # SIGTERM/SIGUSR2: a checkpoint at that step, then out
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"stopped by {summary['signal']} at step {summary['stopped_at']} with a checkpoint; "
                  "continue with --resume (or --auto-resume)", file=sys.stderr)
        return 128 + 15
    if int(os.environ.get("RANK", 0)) == 0 and summary.get("n"):
        from megatrain.eval.qa import HEADLINE, format_report

        print(format_report(summary))
        print(json.dumps({"n": summary["n"], **{k: summary[k] for k in HEADLINE}}))
    return 0


def resolved_config(cfg, world_size: int) -> str:
    """What `train --print-config` prints: the resolved config as YAML, then, as a second YAML document,
    what it derives on `world_size` ranks (precision, batch plan, the DeepSpeed JSON). Starts no process
    group and writes no file; the checks that need the data or the run folder wait for the run."""
    import dataclasses
    import textwrap

    import yaml

    from megatrain import precision
    from megatrain.config import batch_plan, to_dict, validate
    from megatrain.parallel.dims import device_type
    from megatrain.parallel.zero import deepspeed_config

    dims = validate(cfg, world_size)
    plan = batch_plan(cfg, dims)
    # `auto` as this machine's ranks would resolve it (a run's ranks also agree with each other).
    choice = precision.choose(cfg.precision, device_type(), cfg.parallel.zero_stage)
    ds = deepspeed_config(dataclasses.replace(cfg, precision=choice.precision), dims)
    derived = {"world_size": world_size, "precision": choice.precision, "precision_reason": choice.reason,
               "batch_plan": {"micro_batch_size": plan.micro_batch_size, "accumulation_steps": plan.accumulation,
                              "data_parallel_ranks": plan.dp, "global_batch_size": plan.global_batch_size,
                              "tp_degree": dims.tp, "ep_degree": dims.ep}}
    return ("# resolved config: defaults < CONFIG < command-line overrides\n"
            + yaml.safe_dump(to_dict(cfg), sort_keys=False)
            + f"---\n# derived on {world_size} rank(s) (--nproc); not config keys\n"
            + yaml.safe_dump(derived, sort_keys=False)
            + "# the DeepSpeed JSON (megatrain/parallel/zero.py deepspeed_config)\n"
            + "deepspeed_config:\n" + textwrap.indent(json.dumps(ds, indent=2), "  ") + "\n")


def _load(args):
    from megatrain.checkpoint import CONFIG_NAME, resolve
    from megatrain.config import load_config
    from megatrain.data.tokenizer import Tokenizer
    from megatrain.export import require_hf
    from megatrain.model import family
    from megatrain.parallel.dims import device_type
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stdout/stderr carry only the answer or the JSON
    require_hf(args.checkpoint)
    path = resolve(args.checkpoint)
    cfg = load_config(path / CONFIG_NAME)
    placement = offload_placement(args.max_memory, args.offload_folder, device_type())
    # The whole, unsharded export, whatever the run's layout.
    model = family(cfg.model.family).load_hf(path / "hf", device_type(), **placement)
    return cfg, model.eval(), Tokenizer(path / "hf" / "tokenizer.model")


def offload_placement(max_memory: str | None, offload_folder: str | None, device: str) -> dict:
    """from_pretrained arguments that keep at most `max_memory` (e.g. 2GiB, 500MB) of weights on the
    device that computes (GPU 0, else the CPU) and the rest on the CPU (with a GPU) or in
    `offload_folder` on disk; accelerate loads each layer's weights in when the layer runs."""
    if not max_memory:
        if offload_folder:
            raise MegatrainError("--offload-folder needs --max-memory: the budget decides what goes to disk")
        return {}
    from accelerate.utils import convert_file_size_to_int

    try:  # accelerate's own parser of the value, so what passes here is what it accepts later
        if convert_file_size_to_int(max_memory) <= 0:
            raise ValueError(max_memory)
    except ValueError:
        raise MegatrainError(f"--max-memory {max_memory}: not a size; give a number and a unit, e.g. 4GiB or "
                             "500MB") from None
    if device == "cpu" and not offload_folder:
        raise MegatrainError("--max-memory on a machine without a GPU needs --offload-folder DIR for the weights "
                             "that do not fit (they are read back from there layer by layer)")
    budget = {0: max_memory, "cpu": "1024GiB"} if device == "cuda" else {"cpu": max_memory}
    return {"device_map": "auto", "max_memory": budget,
            **({"offload_folder": offload_folder} if offload_folder else {})}


def _eval(args, overrides: list[str]) -> int:
    from megatrain.config import apply_overrides
    from megatrain.eval.qa import evaluate, load_problems
    from megatrain.parallel.dims import World

    cfg, model, tokenizer = _load(args)
    if overrides:  # e.g. --eval.released=... to score another folder
        cfg = apply_overrides(cfg, overrides)
    limit = args.limit or cfg.eval.final_limit
    result = evaluate(model, tokenizer, load_problems(cfg, limit), World(0, 0, 1, "cpu"), cfg.eval.batch_size,
                      cfg.eval.max_new_tokens, cfg.model.max_seq_len)
    print(json.dumps(result))
    return 0


def _generate(args, overrides: list[str]) -> int:
    from megatrain.eval.qa import generate_answers

    if overrides:
        raise MegatrainError(f"generate takes no overrides, got {' '.join(overrides)}")
    cfg, model, tokenizer = _load(args)
    print(generate_answers(model, tokenizer, [args.question], cfg.eval.max_new_tokens, cfg.model.max_seq_len)[0])
    return 0


def _export(args, overrides: list[str]) -> int:
    from megatrain.export import export_checkpoint, find_checkpoint

    if overrides:
        raise MegatrainError(f"export takes no overrides, got {' '.join(overrides)}")
    print(export_checkpoint(find_checkpoint(args.run_dir, args.step), args.out, workers=args.workers))
    return 0


# ----------------------------------------------------------------------------- plan (megatrain/plan.py)

def _plan(args, overrides: list[str]) -> int:
    from megatrain.plan import Cluster, format_plan, run

    cluster = Cluster(args.nodes, args.gpus_per_node, args.gpu_memory_gb, args.gpu)
    result = run(args.config, overrides, cluster, args.mfu, args.vocab_size)
    print(json.dumps(result) if args.json else format_plan(result))
    return 0


def _add_plan_command(sub) -> None:
    pl = sub.add_parser("plan", help="per-GPU memory, fit and cost of CONFIG on a cluster, from the model built on the "
                                     "meta device (no GPU, no weights); --section.key=value overrides it")
    pl.add_argument("config")
    pl.add_argument("--nodes", type=int, required=True)
    pl.add_argument("--gpus-per-node", type=int, required=True)
    pl.add_argument("--gpu-memory-gb", type=float, required=True, help="memory of one GPU, GiB (A100-40GB: 40)")
    pl.add_argument("--gpu", default="A100", help="peak-FLOPs table entry for the time estimate (A100, H100, ...)")
    pl.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization (default 0.4)")
    pl.add_argument("--vocab-size", type=int, default=None,
                    help="vocabulary to size the model with when neither model.from_pretrained nor the data is here")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(run=_plan)


# ----------------------------------------------------------------------------- SLURM (megatrain/launch/slurm.py)

def _submit(args, overrides: list[str]) -> int:
    from megatrain.launch.slurm import Resources, submit

    res = Resources(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                    cpus_per_task=args.cpus_per_task, partition=args.partition, time_min=args.time,
                    account=args.account, qos=args.qos, constraint=args.constraint, mem=args.mem,
                    signal_delay_s=args.signal_delay)
    submit(args.config, overrides, res, sweeps=args.sweep, dry_run=args.dry_run)
    return 0


def _status(args, overrides: list[str]) -> int:
    from megatrain.launch.status import format_status, run_status

    if overrides:
        raise MegatrainError(f"status takes no overrides, got {' '.join(overrides)}")
    status = run_status(args.run_dir)
    print(json.dumps(status) if args.json else format_status(status))
    return 0


def _add_slurm_commands(sub) -> None:
    s = sub.add_parser("submit", help="submit CONFIG to SLURM through submitit (one task per GPU); "
                                      "--section.key=value overrides it")
    s.add_argument("config")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one task (rank) each")
    s.add_argument("--tasks-per-node", type=int, default=None, help="ranks per node where there are no GPUs")
    s.add_argument("--cpus-per-task", type=int, default=None)
    s.add_argument("--partition", default=None, help="default: the cluster's default partition")
    s.add_argument("--time", type=int, default=60, help="time limit in minutes (the job requeues itself at it)")
    s.add_argument("--account", default=None)
    s.add_argument("--qos", default=None)
    s.add_argument("--constraint", default=None)
    s.add_argument("--mem", default=None, help="memory per node, SLURM syntax (64G)")
    s.add_argument("--signal-delay", type=int, default=90,
                   help="seconds before the time limit at which the job checkpoints and requeues")
    s.add_argument("--sweep", action="append", default=[], metavar="KEY=v1,v2",
                   help="one run per value, all in one job array; repeat for a grid")
    s.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    s.set_defaults(run=_submit)
    st = sub.add_parser("status", help="state, step, last loss, restarts and SLURM jobs of a run folder")
    st.add_argument("run_dir")
    st.add_argument("--json", action="store_true")
    st.set_defaults(run=_status)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help may end with text made only when help is printed: train's lists every
    config key, which needs megatrain.config and so torch, seconds of import no other command should pay."""

    def __init__(self, *args, help_suffix=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.help_suffix = help_suffix

    def format_help(self) -> str:
        return super().format_help() + ("\n" + self.help_suffix() if self.help_suffix else "")


def _config_keys_help() -> str:
    from megatrain.config_docs import help_text

    return help_text()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatrain", description=__doc__)
    # The deepspeed launcher passes --local_rank=N (before our arguments); LOCAL_RANK in the
    # environment says the same, so it is accepted and ignored.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train from a YAML recipe; --section.key=value overrides it",
                       help_suffix=_config_keys_help)
    t.add_argument("config")
    t.add_argument("--nproc", type=int, default=1, help="start this many local ranks (no launcher needed)")
    t.add_argument("--resume", action="store_true", help="continue from <run.dir>/checkpoints/latest")
    t.add_argument("--auto-resume", action="store_true",
                   help="resume when the run folder has a checkpoint, else start fresh (for requeued jobs)")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved config and what it derives on --nproc ranks (batch plan, DeepSpeed "
                        "JSON), then exit without starting anything")
    t.set_defaults(run=_train)
    e = sub.add_parser("eval", help="exact match of a checkpoint on its eval split")
    e.add_argument("checkpoint", help="checkpoints/step_<N>, or a run folder (its latest checkpoint)")
    e.add_argument("--limit", type=int, default=0, help="problems to score (default eval.final_limit)")
    g = sub.add_parser("generate", help="greedy answer of a checkpoint to one question")
    g.add_argument("checkpoint")
    g.add_argument("question")
    for command in (e, g):
        command.add_argument("--max-memory", default=None, metavar="SIZE",
                             help="weights kept on the computing device (e.g. 4GiB, 500MB), for a model larger "
                                  "than the memory you allow; the rest is offloaded (see --offload-folder)")
        command.add_argument("--offload-folder", default=None, metavar="DIR",
                             help="where weights beyond --max-memory wait on disk (required without a GPU)")
    e.set_defaults(run=_eval)
    g.set_defaults(run=_generate)
    x = sub.add_parser("export", help="write a checkpoint's model as a Hugging Face folder, on this one CPU process "
                                      "(no ranks, no GPU), from DeepSpeed's files")
    x.add_argument("run_dir", help="a run folder (its latest checkpoint, or --step), or checkpoints/step_<N>")
    x.add_argument("--step", type=int, default=None, help="the checkpoint of this step (checkpoints/step_<N>)")
    x.add_argument("--out", required=True, help="the folder to write (new or empty)")
    x.add_argument("--workers", type=int, default=1,
                   help="processes of DeepSpeed's universal-checkpoint conversion (tensor-parallel checkpoints); "
                        "each holds one rank's optimizer file in memory")
    x.set_defaults(run=_export)
    _add_slurm_commands(sub)
    _add_plan_command(sub)
    return p


def entry() -> None:
    """`megatrain ...` and `python -m megatrain ...`: main(), then out without the interpreter's teardown.

    What a command writes is closed by then (atomic writes, metrics.close(), the loader's workers stopped,
    the process group destroyed), and the exit handlers a normal exit runs first still run (logging,
    multiprocessing, TensorBoard). Skipped is the finalization after them: clearing torch's, DeepSpeed's
    and transformers' modules and running C++ static destructors, 1.3 s of every process measured here
    (2026-12-07) and the place where gloo's TCPStore teardown can abort a rank (see main()'s error path).
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args, rest = parser().parse_known_args(argv)
    try:
        return args.run(args, rest)
    except MegatrainError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            # Every rank reached the same verdict (checks after init are collective) and what it wrote is
            # on disk (atomic writes, a line-buffered metrics.jsonl), so the rank ends here, before the C++
            # teardown of its process groups and TCPStore: that teardown aborted rank 0 of a 2-rank exit
            # ("terminate called without an active exception", exit -6 instead of 2) about once in 50
            # such exits here and in CI, with destroy_process_group() called first (without it, often).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
