"""Exact and near-duplicate removal over documents in a deterministic input order.

Exact: documents whose `textnorm.exact_text_key` (blake2b-128 of the whitespace-collapsed text)
was seen before are dropped; the first occurrence is kept.

Near (`near=True`): datasketch MinHash over hashed word shingles (`shingle` consecutive
`normalized_words`, so case and punctuation do not matter; see `shingle_hashes`) and MinHashLSH with the given Jaccard
threshold. LSH only proposes candidates, so each candidate's estimated Jaccard is checked against
the threshold before a document is dropped, which removes LSH's false positives. Only kept
documents enter the index ("keep the first of each cluster", greedily in input order): a document
is dropped when it is near a document that was kept. The permutations are seeded, so the same
input gives the same output on every run.

Memory: 16 bytes per kept document for exact keys, plus for `near` the LSH band keys and the
MinHash values (4 bytes x num_perm, 512 B at 128 permutations) per kept document.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from datasketch import MinHash, MinHashLSH

from data_tools.textnorm import exact_text_key, normalized_words

DEFAULT_THRESHOLD = 0.8
DEFAULT_NUM_PERM = 128
DEFAULT_SHINGLE = 5
MINHASH_SEED = 1
"""Seed of the MinHash permutations; fixed so near-dedup is reproducible across runs."""
_SCHEME = "affine32"  # datasketch 2.x default; named because reusing permutations requires it
_SHINGLE_MULTIPLIER = np.uint32(0x01000193)  # FNV-1a's 32-bit prime: odd, well spread bits


def _identity(shingle_hash: int) -> int:
    """MinHash hashfunc for inputs that are already 32-bit hashes (see `shingle_hashes`)."""
    return shingle_hash


@dataclass(frozen=True)
class Duplicate:
    """Why a document was dropped.

    Attributes:
        kind: "exact" or "near".
        source: Source of the kept document it duplicates.
        id: Id of the kept document it duplicates.
        jaccard: Estimated Jaccard similarity to it (1.0 for exact duplicates).
    """

    kind: str
    source: str
    id: str
    jaccard: float


@functools.lru_cache(maxsize=1 << 20)
def _word_hash(word: str) -> int:
    # Words repeat (Zipf), so the cache answers most lookups; blake2b keeps runs reproducible,
    # which Python's salted hash() would not.
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=4).digest(), "little")


def shingle_hashes(text: str, size: int) -> np.ndarray:
    """32-bit hashes of the distinct word shingles of `text` (every `size` consecutive normalized words).

    A shingle's hash is a polynomial (mod 2**32) of its words' blake2b hashes, computed for all
    shingles at once with numpy; datasketch's affine32 scheme mixes each input hash (murmur3
    fmix) before permuting, so this plays the role of its per-shingle sha1 at a fraction of the
    cost. A text with fewer than `size` words has one shingle (all its words); an empty text none.

    Returns:
        Sorted unique uint32 hashes.
    """
    words = normalized_words(text)
    if not words:
        return np.zeros(0, np.uint32)
    word_hashes = np.fromiter(map(_word_hash, words), np.uint32, len(words))
    size = min(size, len(words))
    num_shingles = len(words) - size + 1
    hashes = word_hashes[:num_shingles].copy()
    for offset in range(1, size):
        hashes *= _SHINGLE_MULTIPLIER  # uint32 arithmetic wraps: the intended mod 2**32
        hashes += word_hashes[offset : offset + num_shingles]
    return np.unique(hashes)


class Deduplicator:
    """Decides, document by document in input order, whether each one is a duplicate.

    Args:
        near: Also drop near-duplicates (MinHash LSH), not only exact ones.
        threshold: Jaccard similarity at or above which a document is a near-duplicate.
        num_perm: MinHash permutations (more: better estimates, more memory and time).
        shingle: Words per shingle for MinHash.

    Raises:
        ValueError: threshold outside (0, 1], or num_perm / shingle below 1.
    """

    def __init__(
        self,
        near: bool = False,
        threshold: float = DEFAULT_THRESHOLD,
        num_perm: int = DEFAULT_NUM_PERM,
        shingle: int = DEFAULT_SHINGLE,
    ):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if num_perm < 1 or shingle < 1:
            raise ValueError(f"num_perm and shingle must be >= 1, got {num_perm} and {shingle}")
        self.near = near
        self.threshold = threshold
        self.num_perm = num_perm
        self.shingle = shingle
        self._exact: dict[bytes, tuple[str, str]] = {}
        self._kept_refs: list[tuple[str, str]] = []
        self._kept_hashvalues: list[np.ndarray] = []
        if near:
            self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
            # Generating permutations costs ~75 us per MinHash; make them once and share them.
            self._permutations = MinHash(num_perm=num_perm, seed=MINHASH_SEED).permutations

    def check(self, document) -> Duplicate | None:
        """Returns why `document` is a duplicate of an earlier kept one, or records it as kept.

        Args:
            document: Anything with `text`, `source` and `id`.

        Returns:
            None if the document is kept (and now indexed), else the Duplicate evidence.
        """
        key = exact_text_key(document.text)
        first = self._exact.get(key)
        if first is not None:
            return Duplicate("exact", first[0], first[1], 1.0)
        minhash = None
        if self.near:
            document_shingles = shingle_hashes(document.text, self.shingle)
            # A text without words has no shingles; exact dedup alone decides for it.
            if document_shingles.size:
                minhash = MinHash(num_perm=self.num_perm, seed=MINHASH_SEED, hashfunc=_identity,
                                  permutations=self._permutations, scheme=_SCHEME)
                minhash.update_batch(document_shingles.tolist())
                duplicate = self._nearest_kept(minhash)
                if duplicate is not None:
                    return duplicate
        ref = (document.source, document.id)
        self._exact[key] = ref
        if minhash is not None:
            kept_index = len(self._kept_refs)
            self._kept_refs.append(ref)
            self._kept_hashvalues.append(minhash.hashvalues)
            self._lsh.insert(kept_index, minhash, check_duplication=False)
        return None

    def _nearest_kept(self, minhash: MinHash) -> Duplicate | None:
        """The earliest kept document whose estimated Jaccard with `minhash` reaches the threshold."""
        for kept_index in sorted(self._lsh.query(minhash)):
            # Same estimate as MinHash.jaccard: the fraction of equal minimum hashes.
            jaccard = float(np.count_nonzero(self._kept_hashvalues[kept_index] == minhash.hashvalues)) / self.num_perm
            if jaccard >= self.threshold:
                source, id_ = self._kept_refs[kept_index]
                return Duplicate("near", source, id_, jaccard)
        return None


def filter_duplicates(documents: Iterable, deduplicator: Deduplicator, report: dict) -> Iterator:
    """Yields the documents that are not duplicates of an earlier one, filling `report`.

    Args:
        documents: Documents (with `text`, `source`, `id`) in a deterministic order.
        deduplicator: Holds the state of what was kept so far.
        report: Filled in place: `documents`, `exact_duplicates`, `near_duplicates`, `kept`,
            per-source counts under `sources`, and `removed` (source, id, kind, duplicate_of
            as "source/id", jaccard).

    Yields:
        The kept documents, in input order.
    """
    for field in ("documents", "exact_duplicates", "near_duplicates", "kept"):
        report.setdefault(field, 0)
    per_source = report.setdefault("sources", {})
    removed = report.setdefault("removed", [])
    for document in documents:
        counts = per_source.setdefault(
            document.source, {"documents": 0, "exact_duplicates": 0, "near_duplicates": 0, "kept": 0}
        )
        counts["documents"] += 1
        report["documents"] += 1
        duplicate = deduplicator.check(document)
        if duplicate is None:
            counts["kept"] += 1
            report["kept"] += 1
            yield document
            continue
        counts[f"{duplicate.kind}_duplicates"] += 1
        report[f"{duplicate.kind}_duplicates"] += 1
        removed.append(
            {
                "source": document.source,
                "id": document.id,
                "kind": duplicate.kind,
                "duplicate_of": f"{duplicate.source}/{duplicate.id}",
                "jaccard": round(duplicate.jaccard, 4),
            }
        )
