"""Find (and optionally drop) training documents that share an n-gram with an eval set.

The test is GPT-3's and LLEMMA's: a training document is contaminated when it contains any
n-gram (13 words by default) of any eval document, compared after `textnorm.normalized_words`
(NFKC, casefolded, punctuation-insensitive word split). An eval text shorter than n words counts
as one gram of its whole text — DeepMind problems are ~8–20 words, and a 13-gram test alone would
never see them.

Memory: the eval side is held as sorted numpy arrays of 64-bit gram hashes (8 bytes per gram plus
a 4-byte owner), not as Python sets of strings (~100 bytes per gram). A gram hash is a polynomial
hash mod 2**64 over per-word ids, where ids come from the eval vocabulary; a training word outside
that vocabulary cannot be part of a match, so its windows are skipped without hashing. Hashing
word ids rather than joined strings lets numpy hash every window of a document at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from data_tools.textnorm import normalized_words

DEFAULT_NGRAM = 13
MAX_EVAL_IDS_PER_DOCUMENT = 20
"""Eval ids listed per contaminated document in the report (the total count is always given)."""
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio), a good polynomial base
_NOT_IN_EVAL = 0  # word id of a training word that no eval text contains


@dataclass(frozen=True)
class Contamination:
    """Why one training document is contaminated.

    Attributes:
        eval_refs: (source, id) of every eval document sharing a gram with it, in eval order.
        matched_ngrams: Number of the document's gram windows found in the eval set.
        example: The first matching gram, as normalized words joined by spaces.
    """

    eval_refs: list[tuple[str, str]]
    matched_ngrams: int
    example: str


def _expand_ranges(begins: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of arange(begin, end) over the pairs, without a Python loop."""
    sizes = ends - begins
    offsets = np.cumsum(sizes) - sizes  # where each range starts in the output
    return np.arange(int(sizes.sum())) - np.repeat(offsets, sizes) + np.repeat(begins, sizes)


def _window_hashes(ids: np.ndarray, length: int) -> np.ndarray:
    """Polynomial hashes (mod 2**64) of every window of `length` consecutive ids.

    Args:
        ids: uint64 word ids, shape (num_words,), num_words >= length.
        length: Window length in words.

    Returns:
        uint64, shape (num_words - length + 1,): entry i hashes ids[i : i + length].
    """
    num_windows = ids.size - length + 1
    hashes = ids[:num_windows].copy()
    for offset in range(1, length):
        # uint64 arithmetic wraps, which is the intended mod 2**64.
        hashes *= _MULTIPLIER
        hashes += ids[offset : offset + num_windows]
    return hashes


