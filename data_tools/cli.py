"""`megatrain-data`: generate DeepMind problems, build Q/A shards, verify shards.

    megatrain-data deepmind generate --module algebra__linear_1d --train N --test M --out DIR --seed S
    megatrain-data deepmind shards --released DIR --module M --out SHARD_DIR [--tokenizer PATH]
    megatrain-data verify SHARD_DIR      (Q/A shards or token shards, told apart by the manifest)
    megatrain-data build --source NAME=PATH ... --tokenizer PATH --out DIR   (see build_cli.py)
    megatrain-data tokenizer train SOURCE ... --vocab-size N --out DIR

User mistakes print one `error: ...` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from data_tools.build_cli import add_build_commands, run_verify_tokens
from data_tools.quality_cli import add_quality_commands
from megatrain.data.released import TRAIN_SPLITS, read_split
from megatrain.data.shards import MANIFEST_NAME, ShardSet, file_sha256
from megatrain.errors import DataError, MegatrainError


def main(argv: list[str] | None = None) -> int:
    """Runs the command line and returns the exit status (2 for user errors)."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        # argparse has already printed usage and the error; keep main() returning a status.
        return exit_request.code if isinstance(exit_request.code, int) else 2
    try:
        args.run(args)
    except MegatrainError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatrain-data", description="Build megatrain's data.")
    # No metavar: argparse lists every registered subcommand itself.
    commands = parser.add_subparsers(dest="command", required=True)

    deepmind = commands.add_parser("deepmind", help="DeepMind mathematics dataset tools")
    deepmind_commands = deepmind.add_subparsers(dest="deepmind_command", required=True, metavar="{generate,shards}")

    generate = deepmind_commands.add_parser("generate", help="generate problems in the released text format")
    generate.add_argument("--module", required=True,
                          help="e.g. algebra__linear_1d; several as a,b,c (counts are per module)")
    generate.add_argument("--train", required=True, type=int, help="problems over train-easy/medium/hard")
    generate.add_argument("--test", required=True, type=int, help="problems in interpolate")
    generate.add_argument("--out", required=True, type=Path, help="folder to create")
    generate.add_argument("--seed", type=int, default=0, help="same seed gives byte-identical files")
    generate.add_argument("--workers", type=int, default=None, help="processes (default min(2, cpu_count))")
    generate.set_defaults(run=_run_generate)

    shards = deepmind_commands.add_parser("shards", help="tokenize released files into Q/A shards")
    shards.add_argument("--released", required=True, type=Path, help="released-format folder")
    shards.add_argument("--module", required=True,
                        help="e.g. algebra__linear_1d; several as a,b,c (one shard set, loss reported per module)")
    shards.add_argument("--out", required=True, type=Path, help="shard folder to create")
    shards.add_argument(
        "--splits", default=",".join(TRAIN_SPLITS), help="comma-separated split folders, concatenated in order"
    )
    tokenizer = shards.add_mutually_exclusive_group()
    tokenizer.add_argument("--tokenizer", type=Path, help="existing sentencepiece .model (default: train one)")
    tokenizer.add_argument("--vocab-size", type=int, default=None, help="vocab of the trained tokenizer (512)")
    shards.add_argument("--samples-per-shard", type=int, default=None, help="default 8192")
    shards.add_argument("--block-size", type=int, default=None, help="samples per block, default 256")
    shards.add_argument("--overwrite", action="store_true", help="replace an existing shard folder")
    shards.set_defaults(run=_run_shards)

    verify = commands.add_parser("verify", help="check every shard's sha256 against the manifest")
    verify.add_argument("shard_dir", type=Path)
    verify.set_defaults(run=_run_verify)

    add_quality_commands(commands)
    add_build_commands(commands)
    return parser


def _run_generate(args: argparse.Namespace) -> None:
    from data_tools.deepmind import generate_released, parse_modules

    start = time.perf_counter()
    generate_released(args.out, args.module, args.train, args.test, args.seed, workers=args.workers)
    seconds = time.perf_counter() - start
    modules = parse_modules(args.module)
    total = (args.train + args.test) * len(modules)
    rate = total / max(seconds, 1e-9)
    print(f"wrote {total} problems of {', '.join(modules)} to {args.out} in {seconds:.1f}s ({rate:.0f}/s)")


