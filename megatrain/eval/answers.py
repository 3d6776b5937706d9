"""Final answers of math generations: extraction, equivalence, majority voting and pass@k.

Model-free and deterministic, for the few-shot MATH (Minerva prompt) and GSM8k evaluations of
eval/math_bench.py as LLEMMA reports them: maj@k takes the most frequent answer among k samples,
"most frequent" counting equivalent spellings (`0.5`, `\\frac12`, `1/2`) as one answer.

Equivalence is math-verify's (`parse` then `verify`, Hugging Face's checker behind the Open LLM
Leaderboard's MATH numbers). Each answer is parsed on its own, wrapped as inline LaTeX (`$...$`)
so that its LaTeX extractor reads plain answers (`0.5`, `1/2`, `1,000`) and LaTeX (`\\dfrac12`,
`(1, 2]`, `\\{1,2\\}`, `5 \\text{ cm}`) alike; its expression extractor is the fallback.

Where math-verify 0.9.0 is wrong or surprising (checked in tests/test_math_answers.py):
- `verify(gold, pred)` is not symmetric (a relation is only compared with a set when the
  prediction is the set: gold `(-\\infty, 3)` matches `x < 3`, not the reverse). Votes have no
  gold side, so `equivalent` is true when either direction verifies.
- Units are dropped, whatever they are: `5 \\text{ cm}` equals `5` (wanted) but also
  `5 \\text{ m}`. MATH's answers are not unit-checked either, so this is left as is.
- Percentages are lenient: `10\\%` equals both `0.1` and `10`, so equivalence is not transitive
  there. Majority voting compares against each group's first answer, so the grouping stays
  deterministic; nothing is done about the leniency.
- `(a, b)` parses as an open interval, `(b, a)` with b > a as a tuple, and a bare `1,2` as the
  set {1, 2}: ordered pairs compare right (`(1,2)` vs `(2,1)` differ) but a bare unbracketed list
  is unordered, and `x=1,y=2` equals `(1,2)`. Left as is: no answer in our cases depends on it.
- `\\sqrt{-1}` is not `i` (symbols are taken as real unless the text looks complex).
- Unparseable text is compared as a string only when both sides are unparseable; identical
  stripped strings are made equal here before math-verify is asked (it says `\\$` != `\\$`).
- Its timeouts use SIGALRM, which only works in the main thread: elsewhere they are turned off
  (a pathological answer such as `10^{10^{10}}` then runs as long as sympy needs).
Any exception from a bad answer is caught: `equivalent` returns False, it never raises.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Sequence
from functools import lru_cache

PARSE_TIMEOUT_S = 5
VERIFY_TIMEOUT_S = 5

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# A minus glued to a word or digit before it is subtraction (`8-5`), not a sign.
_NUMBER = r"(?:(?<![\w)\]}])-)?(?:\$\s?-?)?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
_ANSWER_IS = re.compile(r"answer\s+is\s*:?", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?!\d)|\n")
_MATH_SPANS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def extract_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` or `\\fbox{...}` in `text`; None if none.

    Braces nest (`\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`) and escaped braces do not count
    (`\\boxed{\\{1,2\\}}` gives `\\{1,2\\}`). `\\boxed 5` (a space, then one token) gives `5`.
    An unclosed last box (a generation cut off inside it) is skipped for the one before it.
    """
    starts = sorted(m.start() for command in _BOX_COMMANDS
                    for m in re.finditer(re.escape(command) + r"(?![A-Za-z])", text))
    for start in reversed(starts):
        content = _box_content(text, start + (6 if text.startswith("\\boxed", start) else 5))
        if content:
            return content
    return None


def _box_content(text: str, i: int) -> str | None:
    """The argument of a box command whose name ends at `i`."""
    rest = text[i:]
    if not rest.lstrip().startswith("{"):
        # `\boxed 5$`: TeX takes the one token after the space.
        token = re.match(r"\s+([^\s$]+)", rest)
        return (token.group(1).rstrip(".,") or None) if token else None
    i += len(rest) - len(rest.lstrip()) + 1
    depth, start = 1, i
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # `\{`, `\}` and `\\` are single tokens, not grouping braces
            continue
        depth += (char == "{") - (char == "}")
        if depth == 0:
            return text[start:i].strip() or None
        i += 1
    return None


def _clean_number(number: str) -> str:
    return number.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")


def extract_gsm8k(text: str) -> str | None:
    """The number after the last `####` (GSM8k's answer line): `#### $1,000.` gives `1000`.

    Commas, a `$` and a trailing `.` go; anything after the number (units) is ignored. None when
    there is no `####` or no number right after it (a word answer is not guessed at).
    """
    _, sep, tail = text.rpartition("####")
    if not sep:
        return None
    match = re.match(r"\s*(" + _NUMBER + ")", tail)
    return _clean_number(match.group(1)) if match else None


