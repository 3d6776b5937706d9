"""Tokenizers: `Tokenizer`, the sentencepiece model of the Q/A shards (with its <sep> piece), and
`load_tokenizer`, which opens a sentencepiece `.model` or a Hugging Face `tokenizer.json` folder for
the pre-packed token shards of `megatrain-data build`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece

from megatrain.errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
"""Special ids fixed at training time (data_tools.tokenizer)."""
SEP_PIECE = "<sep>"
"""User-defined piece the trainer puts between question and answer."""


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SENTENCEPIECE_FILE = "tokenizer.model"


class TextTokenizer:
    """What `megatrain-data build` and the token-shard reader need from a tokenizer.

    Attributes:
        kind: "sentencepiece" or "hf".
        vocab_size: Number of ids (0 .. vocab_size - 1), added tokens included.
        bos_id: Beginning-of-sequence id, or None if the tokenizer has none.
        eos_id: End-of-sequence id (documents end with it).
        pad_id: Padding id; the eos id when the tokenizer has no pad token.
        files: The files that make up the tokenizer (copied into a dataset's `tokenizer/`).
    """

    kind: str
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    files: list[Path]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens skipped."""
        raise NotImplementedError


class SentencePieceTextTokenizer(TextTokenizer):
    """A sentencepiece `.model` file.

    Args:
        model_path: The `.model` file.
        num_threads: Threads of `encode_batch` (None: sentencepiece's default, every core).

    Raises:
        DataError: The file is not a sentencepiece model or has no eos piece.
    """

    kind = "sentencepiece"

    def __init__(self, model_path: str | Path, num_threads: int | None = None):
        model_path = Path(model_path)
        try:
            self._processor = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        except (RuntimeError, OSError) as error:
            raise DataError(f"tokenizer {model_path} is not a valid sentencepiece model ({error}); retrain it")
        self._num_threads = num_threads if num_threads is not None else -1
        self.vocab_size = self._processor.vocab_size()
        # sentencepiece answers -1 for a special piece the model was trained without.
        self.bos_id = self._processor.bos_id() if self._processor.bos_id() >= 0 else None
        if self._processor.eos_id() < 0:
            raise DataError(f"tokenizer {model_path} has no eos piece; documents need one to end with")
        self.eos_id = self._processor.eos_id()
        self.pad_id = self._processor.pad_id() if self._processor.pad_id() >= 0 else self.eos_id
        self.model_path = model_path
        self.files = [model_path]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._processor.encode(list(texts), out_type=int, num_threads=self._num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._processor.decode([int(i) for i in ids])


class Tokenizer(SentencePieceTextTokenizer):
    """The sentencepiece model of the Q/A shards: a `SentencePieceTextTokenizer` with a decode that
    drops every special id, and the `<sep>` piece a decoder reads between question and answer (None
    for a tokenizer without one, e.g. FLAN-T5's spiece.model: a seq2seq model needs none).

    Args:
        model_path: The `.model` file, e.g. `SHARD_DIR/tokenizer.model`.

    Raises:
        DataError: The file is missing or not a sentencepiece model.
    """

    def __init__(self, model_path: str | Path):
        if not Path(model_path).is_file():
            raise DataError(
                f"tokenizer model {model_path} does not exist; train it with `megatrain-data deepmind shards`"
            )
        super().__init__(model_path)
        sep_id = self._processor.piece_to_id(SEP_PIECE)
        # piece_to_id answers unk for unknown pieces, so compare the piece back.
        self.sep_id = sep_id if self._processor.id_to_piece(sep_id) == SEP_PIECE else None
        self._special_ids = frozenset({self.pad_id, self.bos_id, self.eos_id, self.sep_id})

    def encode(self, text: str) -> list[int]:
        """Returns the token ids of `text`, without bos/sep/eos."""
        return self._processor.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        """Returns the text of `ids`, skipping pad/bos/eos/sep and ids outside the vocabulary.

        Out-of-range ids are skipped rather than raised because a model's embedding is often
        padded past the tokenizer's vocab size, and an untrained model may sample those rows.
        """
        kept = [int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) not in self._special_ids]
        return self._processor.decode(kept)


def hf_tokenizer_config(tokenizer: Tokenizer, tokenizer_class: str) -> dict:
    """A `tokenizer_config.json` that makes transformers' AutoTokenizer read a sentencepiece `.model`
    beside it (saved as tokenizer.model) with its special pieces, <sep> among them.

    tokenizer_class: `PreTrainedTokenizerFast` encodes exactly as sentencepiece does (measured with
    transformers 5.24; `LlamaTokenizer` would add a leading "▁"); `T5Tokenizer` also appends <eos>, as
    a T5 encoder reads the question.
    """
    sp = tokenizer._processor
    config = {"tokenizer_class": tokenizer_class}
    for name, piece_id in (("pad", sp.pad_id()), ("unk", sp.unk_id()), ("bos", sp.bos_id()), ("eos", sp.eos_id())):
        if piece_id >= 0:
            config[f"{name}_token"] = sp.id_to_piece(piece_id)
    if tokenizer.sep_id is not None:
        config["additional_special_tokens"] = [SEP_PIECE]
    return config


class HFTextTokenizer(TextTokenizer):
    """A Hugging Face fast tokenizer folder (`tokenizer.json` plus optional configs), read with the
    `tokenizers` library: `transformers` would import torch, which data tools must not.

    Special tokens come from `tokenizer_config.json`, else `special_tokens_map.json` (bos_token,
    eos_token, pad_token; strings or {"content": ...} dicts).

    Args:
        folder: The folder holding `tokenizer.json`.

    Raises:
        DataError: `tokenizer.json` is invalid, or no eos token is named or found in the vocabulary.
    """

    kind = "hf"

    def __init__(self, folder: str | Path):
        import tokenizers

        folder = Path(folder)
        tokenizer_path = folder / "tokenizer.json"
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_path))
        except Exception as error:  # the Rust side raises a plain Exception for a bad file
            raise DataError(f"{tokenizer_path} is not a valid tokenizers file ({error}); re-save the tokenizer")
        self.files = [folder / name for name in HF_TOKENIZER_FILES if (folder / name).is_file()]
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        special = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
            if (folder / name).is_file():
                try:
                    config = json.loads((folder / name).read_text(encoding="utf-8"))
                except json.JSONDecodeError as error:
                    raise DataError(f"{folder / name} is not valid JSON ({error}); re-save the tokenizer")
                for role in ("bos_token", "eos_token", "pad_token"):
                    token = config.get(role)
                    if isinstance(token, dict):
                        token = token.get("content")
                    if isinstance(token, str):
                        special[role] = token
        ids = {role: self._token_id(folder, token) for role, token in special.items()}
        if ids.get("eos_token") is None:
            raise DataError(
                f"tokenizer {folder} names no eos_token in tokenizer_config.json or special_tokens_map.json; "
                "documents need one to end with"
            )
        self.eos_id = ids["eos_token"]
        self.bos_id = ids.get("bos_token")
        self.pad_id = ids["pad_token"] if ids.get("pad_token") is not None else self.eos_id

    def _token_id(self, folder: Path, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise DataError(f"tokenizer {folder}: special token {token!r} is not in its vocabulary")
        return token_id

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # add_special_tokens=False: Llama-style post-processors would otherwise prepend bos.
        return [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(path: str | Path, num_threads: int | None = None) -> TextTokenizer:
    """Loads a tokenizer for building or reading token shards.

    Args:
        path: A sentencepiece `.model` file; a folder holding an HF `tokenizer.json` (preferred when
            both exist: it is what `transformers` would load); or a folder holding `tokenizer.model`.
        num_threads: Threads for sentencepiece's `encode_batch` (HF tokenizers use
            RAYON_NUM_THREADS).

    Returns:
        A `TextTokenizer`.

    Raises:
        DataError: The path is missing or holds no known tokenizer.
    """
    path = Path(path)
    if path.is_file():
        return SentencePieceTextTokenizer(path, num_threads)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return HFTextTokenizer(path)
        if (path / SENTENCEPIECE_FILE).is_file():
            return SentencePieceTextTokenizer(path / SENTENCEPIECE_FILE, num_threads)
        raise DataError(
            f"tokenizer folder {path} holds neither tokenizer.json (Hugging Face) nor {SENTENCEPIECE_FILE} "
            "(sentencepiece); save the tokenizer there or pass a .model file"
        )
    raise DataError(f"tokenizer {path} does not exist; train one with `megatrain-data tokenizer train`")
