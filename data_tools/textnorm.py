"""Text normalization shared by decontamination and deduplication.

Two normalizations, chosen so that formatting noise does not hide a duplicate or a leaked test
problem:

- `normalized_words(text)`: Unicode NFKC, then `str.casefold()` (lowercase, also for non-ASCII),
  then the maximal runs of Unicode word characters (`\\w+`: letters, digits, underscore). Everything
  else — punctuation, operators, whitespace — only separates words. So `Solve 24 = 1601*c for c.`
  becomes `solve 24 1601 c for c`, and "x^2+1" matches "x ^ 2 + 1". Used for n-gram overlap
  (decontaminate) and for MinHash shingles (dedup --near).
- `exact_text_key(text)`: a 128-bit blake2b digest of the text with every whitespace run collapsed
  to one space and the ends stripped (case and punctuation kept). Two documents that differ only in
  line endings, indentation or trailing blanks are the same document for exact dedup.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

_WORD = re.compile(r"\w+")


def normalized_words(text: str) -> list[str]:
    """Splits `text` into casefolded, NFKC-normalized word tokens (punctuation dropped).

    Args:
        text: Any document or eval text.

    Returns:
        The word tokens in order; empty if the text has no word characters.
    """
    # is_normalized is ~20x cheaper than normalize, and most text already is NFKC.
    if not unicodedata.is_normalized("NFKC", text):
        text = unicodedata.normalize("NFKC", text)
    return _WORD.findall(text.casefold())


def exact_text_key(text: str) -> bytes:
    """Returns the exact-dedup key of `text`: blake2b-128 of its whitespace-collapsed form.

    Args:
        text: A document's text.

    Returns:
        16 bytes; equal for texts that differ only in whitespace.
    """
    collapsed = " ".join(text.split())
    return hashlib.blake2b(collapsed.encode("utf-8", "surrogatepass"), digest_size=16).digest()