class EvalNgramIndex:
    """The hashed n-grams of an eval set, queried with training documents.

    Args:
        eval_documents: Documents (anything with `text`, `source`, `id`) of the eval sets.
        ngram: Gram length in words.

    Attributes:
        ngram: Gram length in words.
        eval_refs: (source, id) of each eval document, by eval index.
        stats: Per eval source: documents, short_documents (< ngram words, one whole-text gram),
            empty_documents (no words, ignored) and ngrams (windows, with repeats).
    """

    def __init__(self, eval_documents: Iterable, ngram: int = DEFAULT_NGRAM):
        if ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {ngram}")
        self.ngram = ngram
        self.eval_refs: list[tuple[str, str]] = []
        self.stats: dict[str, dict[str, int]] = {}
        self._vocab: dict[str, int] = {}
        hashes_by_length: dict[int, list[np.ndarray]] = {}
        owners_by_length: dict[int, list[np.ndarray]] = {}
        for document in eval_documents:
            source_stats = self.stats.setdefault(
                document.source, {"documents": 0, "short_documents": 0, "empty_documents": 0, "ngrams": 0}
            )
            source_stats["documents"] += 1
            words = normalized_words(document.text)
            if not words:
                source_stats["empty_documents"] += 1
                continue
            # Ids start at 1: 0 is reserved for training words outside the eval vocabulary.
            ids = np.fromiter(
                (self._vocab.setdefault(word, len(self._vocab) + 1) for word in words), np.uint64, len(words)
            )
            length = min(ngram, len(words))
            source_stats["short_documents"] += length < ngram
            hashes = _window_hashes(ids, length)
            source_stats["ngrams"] += hashes.size
            hashes_by_length.setdefault(length, []).append(hashes)
            owners_by_length.setdefault(length, []).append(np.full(hashes.size, len(self.eval_refs), np.int64))
            self.eval_refs.append((document.source, document.id))
        # Sorted arrays per gram length; a query is a vectorized binary search.
        self._hashes: dict[int, np.ndarray] = {}
        self._owners: dict[int, np.ndarray] = {}
        for length in sorted(hashes_by_length):
            hashes = np.concatenate(hashes_by_length[length])
            owners = np.concatenate(owners_by_length[length])
            order = np.argsort(hashes, kind="stable")
            self._hashes[length] = hashes[order]
            self._owners[length] = owners[order]

    @property
    def num_eval_documents(self) -> int:
        """Eval documents with at least one word."""
        return len(self.eval_refs)

    @property
    def num_unique_ngrams(self) -> int:
        """Distinct gram hashes over all gram lengths."""
        return sum(int(np.unique(hashes).size) for hashes in self._hashes.values())

    def find(self, text: str) -> Contamination | None:
        """Checks one training text against the eval grams.

        Args:
            text: The training document's text.

        Returns:
            The evidence if any gram of `text` is an eval gram, else None.
        """
        words = normalized_words(text)
        vocab = self._vocab
        # map() with a bound method is ~2x faster than a generator expression here (the hot loop).
        ids = np.fromiter(map(vocab.get, words, itertools.repeat(_NOT_IN_EVAL)), np.uint64, len(words))
        in_vocab = ids != _NOT_IN_EVAL
        if not in_vocab.any():
            return None
        # unknown_before[i] = words outside the eval vocabulary among the first i words.
        unknown_before = np.concatenate(([0], np.cumsum(~in_vocab)))
        owner_chunks = []
        matched_ngrams = 0
        example = None
        for length, eval_hashes in self._hashes.items():
            if ids.size < length:
                break
            num_windows = ids.size - length + 1
            usable = unknown_before[length : length + num_windows] == unknown_before[:num_windows]
            if not usable.any():
                continue
            starts = np.flatnonzero(usable)
            # Sorted queries: numpy's binary search then reuses the previous position as a bound,
            # which halves the cache misses of searching a large eval array (the hot spot).
            hashes = np.sort(_window_hashes(ids, length)[starts])
            left = np.searchsorted(eval_hashes, hashes, side="left")
            hit = eval_hashes[np.minimum(left, eval_hashes.size - 1)] == hashes
            if not hit.any():
                continue
            matched_ngrams += int(hit.sum())
            right = np.searchsorted(eval_hashes, hashes[hit], side="right")
            owner_chunks.append(self._owners[length][_expand_ranges(left[hit], right)])
            if example is None:
                # The first matching window in the text (the shortest grams are checked first).
                matched = np.isin(_window_hashes(ids, length)[starts], hashes[hit])
                first = int(starts[np.argmax(matched)])
                example = " ".join(words[first : first + length])
        if example is None:
            return None
        owner_indices = np.unique(np.concatenate(owner_chunks)).tolist()  # sorted: eval order
        return Contamination([self.eval_refs[i] for i in owner_indices], matched_ngrams, example)


def filter_contaminated(documents: Iterable, index: EvalNgramIndex, report: dict) -> Iterator:
    """Yields the documents that share no gram with the eval set, filling `report` as it goes.

    Args:
        documents: Training documents (with `text`, `source`, `id`), in input order.
        index: The eval grams.
        report: Filled in place: `documents`, `contaminated`, `kept`, per-source counts under
            `sources`, and `contaminated_documents` (source, id, eval_ids (at most
            MAX_EVAL_IDS_PER_DOCUMENT, as "source/id"), num_eval_documents, matched_ngrams,
            example).

    Yields:
        The surviving documents, in input order.
    """
    report.setdefault("documents", 0)
    report.setdefault("contaminated", 0)
    report.setdefault("kept", 0)
    per_source = report.setdefault("sources", {})
    contaminated_documents = report.setdefault("contaminated_documents", [])
    for document in documents:
        counts = per_source.setdefault(document.source, {"documents": 0, "contaminated": 0, "kept": 0})
        counts["documents"] += 1
        report["documents"] += 1
        contamination = index.find(document.text)
        if contamination is None:
            counts["kept"] += 1
            report["kept"] += 1
            yield document
            continue
        counts["contaminated"] += 1
        report["contaminated"] += 1
        contaminated_documents.append(
            {
                "source": document.source,
                "id": document.id,
                "eval_ids": [f"{source}/{id_}" for source, id_ in contamination.eval_refs[:MAX_EVAL_IDS_PER_DOCUMENT]],
                "num_eval_documents": len(contamination.eval_refs),
                "matched_ngrams": contamination.matched_ngrams,
                "example": contamination.example,
            }
        )