def _run_shards(args: argparse.Namespace) -> None:
    from data_tools.deepmind import parse_modules
    from data_tools.shards import DEFAULT_BLOCK_SIZE, DEFAULT_SAMPLES_PER_SHARD, build_qa_shards
    from data_tools.tokenizer import DEFAULT_VOCAB_SIZE, train_tokenizer

    start = time.perf_counter()
    out_dir: Path = args.out
    _check_shard_out_dir(out_dir, args.overwrite)
    splits = [split.strip() for split in args.splits.split(",") if split.strip()]
    if not splits:
        raise DataError(f"--splits {args.splits!r} names no split; e.g. --splits {','.join(TRAIN_SPLITS)}")
    modules = parse_modules(args.module)
    if not modules:
        raise DataError("--module names no module; e.g. --module algebra__linear_1d")
    by_module = {module: read_split(args.released, module, splits) for module in modules}
    pairs = by_module[modules[0]] if len(modules) == 1 else by_module
    source = {
        "released": str(args.released.resolve()),
        "module": args.module,
        "splits": splits,
        # Hashes pin the exact text the shards were built from.
        "released_sha256": {f"{split}/{module}.txt" if len(modules) > 1 else split:
                            file_sha256(args.released / split / f"{module}.txt")
                            for module in modules for split in splits},
    }

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tokenizer_path = args.tokenizer
        if tokenizer_path is None:
            vocab_size = args.vocab_size or DEFAULT_VOCAB_SIZE
            texts = [text for module in modules for pair in by_module[module] for text in pair]
            tokenizer_path = train_tokenizer(texts, temp_dir / "trained" / "tokenizer", vocab_size=vocab_size)
        manifest = build_qa_shards(
            pairs,
            tokenizer_path,
            temp_dir / "shards",
            samples_per_shard=args.samples_per_shard or DEFAULT_SAMPLES_PER_SHARD,
            block_size=args.block_size or DEFAULT_BLOCK_SIZE,
            source=source,
        )
        _replace_dir(temp_dir / "shards", out_dir)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    seconds = time.perf_counter() - start
    print(
        f"wrote {manifest['samples']} samples, {manifest['tokens']} tokens, {len(manifest['shards'])} shards "
        f"(vocab {manifest['vocab_size']}) to {out_dir} in {seconds:.1f}s"
    )


def _check_shard_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuses to clobber an existing shard folder (without --overwrite) or any other folder."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    if not (out_dir / MANIFEST_NAME).is_file():
        raise DataError(
            f"{out_dir} exists and is not a shard folder (no {MANIFEST_NAME}); remove it or choose another --out"
        )
    if not overwrite:
        raise DataError(f"{out_dir} already holds shards; pass --overwrite to replace them or choose another --out")


def _replace_dir(new_dir: Path, out_dir: Path) -> None:
    """Moves `new_dir` to `out_dir`, replacing an existing one only after the new one is complete."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        new_dir.rename(out_dir)
        return
    old_dir = new_dir.with_name(f"{new_dir.name}.old")
    out_dir.rename(old_dir)
    new_dir.rename(out_dir)
    shutil.rmtree(old_dir)


def _run_verify(args: argparse.Namespace) -> None:
    from megatrain.data.packed import is_packed_dataset

    if is_packed_dataset(args.shard_dir):
        run_verify_tokens(args.shard_dir)
        return
    shard_set = ShardSet(args.shard_dir)
    shard_set.verify()
    manifest = shard_set.manifest
    print(
        f"OK {args.shard_dir}: {len(manifest['shards'])} shards, {shard_set.num_blocks} blocks, "
        f"{shard_set.num_samples} samples, {manifest['tokens']} tokens"
    )


if __name__ == "__main__":
    sys.exit(main())