def extract_answer_is(text: str) -> str | None:
    """The answer after the last "The answer is" / "The final answer is", up to the sentence end.

    A math span right after the phrase is taken whole (`The final answer is $[2,5)$. I hope it is
    correct.` gives `[2,5)`), so a period inside it does not end the sentence; otherwise the text
    runs to the first newline or period that is not a decimal point. `$` and a final `.` go.
    """
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end():].lstrip(" \t")
    for left, right in _MATH_SPANS:
        if rest.startswith(left):
            close = re.compile(r"(?<!\\)" + re.escape(right)).search(rest, len(left))
            if close and close.start() > len(left):
                return _strip_answer(rest[len(left):close.start()])
    end = _SENTENCE_END.search(rest)
    return _strip_answer(rest[:end.start()] if end else rest)


def _strip_answer(answer: str) -> str | None:
    # `\$` is a currency sign, `$` a math delimiter: neither is part of the answer.
    answer = re.sub(r"\\?\$", "", answer.strip().strip("*")).strip().rstrip(".").strip()
    return answer or None


def _last_number(text: str) -> str | None:
    numbers = re.findall(_NUMBER, text)
    return _clean_number(numbers[-1]) if numbers else None


def extract(text: str, task: str) -> str | None:
    """The final answer of one generation for `task` ("math" or "gsm8k"); None if none is found.

    math: the last `\\boxed{}`/`\\fbox{}`, else the text after the last "(final) answer is" (the
    Minerva prompt ends each solution with "Final Answer: The final answer is $X$."). No number is
    guessed from the working beyond that: MATH answers are often not numbers, and a stray number
    would be a false vote.
    gsm8k: the number after `####` (the dataset's own format), else the first number after the
    last "The answer is" (the Wei et al. exemplars' format, lm-eval's strict match), else the last
    number in the text (lm-eval's flexible extract). Numbers come back without commas or `$`.
    """
    if task == "math":
        return extract_boxed(text) or extract_answer_is(text)
    if task == "gsm8k":
        answer = extract_gsm8k(text)
        if answer is None:
            phrase = extract_answer_is(text)
            answer = _last_number_first(phrase) if phrase else None
        return answer if answer is not None else _last_number(text)
    raise ValueError(f"unknown math task {task!r}: expected 'math' or 'gsm8k'")


def _last_number_first(phrase: str) -> str | None:
    match = re.search(_NUMBER, phrase)
    return _clean_number(match.group(0)) if match else None


def _normalize(answer: str) -> str:
    # The answer goes inside `$...$`: a `$` of its own would close the span early, and math-verify's
    # inline span stops at a newline.
    answer = re.sub(r"(?<!\\)\$", "", answer)
    return " ".join(answer.split())


@lru_cache(maxsize=4096)
def _parse(answer: str, timeouts: bool) -> tuple:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return tuple(parse(f"${answer}$", extraction_config=config,
                       parsing_timeout=PARSE_TIMEOUT_S if timeouts else None))


def equivalent(a: str | None, b: str | None) -> bool:
    """Whether two extracted answers are the same mathematical answer (math-verify's judgement).

    `1/2`, `0.5`, `\\frac{1}{2}` and `\\dfrac12` are one answer, as are `x = 3` and `3`,
    `1,000` and `1000`, `(1, 2]` and `(1,2]`, `5 \\text{ cm}` and `5`. Symmetric: true when
    either answer verifies as the other's gold. Never raises; None or unparseable gives False
    (unless both are the same non-empty text). See the module docstring for math-verify's quirks.
    """
    if a is None or b is None:
        return False
    a, b = _normalize(a), _normalize(b)
    if not a or not b:
        return False
    if a == b:
        return True
    from math_verify import verify
    from math_verify.errors import TimeoutException

    timeouts = threading.current_thread() is threading.main_thread()
    try:
        parsed_a, parsed_b = list(_parse(a, timeouts)), list(_parse(b, timeouts))
        if not parsed_a or not parsed_b:
            return False
        timeout = VERIFY_TIMEOUT_S if timeouts else None
        return bool(verify(parsed_a, parsed_b, timeout_seconds=timeout)
                    or verify(parsed_b, parsed_a, timeout_seconds=timeout))
    except (Exception, TimeoutException):  # noqa: BLE001 -- a bad answer is a wrong answer, never a crash
        return False


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, int]:
    """The most frequent answer up to equivalence, and how many answers agree with it.

    Each answer joins the first group whose representative (its first-seen member) it is
    `equivalent` to. The largest group wins; a tie goes to the group seen first. None (nothing
    extracted) only wins when every answer is None, giving (None, len(answers)).
    """
    groups: list[list] = []  # [representative, count]
    for answer in answers:
        if answer is None:
            continue
        group = next((g for g in groups if equivalent(g[0], answer)), None)
        if group is None:
            groups.append([answer, 1])
        else:
            group[1] += 1
    if not groups:
        return None, len(answers)
    best = max(groups, key=lambda g: g[1])  # max keeps the first of equal counts
    return best[0], best[1]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that at least one of k samples drawn from n (c of them correct) is correct.

    The unbiased estimator of Chen et al. 2021, 1 - C(n-c, k) / C(n, k), computed as a product of
    ratios so that large n does not overflow or lose precision.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
