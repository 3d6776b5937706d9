"""MATH / GSM8k readers, the few-shot prompts and maj@k scoring (eval/math_bench.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatrain.errors import DataError
from megatrain.eval.answers import extract
from megatrain.eval.math_bench import (
    DEFAULT_PROMPTS,
    Item,
    build_prompt,
    load_prompt,
    read_gsm8k,
    read_items,
    read_math,
    score_items,
    stop_sequences,
    truncate,
)

MATH_PROBLEMS = {
    "algebra/2.json": {"problem": "Solve $2x = 1$.", "level": "Level 2", "type": "Algebra",
                       "solution": r"So $x = \boxed{\frac{1}{2}}$."},
    "algebra/10.json": {"problem": "Interval?", "level": "Level 5", "type": "Algebra",
                        "solution": r"First $\boxed{3}$ is wrong; the set is $\boxed{(1, 2]}$."},
    "geometry/1.json": {"problem": "Length?", "level": "Level 2", "type": "Geometry",
                        "solution": r"The side is $\boxed{5 \text{ cm}}$."},
    "number_theory/3.json": {"problem": "Negative?", "level": "Level ?", "type": "Number Theory",
                             "solution": r"It is $\boxed{-\dfrac{3}{4}}$."},
}


def write_math_folder(root: Path, problems: dict = MATH_PROBLEMS) -> Path:
    for name, record in problems.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(record))
    return root


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


GSM8K_RECORDS = [
    {"question": "How much?", "answer": "She pays 2 * 500 = <<2*500=1000>>1000 dollars.\n#### 1,000"},
    {"question": "How cold?", "answer": "It drops to 3 - 8 = -5.\n#### -5"},
    {"question": "What fraction?", "answer": "Half of it is 0.5.\n#### 0.5"},
]


def test_read_math_folder(tmp_path):
    items = read_math(write_math_folder(tmp_path / "MATH" / "test"))
    assert [i.id for i in items] == ["algebra/2", "algebra/10", "geometry/1", "number_theory/3"]
    assert [i.answer for i in items] == [r"\frac{1}{2}", "(1, 2]", r"5 \text{ cm}", r"-\dfrac{3}{4}"]
    assert [i.level for i in items] == [2, 5, 2, None]
    assert items[0].subject == "Algebra" and items[0].problem == "Solve $2x = 1$."
    assert items[2].solution == MATH_PROBLEMS["geometry/1.json"]["solution"]


def test_read_math_jsonl(tmp_path):
    records = list(MATH_PROBLEMS.values()) + [
        {"problem": "p", "level": 3, "subject": "Precalculus", "solution": "No box here.", "answer": r"\pi"}]
    items = read_items(write_jsonl(tmp_path / "test.jsonl", records), "math")
    assert [i.id for i in items] == [f"test.jsonl:{n}" for n in range(1, 6)]
    assert [i.answer for i in items] == [r"\frac{1}{2}", "(1, 2]", r"5 \text{ cm}", r"-\dfrac{3}{4}", r"\pi"]
    assert items[-1].subject == "Precalculus" and items[-1].level == 3


def test_read_gsm8k(tmp_path):
    items = read_items(write_jsonl(tmp_path / "test.jsonl", GSM8K_RECORDS), "gsm8k")
    assert [i.answer for i in items] == ["1000", "-5", "0.5"]
    assert items[0].id == "test.jsonl:1" and items[0].problem == "How much?" and items[0].subject is None


def one_line_error(call, *args) -> str:
    with pytest.raises(DataError) as error:
        call(*args)
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"problem": "p", "level": "Level 1", "type": "Algebra"}), "missing field 'solution'"),
    (json.dumps({"problem": "p", "level": "Level 1", "solution": r"\boxed{1}"}), "missing field 'type' or 'subject'"),
    (json.dumps({"problem": "p", "level": "hard", "type": "Algebra", "solution": r"\boxed{1}"}), "field 'level'"),
    (json.dumps({"problem": "", "level": "Level 1", "type": "Algebra", "solution": r"\boxed{1}"}), "non-empty string"),
    (json.dumps({"problem": "p", "level": "Level 1", "type": "Algebra", "solution": "1"}), r"no \boxed{} answer"),
])
def test_bad_math_line_is_one_line_error(tmp_path, line, problem):
    path = write_jsonl(tmp_path / "math.jsonl", [MATH_PROBLEMS["algebra/2.json"], line])
    message = one_line_error(read_math, path)
    assert message.startswith(f"{path}:2: ") and problem in message


def test_bad_math_folder_errors(tmp_path):
    bad = dict(MATH_PROBLEMS, **{"prealgebra/7.json": {"problem": "p", "level": "Level 1", "type": "Prealgebra",
                                                       "solution": "No box."}})
    root = write_math_folder(tmp_path / "test", bad)
    assert one_line_error(read_math, root) == f"{root / 'prealgebra/7.json'}: the solution has no \\boxed{{}} answer"
    (root / "prealgebra/7.json").write_text("{")
    assert "not valid JSON" in one_line_error(read_math, root)
    (tmp_path / "empty").mkdir()
    assert "no MATH problems" in one_line_error(read_math, tmp_path / "empty")
    assert "no such MATH folder" in one_line_error(read_math, tmp_path / "missing")


@pytest.mark.parametrize("line, problem", [
    (json.dumps({"question": "q", "answer": "No final line."}), "'#### <number>'"),
    (json.dumps({"question": "q", "answer": "#### many"}), "'#### <number>'"),
    (json.dumps({"answer": "#### 1"}), "missing field 'question'"),
    ("not json", "not valid JSON"),
])
def test_bad_gsm8k_line_is_one_line_error(tmp_path, line, problem):
    path = write_jsonl(tmp_path / "gsm.jsonl", [GSM8K_RECORDS[0], line])
    message = one_line_error(read_gsm8k, path)
    assert message.startswith(f"{path}:2: ") and problem in message


def test_empty_or_missing_gsm8k_file(tmp_path):
    assert "no GSM8k problems" in one_line_error(read_gsm8k, write_jsonl(tmp_path / "empty.jsonl", []))
    assert "no such GSM8k" in one_line_error(read_gsm8k, tmp_path / "missing.jsonl")


def test_minerva_prompt_renders_like_lm_eval():
    prompt = load_prompt("minerva_math_4shot")
    assert prompt.version and prompt.source == "lm_eval/tasks/minerva_math/utils.py"
    assert len(prompt.shots) == 4 and stop_sequences(prompt) == ["Problem:"]
    question = r"What is $\frac{1}{2} + \frac{1}{2}$?"
    text = build_prompt(prompt, Item("x", question, "1", r"\boxed{1}"))
    assert text.startswith("Problem:\nFind the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$."
                           "\n\nSolution: The expressions inside each square root")
    assert text.count("Problem:\n") == 5 and text.count("\n\nSolution: ") == 4
    assert text.endswith("I hope it is correct.\n\nProblem:\n" + question + "\n\nSolution:")
    # Every shot's worked answer yields its own final answer, both ways the Minerva format states it.
    assert [extract(s.target, "math") for s in prompt.shots] == ["[2,5)", "24", "16", r"-\frac{2}{3}"]


def test_gsm8k_prompt_renders_like_lm_eval():
    prompt = load_prompt("gsm8k_8shot")
    assert prompt.source == "lm_eval/tasks/gsm8k/gsm8k-cot.yaml"
    assert len(prompt.shots) == 8 and stop_sequences(prompt) == ["Q:", "</s>", "<|im_end|>"]
    text = build_prompt(prompt, "How many {apples}?")
    assert text.startswith("Q: There are 15 trees in the grove.")
    assert text.count("Q: ") == 9 and text.count("\nA: ") == 8
    assert text.endswith("The answer is 8.\n\nQ: How many {apples}?\nA:")
    assert [extract(s.target, "gsm8k") for s in prompt.shots] == ["6", "5", "39", "8", "9", "29", "33", "8"]


def test_unknown_prompt(tmp_path):
    message = one_line_error(load_prompt, "nope")
    assert "no such prompt file" in message and "minerva_math_4shot" in message
    assert "not a prompt file" in one_line_error(load_prompt, write_jsonl(tmp_path / "p.json", [{"name": "p"}]))


def test_truncate_at_the_first_stop():
    assert truncate("x = 2. \\boxed{2}\n\nProblem:\nNext \\boxed{9}", ["Problem:"]) == "x = 2. \\boxed{2}\n\n"
    assert truncate("A: 5. The answer is 5.", ["Q:", "</s>"]) == "A: 5. The answer is 5."


def test_score_math_per_subject_and_level(tmp_path):
    items = read_math(write_math_folder(tmp_path / "test"))
    samples = [
        # algebra/2 (gold 1/2): equivalent spellings out-vote a wrong answer.
        [r"\boxed{0.5}", r"\boxed{\dfrac12}", r"\boxed{1/3}", "nothing"],
        # algebra/10 (gold (1, 2]): majority wrong, one sample right.
        [r"\boxed{(1,2)}", r"\boxed{(1, 2)}", r"\boxed{(1,2]}", "The final answer is $[1,2]$."],
        # geometry/1 (gold 5 cm): units dropped.
        ["Final Answer: The final answer is $5$. I hope it is correct."] * 2 + [r"\boxed{5\text{ cm}}", r"\boxed{6}"],
        # number_theory/3 (gold -3/4): nothing extracted at all.
        ["I give up."] * 4,
    ]
    result = score_items(items, samples, "math")
    assert result["task"] == "math" and result["k"] == 4
    assert result["prompt"] == DEFAULT_PROMPTS["math"]
    assert result["prompt_version"] == load_prompt("minerva_math_4shot").version
    rows = {r["id"]: r for r in result["items"]}
    assert rows["algebra/2"]["majority"] == "0.5" and rows["algebra/2"]["votes"] == 2 and rows["algebra/2"]["correct"]
    assert rows["algebra/2"]["answers"] == ["0.5", r"\dfrac12", "1/3", None] and rows["algebra/2"]["n_correct"] == 2
    assert rows["algebra/10"]["majority"] == "(1,2)" and not rows["algebra/10"]["correct"]
    assert rows["algebra/10"]["n_correct"] == 1 and rows["algebra/10"]["pass@1"] == 0.25
    assert rows["algebra/10"]["pass@k"] == 1.0
    assert rows["geometry/1"]["correct"] and rows["geometry/1"]["n_correct"] == 3
    assert rows["number_theory/3"] == {**rows["number_theory/3"], "majority": None, "votes": 4, "correct": False,
                                       "n_correct": 0, "pass@k": 0.0}
    assert result["n"] == 4 and result["accuracy"] == 0.5
    assert result["pass@1"] == pytest.approx((2 + 1 + 3 + 0) / 16)
    assert result["pass@k"] == 0.75
    assert result["by_subject"] == {
        "Algebra": {"n": 2, "accuracy": 0.5, "pass@1": pytest.approx(3 / 8), "pass@k": 1.0},
        "Geometry": {"n": 1, "accuracy": 1.0, "pass@1": 0.75, "pass@k": 1.0},
        "Number Theory": {"n": 1, "accuracy": 0.0, "pass@1": 0.0, "pass@k": 0.0},
    }
    assert list(result["by_level"]) == ["2", "5", "unknown"]
    assert result["by_level"]["2"] == {"n": 2, "accuracy": 1.0, "pass@1": pytest.approx(5 / 8), "pass@k": 1.0}
    assert result["by_level"]["5"]["accuracy"] == 0.0 and result["by_level"]["unknown"]["n"] == 1
    assert score_items(items, samples, "math") == result  # deterministic
    json.dumps(result)  # a results file can hold it as is


def test_score_gsm8k(tmp_path):
    items = read_gsm8k(write_jsonl(tmp_path / "test.jsonl", GSM8K_RECORDS))
    samples = [["The answer is 1,000.", "So 1000 in all. The answer is 1000.", "The answer is 999."],
               ["It is -5 degrees. The answer is -5.", "The answer is 5.", "The answer is 5."],
               ["#### 0.50", "half: 1/2 = 0.5", "The answer is 2."]]
    result = score_items(items, samples, "gsm8k", load_prompt("gsm8k_8shot"))
    assert result["prompt"] == "gsm8k_8shot" and result["k"] == 3
    assert [r["majority"] for r in result["items"]] == ["1000", "5", "0.50"]
    assert [r["correct"] for r in result["items"]] == [True, False, True]
    assert [r["n_correct"] for r in result["items"]] == [2, 1, 2]
    assert result["accuracy"] == pytest.approx(2 / 3) and result["pass@k"] == 1.0
    assert "by_subject" not in result and "by_level" not in result


def test_score_items_rejects_ragged_samples(tmp_path):
    items = read_gsm8k(write_jsonl(tmp_path / "test.jsonl", GSM8K_RECORDS[:2]))
    with pytest.raises(ValueError, match="same number k"):
        score_items(items, [["1"], ["1", "2"]], "gsm8k")
    with pytest.raises(ValueError, match="2 items but samples for 1"):
        score_items(items, [["1"]], "gsm8k")
    with pytest.raises(ValueError, match="unknown math task"):
        score_items(items, [["1"], ["2"]], "mmlu")
