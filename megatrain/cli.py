"""`megatrain train | eval | generate`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatrain.errors import MegatrainError


def _train(args, overrides: list[str]) -> int:
    from megatrain.config import load_config
    from megatrain.train import preflight, train

    cfg = load_config(args.config, overrides)
    if args.auto_resume:
        from pathlib import Path
        args.resume = (Path(cfg.run.dir) / "checkpoints" / "latest").is_file()
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from launch.local import run_local

        preflight(cfg, args.nproc, args.resume)  # fail here, once, before starting any rank
        argv = ["train", args.config, *(["--resume"] if args.resume else []), *overrides]
        return run_local(args.nproc, argv)
    summary = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", 0)) == 0 and summary.get("n"):
        print(json.dumps({k: summary[k] for k in ("n", "exact_match", "numeric_match",
                                                   "teacher_forced_exact_match")}))
    return 0


def _load(checkpoint: str):
    from megatrain.checkpoint import resolve
    from megatrain.config import load_config
    from megatrain.data.tokenizer import Tokenizer
    from megatrain.model.llama import pick_attention
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stdout/stderr carry only the answer or the JSON
    path = resolve(checkpoint)
    cfg = load_config(path / "config.yaml")
    model = LlamaForCausalLM.from_pretrained(path / "hf", attn_implementation=pick_attention("auto", "cpu"),
                                             dtype="float32")
    return cfg, model.eval(), Tokenizer(path / "hf" / "tokenizer.model")


def _eval(args, overrides: list[str]) -> int:
    from megatrain.config import apply_overrides
    from megatrain.evaluate import evaluate
    from megatrain.parallel.dims import World
    from megatrain.train import load_problems

    cfg, model, tokenizer = _load(args.checkpoint)
    if overrides:  # e.g. --data.eval_released=... to score another folder
        cfg = apply_overrides(cfg, overrides)
    limit = args.limit or cfg.eval.final_limit
    result = evaluate(model, tokenizer, load_problems(cfg, limit), World(0, 0, 1, "cpu"), cfg.eval.batch_size,
                      cfg.eval.max_new_tokens, cfg.model.max_seq_len)
    print(json.dumps(result))
    return 0


def _generate(args, overrides: list[str]) -> int:
    from megatrain.evaluate import generate_answers

    if overrides:
        raise MegatrainError(f"generate takes no overrides, got {' '.join(overrides)}")
    cfg, model, tokenizer = _load(args.checkpoint)
    print(generate_answers(model, tokenizer, [args.question], cfg.eval.max_new_tokens, cfg.model.max_seq_len)[0])
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatrain", description=__doc__)
    # The deepspeed launcher passes --local_rank=N (before our arguments); LOCAL_RANK in the
    # environment says the same, so it is accepted and ignored.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from a YAML recipe; --section.key=value overrides it")
    t.add_argument("config")
    t.add_argument("--nproc", type=int, default=1, help="start this many local ranks (no launcher needed)")
    t.add_argument("--resume", action="store_true", help="continue from <run.dir>/checkpoints/latest")
    t.add_argument("--auto-resume", action="store_true",
                   help="resume when the run folder has a checkpoint, else start fresh (for requeued jobs)")
    t.set_defaults(run=_train)
    e = sub.add_parser("eval", help="exact match of a checkpoint on its eval split")
    e.add_argument("checkpoint", help="checkpoints/step_<N>, or a run folder (its latest checkpoint)")
    e.add_argument("--limit", type=int, default=0, help="problems to score (default eval.final_limit)")
    e.set_defaults(run=_eval)
    g = sub.add_parser("generate", help="greedy answer of a checkpoint to one question")
    g.add_argument("checkpoint")
    g.add_argument("question")
    g.set_defaults(run=_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    args, rest = parser().parse_known_args(argv)
    try:
        return args.run(args, rest)
    except MegatrainError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            # Every rank reached the same verdict (checks after init are collective); leaving the
            # group keeps gloo's teardown at exit from aborting the process over it.
            dist.destroy_process_group()
        return 2
