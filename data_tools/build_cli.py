"""The `build` and `tokenizer train` subcommands of `megatrain-data`, and `verify` of token shards.

    megatrain-data build --source NAME=PATH ... --tokenizer PATH --out DIR [--seq-len 2048]
        [--rows-per-block 64] [--workers N] [--shard-mb 64] [--on-bad-utf8 replace|skip|error]
        [--add-bos] [--name NAME]
    megatrain-data tokenizer train SOURCE ... --vocab-size N --out DIR
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from data_tools.build import DEFAULT_ROWS_PER_BLOCK, DEFAULT_SEQ_LEN, DEFAULT_SHARD_MB
from data_tools.sources import BAD_UTF8_POLICIES, parse_source

_SOURCE_HELP = "[NAME=][KIND:]PATH[#KEY=VALUE&...]; KIND in jsonl, parquet, files, hf_disk, deepmind (see data_tools/sources.py)"


def add_build_commands(commands: argparse._SubParsersAction) -> None:
    """Registers `build` and `tokenizer` on megatrain-data's subcommand parser."""
    build = commands.add_parser("build", help="tokenize documents into pre-packed token shards (resumable)")
    build.add_argument("--source", required=True, action="append", help=_SOURCE_HELP)
    build.add_argument("--tokenizer", required=True, type=Path,
                       help="sentencepiece .model, or a folder with tokenizer.json (HF) or tokenizer.model")
    build.add_argument("--out", required=True, type=Path, help="dataset folder (rerun the same command to resume)")
    build.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help=f"tokens per row ({DEFAULT_SEQ_LEN})")
    build.add_argument("--rows-per-block", type=int, default=DEFAULT_ROWS_PER_BLOCK,
                       help=f"rows per block ({DEFAULT_ROWS_PER_BLOCK})")
    build.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: every core)")
    build.add_argument("--shard-mb", type=float, default=DEFAULT_SHARD_MB,
                       help=f"MB of text per shard ({DEFAULT_SHARD_MB:g})")
    build.add_argument("--on-bad-utf8", choices=BAD_UTF8_POLICIES, default="replace",
                       help="documents with bytes that are not UTF-8 (default replace)")
    build.add_argument("--add-bos", action="store_true", help="start each document with the bos token")
    build.add_argument("--name", default=None, help="dataset name (default: the --out folder's name)")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.set_defaults(run=_run_build)

    tokenizer = commands.add_parser("tokenizer", help="tokenizer tools")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True)
    train = tokenizer_commands.add_parser("train", help="train a whitespace-keeping sentencepiece BPE on sources")
    train.add_argument("sources", nargs="+", metavar="SOURCE", help=_SOURCE_HELP)
    train.add_argument("--vocab-size", type=int, required=True, help="e.g. 32000")
    train.add_argument("--out", required=True, type=Path, help="folder to write tokenizer.model into")
    train.add_argument("--max-sentences", type=int, default=2_000_000,
                       help="train on a seeded sample of this many text chunks (2M)")
    train.add_argument("--on-bad-utf8", choices=BAD_UTF8_POLICIES, default="replace")
    train.set_defaults(run=_run_tokenizer_train)


def run_verify_tokens(shard_dir: Path) -> None:
    """`megatrain-data verify DIR` for a token-shard dataset."""
    from data_tools.verify import verify_token_dataset

    summary = verify_token_dataset(shard_dir)
    sample = (summary["sample"] or "")[:60].replace("\n", "\\n")
    print(
        f"OK {shard_dir}: {summary['shards']} shards, {summary['blocks']} blocks, {summary['rows']} rows, "
        f"{summary['tokens']} tokens, {summary['documents']} documents; first document decodes as {sample!r}"
    )


def _run_build(args: argparse.Namespace) -> None:
    from data_tools.build import build_dataset

    start = time.perf_counter()
    # Parsed here, not by argparse `type=`: argparse would swap DataError's message for a generic one.
    manifest = build_dataset(
        [parse_source(text) for text in args.source], args.tokenizer, args.out, seq_len=args.seq_len, rows_per_block=args.rows_per_block,
        workers=args.workers, shard_mb=args.shard_mb, name=args.name, on_bad_utf8=args.on_bad_utf8,
        add_bos=args.add_bos, progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    bad = sum(stats["bad_utf8"] for stats in manifest["sources"].values())
    print(
        f"wrote {manifest['documents']} documents, {manifest['tokens']} tokens, {len(manifest['shards'])} shards "
        f"({manifest['dtype']}, vocab {manifest['vocab_size']}) to {args.out} in {seconds:.1f}s "
        f"({manifest['tokens'] / max(seconds, 1e-9) / 1e6:.2f} Mtok/s); {bad} documents had bad UTF-8"
    )


def _run_tokenizer_train(args: argparse.Namespace) -> None:
    from data_tools.tokenizer import train_tokenizer_on_sources

    start = time.perf_counter()
    model_path = train_tokenizer_on_sources(
        [parse_source(text) for text in args.sources], args.out, vocab_size=args.vocab_size, max_sentences=args.max_sentences,
        on_bad_utf8=args.on_bad_utf8,
    )
    print(f"wrote {model_path} in {time.perf_counter() - start:.1f}s")
