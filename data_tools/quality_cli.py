"""The data-quality subcommands of `megatrain-data`: inspect, decontaminate, dedup.

    megatrain-data inspect DATASET [--samples N] [--histogram PATH.png] [--json]
    megatrain-data decontaminate SOURCE... --against EVAL... [--ngram 13] --report REPORT.json
                                 [--out CLEAN.jsonl.zst]
    megatrain-data dedup SOURCE... --out DEDUPED.jsonl.zst [--near] [--threshold 0.8]
                         [--num-perm 128] [--shingle 5] --report REPORT.json

SOURCE and EVAL use `build`'s source syntax (`data_tools.sources.parse_source`), e.g.
`arxiv=data/arxiv/*.jsonl.zst` or `test=deepmind:released#module=algebra__linear_1d&splits=interpolate`.
Outputs (`--out`, `--report`, `--histogram`) are written atomically and never replace an existing
file without `--overwrite`. `--out` files are Proof-Pile-2 style `{"text", "meta"}` jsonl.zst with
the original source and id in `meta`, so they can be given to `build` or another pass directly.

Kept apart from `cli.py` so the commands can evolve without touching the build commands' code;
`cli.py` registers them with `add_quality_commands`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

from megatrain.errors import DataError

_DEEPMIND = "deepmind"


def add_quality_commands(commands: argparse._SubParsersAction) -> None:
    """Adds the inspect, decontaminate and dedup subparsers to `megatrain-data`'s subcommands."""
    from data_tools.decontaminate import DEFAULT_NGRAM
    from data_tools.dedup import DEFAULT_NUM_PERM, DEFAULT_SHINGLE, DEFAULT_THRESHOLD
    from data_tools.inspect_dataset import DEFAULT_SAMPLES

    inspect = commands.add_parser("inspect", help="statistics, samples and a length histogram of a built dataset")
    inspect.add_argument("dataset", type=Path, help="folder made by `megatrain-data build`")
    inspect.add_argument("--samples", type=_non_negative_int, default=DEFAULT_SAMPLES,
                         help=f"documents to decode, spread over the dataset (default {DEFAULT_SAMPLES})")
    inspect.add_argument("--histogram", type=Path, help="save a document-length histogram to this .png")
    inspect.add_argument("--json", action="store_true", help="print the statistics as JSON")
    inspect.add_argument("--overwrite", action="store_true", help="replace an existing --histogram file")
    inspect.set_defaults(run=_run_inspect)

    decontaminate = commands.add_parser(
        "decontaminate", help="find training documents sharing an n-gram with eval sets (and drop them)"
    )
    decontaminate.add_argument("sources", nargs="+", metavar="SOURCE", help="training source, NAME=PATH (as build)")
    decontaminate.add_argument("--against", nargs="+", action="extend", required=True, metavar="EVAL",
                               help="eval source(s), same syntax; DeepMind problems are matched by their question")
    decontaminate.add_argument("--ngram", type=_positive_int, default=DEFAULT_NGRAM,
                               help=f"gram length in normalized words (default {DEFAULT_NGRAM}, as GPT-3/LLEMMA)")
    decontaminate.add_argument("--report", type=Path, required=True, help="JSON report to write")
    decontaminate.add_argument("--out", type=Path, help="write the surviving documents to this .jsonl.zst")
    _add_common_options(decontaminate)
    decontaminate.set_defaults(run=_run_decontaminate)

    dedup = commands.add_parser("dedup", help="drop exact (and with --near, MinHash near-) duplicate documents")
    dedup.add_argument("sources", nargs="+", metavar="SOURCE", help="source, NAME=PATH (as build); order matters")
    dedup.add_argument("--out", type=Path, required=True, help="write the kept documents to this .jsonl.zst")
    dedup.add_argument("--report", type=Path, required=True, help="JSON report to write")
    dedup.add_argument("--near", action="store_true", help="also drop near-duplicates (MinHash LSH)")
    dedup.add_argument("--threshold", type=_fraction, default=DEFAULT_THRESHOLD,
                       help=f"Jaccard similarity of a near-duplicate (default {DEFAULT_THRESHOLD})")
    dedup.add_argument("--num-perm", type=_positive_int, default=DEFAULT_NUM_PERM,
                       help=f"MinHash permutations (default {DEFAULT_NUM_PERM})")
    dedup.add_argument("--shingle", type=_positive_int, default=DEFAULT_SHINGLE,
                       help=f"words per MinHash shingle (default {DEFAULT_SHINGLE})")
    _add_common_options(dedup)
    dedup.set_defaults(run=_run_dedup)


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    from data_tools.sources import BAD_UTF8_POLICIES

    parser.add_argument("--on-bad-utf8", choices=BAD_UTF8_POLICIES, default="replace",
                        help="documents with bytes that are not UTF-8: replace them (default), skip, or error")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --out/--report files")


def _run_inspect(args: argparse.Namespace) -> None:
    from data_tools.inspect_dataset import format_inspection, inspect_dataset
    from data_tools.outputs import check_out_path

    if args.histogram is not None:
        if args.histogram.suffix.lower() != ".png":
            raise DataError(f"--histogram {args.histogram} must end in .png")
        check_out_path(args.histogram, args.overwrite, "--histogram")
    info = inspect_dataset(args.dataset, samples=args.samples, histogram=args.histogram)
    print(json.dumps(info, indent=2, ensure_ascii=False) if args.json else format_inspection(info))


