"""Runtime wrapper of the sentencepiece model stored next to the shards."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece

from megatrain.errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
"""Special ids fixed at training time (data_tools.tokenizer)."""
SEP_PIECE = "<sep>"
"""User-defined piece the trainer puts between question and answer."""


class Tokenizer:
    """Encodes and decodes text with a sentencepiece `.model` file.

    Args:
        model_path: The `.model` file, e.g. `SHARD_DIR/tokenizer.model`.

    Raises:
        DataError: The file is missing, not a sentencepiece model, or lacks the `<sep>` piece.
    """

    def __init__(self, model_path: str | Path):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise DataError(
                f"tokenizer model {self.model_path} does not exist; train it with `megatrain-data deepmind shards`"
            )
        try:
            self._processor = sentencepiece.SentencePieceProcessor(model_file=str(self.model_path))
        except (RuntimeError, OSError) as error:
            raise DataError(
                f"tokenizer model {self.model_path} is not a valid sentencepiece model ({error}); retrain it"
            )
        sep_id = self._processor.piece_to_id(SEP_PIECE)
        # piece_to_id answers unk for unknown pieces, so compare the piece back.
        if self._processor.id_to_piece(sep_id) != SEP_PIECE:
            raise DataError(
                f"tokenizer model {self.model_path} has no {SEP_PIECE} piece; retrain it with megatrain-data"
            )
        self._sep_id = sep_id
        self._special_ids = frozenset({self.pad_id, self.bos_id, self.eos_id, self.sep_id})

    @property
    def vocab_size(self) -> int:
        """Number of pieces in the model (ids are 0 .. vocab_size - 1)."""
        return self._processor.vocab_size()

    @property
    def pad_id(self) -> int:
        return self._processor.pad_id()

    @property
    def bos_id(self) -> int:
        return self._processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self._processor.eos_id()

    @property
    def sep_id(self) -> int:
        """Id of the `<sep>` piece between question and answer."""
        return self._sep_id

    def encode(self, text: str) -> list[int]:
        """Returns the token ids of `text`, without bos/sep/eos."""
        return self._processor.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes many texts in one call (faster than a Python loop over `encode`)."""
        return self._processor.encode(list(texts), out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        """Returns the text of `ids`, skipping pad/bos/eos/sep and ids outside the vocabulary.

        Out-of-range ids are skipped rather than raised because a model's embedding is often
        padded past the tokenizer's vocab size, and an untrained model may sample those rows.
        """
        vocab_size = self.vocab_size
        kept = [int(i) for i in ids if 0 <= int(i) < vocab_size and int(i) not in self._special_ids]
        return self._processor.decode(kept)
