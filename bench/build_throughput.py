"""Build throughput: `megatrain-data build` against the tokenizer's own `encode_batch` on the same text.

The text is the Debian corpus the tests use (pari-doc LaTeX, Coq's standard library `.v` files, gap-doc
HTML, and Coq's coqdoc HTML pages; fetched into ~/.cache/megatrain-tests/debian by
`pytest tests/test_build.py -k debian`), whole sources in that order until about `--mb` MB of text,
nothing repeated or cut; generated documents where the cache is missing. The default takes all four
sources (27.5 MB of text from 107 MB of files) so the build runs for seconds: a data engineer builds
GBs, and the figure should be the steady-state rate, where starting the worker pool weighs little.
`--mb 20` gives the first three sources (17 MB), the corpus of the first measurements.

Both sides run in one process, alternating, with the same tokenizer (trained on the text):

- encode: `tokenizer.encode_batch(all documents)` on text already read and HTML-stripped in this
  process, with the tokenizer's default threading (sentencepiece and HF tokenizers use every core);
- build: `build_dataset` with the default worker count, end to end: reading the files, stripping
  HTML, tokenizing, packing, writing and hashing shards (a fresh output folder each round). Round 0
  also starts the fork server that later builds in this process reuse.

    python bench/build_throughput.py [--tokenizer sentencepiece|hf] [--rounds 3] [--mb 100]

The last line printed is `build/encode ratio: X.XX` (median tokens/s of build over encode). Goal: >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run from a checkout without `pip install -e .`; with it, this is the same folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools.build import build_dataset  # noqa: E402
from data_tools.sources import iter_documents, parse_source  # noqa: E402
from data_tools.tokenizer import train_tokenizer  # noqa: E402
from megatrain.data.tokenizer import load_tokenizer  # noqa: E402

DEBIAN = Path.home() / ".cache" / "megatrain-tests" / "debian" / "unpacked"


def corpus(folder: Path, megabytes: float) -> list[str]:
    """`--source` strings over about `megabytes` MB of real text (or generated text, written to folder)."""
    if (DEBIAN / "libcoq-stdlib" / ".complete").is_file():
        sources = [f"pari-doc={DEBIAN}/pari-doc/usr/share/pari/doc/*.tex",
                   f"coq={DEBIAN}/libcoq-stdlib/usr/lib/ocaml/coq/theories/**/*.v",
                   f"gap-doc={DEBIAN}/gap-doc/usr/share/doc/gap/doc/**/*.html",
                   f"coqdoc={DEBIAN}/libcoq-stdlib/usr/share/doc/libcoq-stdlib/html/*.html"]
    else:
        print("Debian corpus not cached; using generated text", file=sys.stderr)
        import json
        import random

        rng = random.Random(0)
        words = "lemma proof integral ring module prime field group theorem sum forall exists".split()
        with open(folder / "generated.jsonl", "w") as file:
            for index in range(int(megabytes * 1e6 / 2000)):
                text = " ".join(rng.choice(words) for _ in range(300)) + f"\n  Qed. (* {index} *)\n"
                file.write(json.dumps({"text": text}) + "\n")
        return [f"generated={folder}/generated.jsonl"]
    # Repeat nothing and cut nothing: take whole sources until the budget is reached.
    chosen, total = [], 0
    for source in sources:
        chosen.append(source)
        total += sum(len(d.text.encode()) for d in iter_documents(parse_source(source)))
        if total >= megabytes * 1e6:
            break
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", choices=("sentencepiece", "hf"), default="sentencepiece")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mb", type=float, default=100.0, help="about this much text (whole sources)")
    parser.add_argument("--shard-mb", type=float, default=1.0, help="work unit size (more units than workers)")
    parser.add_argument("--as-jsonl", action="store_true",
                        help="first write the documents' text to one jsonl.zst (the Proof-Pile-2 layout) and "
                             "build from that: reading costs decompression only, no HTML stripping")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="build-bench-"))
    try:
        sources = corpus(work, args.mb)
        if args.as_jsonl:
            sources = [as_jsonl_zst(sources, work / "corpus.jsonl.zst")]
        texts = [d.text for s in sources for d in iter_documents(parse_source(s))]
        text_mb = sum(len(t.encode()) for t in texts) / 1e6
        tokenizer_path = train_tokenizer_for(args, texts, work)
        tokenizer = load_tokenizer(tokenizer_path)
        print(f"text: {len(texts)} documents, {text_mb:.1f} MB from {', '.join(s.split('=')[0] for s in sources)}; "
              f"tokenizer: {tokenizer.kind} vocab {tokenizer.vocab_size}; workers: {os.cpu_count()}; "
              f"shard_mb: {args.shard_mb}")
        encode_rates, build_rates = [], []
        for round_index in range(args.rounds):
            for side in (("encode", "build") if round_index % 2 == 0 else ("build", "encode")):
                if side == "encode":
                    start = time.perf_counter()
                    tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts)) + len(texts)  # + eos each
                    encode_rates.append(tokens / (time.perf_counter() - start))
                else:
                    out = work / f"out-{round_index}"
                    start = time.perf_counter()
                    manifest = build_dataset(sources, tokenizer_path, out, shard_mb=args.shard_mb, progress=False)
                    build_rates.append(manifest["tokens"] / (time.perf_counter() - start))
                    shutil.rmtree(out)
            print(f"round {round_index}: encode {encode_rates[-1] / 1e6:.2f} Mtok/s, "
                  f"build {build_rates[-1] / 1e6:.2f} Mtok/s ({manifest['tokens']} tokens, "
                  f"{len(manifest['shards'])} shards)")
        encode, build = statistics.median(encode_rates), statistics.median(build_rates)
        print(f"median: encode {encode / 1e6:.2f} Mtok/s, build {build / 1e6:.2f} Mtok/s "
              f"({build * text_mb / manifest['tokens']:.1f} MB/s of text)")
        print(f"build/encode ratio: {build / encode:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def as_jsonl_zst(sources: list[str], path: Path) -> str:
    """The sources' documents as one `{"text", "meta"}` jsonl.zst file; returns its --source string."""
    import json

    import zstandard

    with zstandard.open(path, "wt", encoding="utf-8") as file:
        for source in sources:
            for document in iter_documents(parse_source(source)):
                file.write(json.dumps({"text": document.text, "meta": {"id": document.id}}) + "\n")
    return f"corpus={path}"


def train_tokenizer_for(args: argparse.Namespace, texts: list[str], work: Path) -> Path:
    """A tokenizer trained on (a sample of) the benchmark text."""
    from data_tools.tokenizer import _line_chunks

    sample = [chunk for text in texts[::4] for chunk in _line_chunks(text)]
    if args.tokenizer == "sentencepiece":
        return train_tokenizer(sample, work / "sp" / "tokenizer", vocab_size=args.vocab_size, max_sentences=200_000)
    import json

    import tokenizers

    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=["<s>", "</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
    tokenizer.train_from_iterator(sample, trainer)
    folder = work / "hf"
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return folder


if __name__ == "__main__":
    main()
