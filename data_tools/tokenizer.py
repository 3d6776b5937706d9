"""Train the sentencepiece BPE tokenizer used for the Q/A shards.

Options follow the LLaMA recipe (data.md): identity normalization, whitespace kept, digits split one
per token and byte fallback, so every string round-trips exactly and numbers tokenize uniformly.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece

from megatrain.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, SEP_PIECE, UNK_ID
from megatrain.errors import DataError

DEFAULT_VOCAB_SIZE = 512
"""Enough for a single DeepMind module (linear_1d uses ~60 distinct characters)."""


def train_tokenizer(
    texts: Iterable[str],
    out_prefix: str | Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
    max_sentences: int | None = None,
) -> Path:
    """Trains a sentencepiece BPE model and writes `<out_prefix>.model`.

    The same texts (and seed) give a byte-identical model: training is single-threaded.

    Args:
        texts: Training sentences, e.g. every question and answer.
        out_prefix: Output path without the ".model" suffix; its folder is created.
        vocab_size: Target vocabulary size; a corpus too small to reach it gives a smaller one.
        seed: Seeds sentencepiece's sampling of `max_sentences` sentences.
        max_sentences: Train on a random sample of this many sentences (None: all of them).

    Returns:
        Path of the written `.model` file.

    Raises:
        DataError: `texts` is empty or `vocab_size` is too small for the byte, special and
            character pieces.
    """
    out_path = Path(f"{out_prefix}.model")
    # 256 byte pieces + pad/unk/bos/eos + <sep> is the floor; sentencepiece adds one piece per
    # distinct character on top, which only it can count (handled below).
    minimum_vocab_size = 256 + 5
    if vocab_size < minimum_vocab_size:
        raise DataError(f"--vocab-size {vocab_size} is too small; byte fallback needs at least {minimum_vocab_size}")
    sentences = (text for text in texts if text)
    first = next(sentences, None)
    if first is None:
        raise DataError(f"no text to train the tokenizer {out_path} on; check the released module files")
    model_buffer = io.BytesIO()
    sentencepiece.set_random_generator_seed(seed)
    try:
        _train(_chain(first, sentences), model_buffer, vocab_size, max_sentences)
    except RuntimeError as error:
        # Every distinct character gets a piece on top of the byte and special pieces.
        too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(error))
        if too_small is None:
            raise
        raise DataError(
            f"--vocab-size {vocab_size} is too small for this corpus (its characters, 256 byte pieces and "
            f"the specials need {too_small.group(2)}); raise --vocab-size"
        ) from None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    temp_path.write_bytes(model_buffer.getvalue())
    os.replace(temp_path, out_path)
    return out_path


def _train(sentences: Iterable[str], model_writer: io.BytesIO, vocab_size: int, max_sentences: int | None) -> None:
    """Runs the sentencepiece trainer with the fixed megatrain options."""
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model_writer,
        model_type="bpe",
        vocab_size=vocab_size,
        split_digits=True,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=False,
        character_coverage=1.0,
        num_threads=1,  # multi-threaded BPE merges are not reproducible
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        user_defined_symbols=[SEP_PIECE],
        hard_vocab_limit=False,  # a tiny corpus yields a smaller vocab instead of an error
        input_sentence_size=max_sentences or 0,
        shuffle_input_sentence=True,
        minloglevel=2,  # sentencepiece logs every training step to stderr otherwise
    )


def _chain(first: str, rest: Iterable[str]):
    """Yields `first` then `rest` (the first item was consumed to detect an empty corpus)."""
    yield first
    yield from rest


def train_tokenizer_on_sources(
    specs,
    out_dir: str | Path,
    vocab_size: int,
    max_sentences: int | None = 2_000_000,
    on_bad_utf8: str = "replace",
    seed: int = 0,
) -> Path:
    """Trains the whitespace-keeping sentencepiece BPE on documents and writes `out_dir/tokenizer.model`.

    Documents are fed in chunks of whole lines (newlines kept, at most ~4 KB each): sentencepiece
    drops any "sentence" over its `max_sentence_length` (4192 bytes), and whole files of LaTeX or
    Coq are far longer.

    Args:
        specs: `data_tools.sources.SourceSpec`s, read in order.
        out_dir: Folder to create; `load_tokenizer(out_dir)` then finds the model.
        vocab_size: Target vocabulary size.
        max_sentences: Seeded sample of this many chunks (None: all).
        on_bad_utf8: "replace", "skip" or "error", as for `megatrain-data build`.
        seed: Seeds the sample.

    Returns:
        The written `tokenizer.model` path.
    """
    from data_tools.sources import iter_documents

    def chunks():
        for spec in specs:
            for document in iter_documents(spec, on_bad_utf8):
                yield from _line_chunks(document.text)

    return train_tokenizer(chunks(), Path(out_dir) / "tokenizer", vocab_size=vocab_size, seed=seed,
                           max_sentences=max_sentences)


def _line_chunks(text: str, limit: int = 4000):
    """Splits text into chunks of whole lines of at most `limit` UTF-8 bytes (longer lines are cut)."""
    chunk, size = [], 0
    for line in text.splitlines(keepends=True):
        line_size = len(line.encode("utf-8"))
        if chunk and size + line_size > limit:
            yield "".join(chunk)
            chunk, size = [], 0
        while line_size > limit:
            # A single overlong line: cut by characters (a quarter of the byte limit is always safe).
            yield line[: limit // 4]
            line = line[limit // 4 :]
            line_size = len(line.encode("utf-8"))
        chunk.append(line)
        size += line_size
    if chunk:
        yield "".join(chunk)
