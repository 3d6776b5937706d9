"""Final-answer extraction, math-verify equivalence, maj@k voting and pass@k (eval/answers.py)."""

from __future__ import annotations

import math

import pytest

from megatrain.eval.answers import (
    equivalent,
    extract,
    extract_answer_is,
    extract_boxed,
    extract_gsm8k,
    majority_vote,
    pass_at_k,
)


@pytest.mark.parametrize("text, expected", [
    (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"the set $\boxed{\{1,2\}}$", r"\{1,2\}"),
    (r"$\boxed{\left( 3, \frac{\pi}{2} \right)}$", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"first \boxed{3}, then \boxed{5}, finally \boxed{\sqrt{2}}", r"\sqrt{2}"),
    (r"it is $\boxed 5$.", "5"),
    (r"\fbox{7}", "7"),
    (r"\boxed{12} and \fbox{13}", "13"),
    (r"$\boxed{(1, 2]}$", "(1, 2]"),
    (r"\boxed{5 \text{ cm}}", r"5 \text{ cm}"),
    (r"\boxed{2} then cut off \boxed{\frac{1}{", "2"),  # an unclosed last box falls back
    (r"matrix \boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
    ("no box here: 42", None),
    (r"\boxed{}", None),
    (r"\boxedx{3}", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("She pays 2 * 500 = <<2*500=1000>>1000.\n#### 1,000", "1000"),
    ("#### -5", "-5"),
    ("#### 0.75", "0.75"),
    ("#### $18.", "18"),
    ("#### 1,234,567 dollars", "1234567"),
    ("#### 3\n#### 4", "4"),
    ("#### five", None),
    ("The answer is 7.", None),
])
def test_extract_gsm8k(text, expected):
    assert extract_gsm8k(text) == expected


@pytest.mark.parametrize("text, expected", [
    (r"The answer is $-\frac{3}{4}$.", r"-\frac{3}{4}"),
    ("Final Answer: The final answer is $[2,5)$. I hope it is correct.", "[2,5)"),
    ("So the answer is 3.5. Next we", "3.5"),
    ("The answer is 6. The answer is 8.", "8"),
    ("the answer is: 12 apples\nQ: next", "12 apples"),
    (r"The answer is $\$18$.", "18"),
    ("no phrase", None),
])
def test_extract_answer_is(text, expected):
    assert extract_answer_is(text) == expected


@pytest.mark.parametrize("text, task, expected", [
    # math: the box wins over the closing phrase; the phrase is the fallback; no number guessing.
    ("$\\boxed{16}$\nFinal Answer: The final answer is $15$. I hope it is correct.", "math", "16"),
    ("Final Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct.", "math", r"-\frac{2}{3}"),
    ("we get 3 + 4 = 7", "math", None),
    # gsm8k: `####`, then "The answer is", then the last number.
    ("x = 5\n#### 1,000\nThe answer is 3.", "gsm8k", "1000"),
    ("So 23 - 15 is 8. The answer is 8.", "gsm8k", "8"),
    ("The answer is $1,250.", "gsm8k", "1250"),
    ("The answer is -3 degrees.", "gsm8k", "-3"),
    ("They had 74 - 35 = 39 left", "gsm8k", "39"),
    ("8-3 leaves 5 and 10-4", "gsm8k", "4"),  # subtraction, not -4
    ("nothing numeric", "gsm8k", None),
])
def test_extract_by_task(text, task, expected):
    assert extract(text, task) == expected


def test_extract_unknown_task():
    with pytest.raises(ValueError, match="unknown math task"):
        extract("1", "mmlu")


EQUIVALENT = [
    ("1/2", "0.5"), ("0.5", r"\frac{1}{2}"), (r"\frac{1}{2}", r"\dfrac12"), (r"\dfrac12", "1/2"),
    ("x = 3", "3"), ("1,000", "1000"), ("1,000,000", "1000000"), ("-1,000", "-1000"),
    ("(1, 2]", "(1,2]"), (r"\{1,2\}", r"\{2,1\}"), ("(1,2,3)", "(1, 2, 3)"),
    (r"5 \text{ cm}", "5"), (r"5\text{ cm}^2", "5"), (r"-\frac{3}{4}", "-0.75"), (r"\frac{-3}{4}", r"-\frac34"),
    (r"2\sqrt{2}", r"\sqrt8"), ("x^2+1", "1+x^2"), (r"\$18.90", "18.9"), ("3.50", "3.5"),
    (r"90^\circ", "90"), (r"\text{(A)}", "A"), (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
    (r"(-\infty, 3)", "x < 3"),  # math-verify only in one direction; equivalent() is symmetric
    ("$24$", "24"),
]
NOT_EQUIVALENT = [
    ("-3", "3"), ("(1,2)", "[1,2]"), ("(1,2)", "(2,1)"), ("(1,2,3)", "(3,2,1)"), ("1/3", "1/2"),
    ("0.333", "1/3"), ("1000", "1,001"), ("12", "12.5"), (r"\infty", r"-\infty"), ("y = 3", "x = 3"),
    (r"\text{even}", r"\text{odd}"), ("2", "2, 3"), (r"\pi", "3.14159"), ("1.000001", "1"),
]


@pytest.mark.parametrize("a, b", EQUIVALENT)
def test_equivalent(a, b):
    assert equivalent(a, b) and equivalent(b, a)


@pytest.mark.parametrize("a, b", NOT_EQUIVALENT)
def test_not_equivalent(a, b):
    assert not equivalent(a, b) and not equivalent(b, a)


@pytest.mark.parametrize("a, b, expected", [
    # Documented math-verify leniencies, pinned so an upgrade that changes them is noticed.
    (r"5 \text{ cm}", r"5 \text{ m}", True),
    (r"10\%", "0.1", True),
    (r"10\%", "10", True),
    ("1,2", "2,1", True),
    (r"\sqrt{-1}", "i", False),
])
def test_math_verify_quirks(a, b, expected):
    assert equivalent(a, b) is expected


@pytest.mark.parametrize("a, b", [
    (r"\frac{", r"\frac{1}{2}"), ("}{", "3"), ("", ""), ("", "3"), (None, "3"), (None, None),
    (r"\\\\", "x^^2"), (r"\begin{pmatrix}", "1"), (r"\frac{1}{0}", "1"), ("(" * 200, "1"),
])
def test_bad_answers_never_raise(a, b):
    assert equivalent(a, b) is False


def test_identical_unparseable_text_is_equivalent():
    assert equivalent(r"\text{Devon}", r"\text{Devon}")
    assert equivalent(r"\$", r"\$")


def test_majority_groups_equivalent_spellings():
    assert majority_vote(["0.5", r"\frac12", "1/3", "1/2"]) == ("0.5", 3)
    assert majority_vote(["1/3", "0.5", r"\frac12", None, None, None]) == ("0.5", 2)


def test_majority_ties_go_to_the_first_seen():
    assert majority_vote(["2", "1", "1", "2"]) == ("2", 2)
    assert majority_vote([None, "7", r"\frac{14}{2}", "3", "3.0"]) == ("7", 2)


def test_majority_none_only_wins_when_alone():
    assert majority_vote([None, None, "4"]) == ("4", 1)
    assert majority_vote([None, None, None]) == (None, 3)
    assert majority_vote([]) == (None, 0)


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 2, 1 - 3 / 10),           # 1 - C(3,2)/C(5,2)
    (3, 1, 2, 1 - 1 / 3),            # 1 - C(2,2)/C(3,2)
    (4, 1, 1, 0.25),                 # pass@1 is c/n
    (10, 0, 5, 0.0),
    (10, 10, 1, 1.0),
    (10, 6, 5, 1.0),                 # fewer than k wrong samples: a draw of k always has a right one
    (200, 1, 100, 0.5),              # 1 - C(199,100)/C(200,100) = 1 - 100/200
    (64, 8, 16, 1 - math.comb(56, 16) / math.comb(64, 16)),
])
def test_pass_at_k(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(n, c, k)