def _run_decontaminate(args: argparse.Namespace) -> None:
    from data_tools.decontaminate import EvalNgramIndex, filter_contaminated
    from data_tools.outputs import write_json

    specs, eval_specs = _parse_sources(args.sources, "SOURCE"), _parse_sources(args.against, "--against")
    _check_outputs(args)
    start = time.perf_counter()
    index = EvalNgramIndex(_eval_documents(eval_specs, args.on_bad_utf8), ngram=args.ngram)
    index_seconds = time.perf_counter() - start
    input_stats: dict[str, dict] = {}
    report: dict = {}
    kept = filter_contaminated(_documents(specs, args.on_bad_utf8, input_stats), index, report)
    _drain_or_write(kept, args.out)
    seconds = time.perf_counter() - start
    megabytes = sum(stats["bytes"] for stats in input_stats.values()) / 1e6
    full_report = {
        "command": "decontaminate",
        "ngram": args.ngram,
        "normalization": "NFKC, casefold, words = runs of \\w (punctuation ignored); eval texts shorter than "
                         "ngram words are one whole-text gram; DeepMind eval problems use their question",
        "eval": {"sources": {spec.name: str(spec) for spec in eval_specs}, "documents": index.stats,
                 "unique_ngrams": index.num_unique_ngrams},
        "out": str(args.out) if args.out else None,
        **report,
        "input": input_stats,
        "seconds": {"eval_index": round(index_seconds, 2), "total": round(seconds, 2)},
    }
    write_json(args.report, full_report)
    print(f"checked {report['documents']:,} documents ({megabytes:.1f} MB) against {index.num_eval_documents:,} eval "
          f"documents ({index.num_unique_ngrams:,} distinct grams) in {seconds:.1f}s "
          f"({megabytes / max(seconds, 1e-9):.1f} MB/s)")
    for name, counts in report["sources"].items():
        print(f"  {name}: {counts['contaminated']:,} of {counts['documents']:,} contaminated")
    print(f"report: {args.report}" + (f"; kept {report['kept']:,} documents in {args.out}" if args.out else ""))


def _run_dedup(args: argparse.Namespace) -> None:
    from data_tools.dedup import Deduplicator, filter_duplicates
    from data_tools.outputs import write_json

    specs = _parse_sources(args.sources, "SOURCE")
    _check_outputs(args)
    start = time.perf_counter()
    deduplicator = Deduplicator(near=args.near, threshold=args.threshold, num_perm=args.num_perm,
                                shingle=args.shingle)
    input_stats: dict[str, dict] = {}
    report: dict = {}
    _drain_or_write(filter_duplicates(_documents(specs, args.on_bad_utf8, input_stats), deduplicator, report),
                    args.out)
    seconds = time.perf_counter() - start
    megabytes = sum(stats["bytes"] for stats in input_stats.values()) / 1e6
    full_report = {
        "command": "dedup",
        "near": args.near,
        "settings": {"threshold": args.threshold, "num_perm": args.num_perm, "shingle": args.shingle}
        if args.near else {},
        "out": str(args.out),
        **report,
        "input": input_stats,
        "seconds": round(seconds, 2),
    }
    write_json(args.report, full_report)
    print(f"read {report['documents']:,} documents ({megabytes:.1f} MB) in {seconds:.1f}s "
          f"({megabytes / max(seconds, 1e-9):.1f} MB/s): {report['exact_duplicates']:,} exact and "
          f"{report['near_duplicates']:,} near duplicates removed, {report['kept']:,} kept in {args.out}")
    print(f"report: {args.report}")


def _parse_sources(texts: list[str], flag: str) -> list:
    """Parses source specs and refuses two with the same name (their ids would collide)."""
    from data_tools.sources import parse_source

    specs = [parse_source(text) for text in texts]
    names = [spec.name for spec in specs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataError(f"{flag}: source name(s) {', '.join(repeated)} given twice; name them, e.g. a=PATH1 b=PATH2")
    return specs


def _documents(specs: list, on_bad_utf8: str, input_stats: dict) -> Iterator:
    """All documents of `specs` in order; fills input_stats[name] with each source's reader counters."""
    from data_tools.sources import iter_documents

    return itertools.chain.from_iterable(
        iter_documents(spec, on_bad_utf8=on_bad_utf8, stats=input_stats.setdefault(spec.name, {})) for spec in specs
    )


def _eval_documents(specs: list, on_bad_utf8: str) -> Iterator:
    """Eval documents; a DeepMind problem contributes its question only.

    The answer (a few characters, e.g. "-6") would become part of the problem's single gram, and a
    leaked question is contaminating with or without its answer next to it.
    """
    from data_tools.sources import iter_documents

    for spec in specs:
        for document in iter_documents(spec, on_bad_utf8=on_bad_utf8):
            if spec.kind == _DEEPMIND:
                document = dataclasses.replace(document, text=document.text.split("\n", 1)[0])
            yield document


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuses bad output paths before any input is read."""
    from data_tools.outputs import JSONL_ZST_SUFFIX, check_out_path

    check_out_path(args.report, args.overwrite, "--report")
    if args.out is not None:
        if not args.out.name.endswith(JSONL_ZST_SUFFIX):
            raise DataError(f"--out {args.out} must end in {JSONL_ZST_SUFFIX} (the layout `build` reads)")
        check_out_path(args.out, args.overwrite, "--out")
        if args.out.resolve() == args.report.resolve():
            raise DataError("--out and --report name the same file; give two paths")


def _drain_or_write(documents: Iterator, out: Path | None) -> None:
    """Writes `documents` to `out` as jsonl.zst, or just consumes them (report only)."""
    from data_tools.outputs import document_record, write_jsonl_zst

    if out is None:
        for _ in documents:
            pass
        return
    write_jsonl_zst(out, (document_record(document) for document in documents))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value
