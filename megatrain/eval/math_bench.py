"""Few-shot math benchmarks as LLEMMA reports them: MATH with Minerva's 4-shot prompt, GSM8k 8-shot.

Model-free parts only: reading the benchmarks' released files (nothing is downloaded), the
versioned few-shot prompts under eval/prompts/, rendering a problem into its prompt exactly as
lm-evaluation-harness 0.4.13 does, and scoring k sampled generations per problem (maj@k with
answer equivalence, pass@k; eval/answers.py does the answer work). Generation is the caller's:
sample until one of `prompt.stop`, then hand the texts to `score_items`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from megatrain.errors import DataError
from megatrain.eval.answers import (
    equivalent,
    extract,
    extract_boxed,
    extract_gsm8k,
    majority_vote,
    pass_at_k,
)

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
TASKS = ("math", "gsm8k")
DEFAULT_PROMPTS = {"math": "minerva_math_4shot", "gsm8k": "gsm8k_8shot"}


@dataclass(frozen=True)
class Item:
    """One benchmark problem. `answer` is the gold final answer extracted from `solution`;
    `subject` and `level` are MATH's `type` and `Level N` (None for GSM8k, and `level` for
    MATH's few "Level ?" problems)."""
    id: str
    problem: str
    answer: str
    solution: str
    subject: str | None = None
    level: int | None = None


@dataclass(frozen=True)
class Shot:
    question: str
    target: str


@dataclass(frozen=True)
class Prompt:
    """A few-shot prompt as recorded in eval/prompts/<name>.json; `source` is the lm_eval 0.4.13
    file the text was copied from, `version` changes whenever any of the text does."""
    name: str
    version: str
    source: str
    question_template: str
    target_delimiter: str
    fewshot_delimiter: str
    stop: tuple[str, ...]
    shots: tuple[Shot, ...]


# ---------------------------------------------------------------- reading the benchmarks

def _where(path: Path, line: int | None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


def _json_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a .jsonl file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read it as UTF-8 text ({e.__class__.__name__})") from None
    for number, line in enumerate(lines, 1):
        if line.strip():
            yield number, _json_object(line, path, number)


def _json_object(text: str, path: Path, line: int | None) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{_where(path, line)}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{_where(path, line)}: expected a JSON object, got {type(record).__name__}")
    return record


def _text_field(record: dict, names: Sequence[str], path: Path, line: int | None) -> str:
    for name in names:
        if name in record:
            value = record[name]
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{_where(path, line)}: field {name!r} must be a non-empty string")
            return value
    raise DataError(f"{_where(path, line)}: missing field {' or '.join(map(repr, names))}")


def _level(record: dict, path: Path, line: int | None) -> int | None:
    value = record.get("level")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(?:Level\s*)?(\d+|\?)\s*", value)
        if match:
            return None if match.group(1) == "?" else int(match.group(1))
    raise DataError(f"{_where(path, line)}: field 'level' must look like \"Level 3\", got {value!r}")


def _math_item(record: dict, item_id: str, path: Path, line: int | None) -> Item:
    problem = _text_field(record, ("problem",), path, line)
    solution = _text_field(record, ("solution",), path, line)
    subject = _text_field(record, ("type", "subject"), path, line)
    answer = extract_boxed(solution)
    if answer is None and isinstance(record.get("answer"), str) and record["answer"].strip():
        answer = record["answer"].strip()  # exports such as MATH-500 also carry it on its own
    if answer is None:
        raise DataError(f"{_where(path, line)}: the solution has no \\boxed{{}} answer")
    return Item(item_id, problem, answer, solution, subject, _level(record, path, line))


def read_math(path: str | Path) -> list[Item]:
    """MATH problems (Hendrycks et al. 2021) from a local copy of the release.

    `path` is either a split folder of the release (`MATH/test`, holding `<subject>/<n>.json`, or
    `MATH`, every .json below it is read) or a .jsonl export with the same fields per line.
    Fields: `problem`, `solution` (its last `\\boxed{}` is the gold answer), `level` ("Level 3")
    and `type` ("Algebra"; `subject` is accepted too). Ids are `<subject folder>/<n>` for the
    folder release and `<file name>:<line>` for a .jsonl. Raises DataError, one line naming the
    file (and line) and the problem, on anything malformed.
    """
    path = Path(path)
    if path.is_file():
        return [_math_item(record, f"{path.name}:{line}", path, line) for line, record in _json_records(path)]
    if not path.is_dir():
        raise DataError(f"{path}: no such MATH folder or .jsonl file")
    files = sorted(path.rglob("*.json"), key=lambda f: _natural_key(f.relative_to(path)))
    if not files:
        raise DataError(f"{path}: no MATH problems (<subject>/<n>.json files) under this folder")
    items = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{file}: cannot read it as UTF-8 text ({e.__class__.__name__})") from None
        items.append(_math_item(_json_object(text, file, None), file.relative_to(path).with_suffix("").as_posix(),
                                file, None))
    return items


def _natural_key(relative: Path) -> list:
    # `algebra/2` before `algebra/10`, so items come in the release's own order.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", relative.as_posix())]


def read_gsm8k(path: str | Path) -> list[Item]:
    """GSM8k problems (Cobbe et al. 2021) from a local .jsonl as released (`test.jsonl`).

    Each line has `question` and `answer`, the worked solution ending in `#### <number>`; the
    number (commas removed) is the gold answer. Ids are `<file name>:<line>`. Raises DataError,
    one line naming the file and line, on anything malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such GSM8k .jsonl file")
    items = []
    for line, record in _json_records(path):
        question = _text_field(record, ("question",), path, line)
        solution = _text_field(record, ("answer",), path, line)
        answer = extract_gsm8k(solution)
        if answer is None:
            raise DataError(f"{path}:{line}: field 'answer' does not end in a '#### <number>' line")
        items.append(Item(f"{path.name}:{line}", question, answer, solution))
    if not items:
        raise DataError(f"{path}: no GSM8k problems in this file")
    return items


def read_items(path: str | Path, task: str) -> list[Item]:
    """The problems of `task` ("math" or "gsm8k") from `path`; see read_math and read_gsm8k."""
    if task == "math":
        return read_math(path)
    if task == "gsm8k":
        return read_gsm8k(path)
    raise ValueError(f"unknown math task {task!r}: expected one of {', '.join(TASKS)}")


# ---------------------------------------------------------------- prompts

def load_prompt(name: str | Path) -> Prompt:
    """A few-shot prompt by name (`minerva_math_4shot`, `gsm8k_8shot`: eval/prompts/<name>.json)
    or by the path of a .json file in the same format."""
    path = Path(name) if str(name).endswith(".json") else PROMPTS_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROMPTS_DIR.glob("*.json")))
        raise DataError(f"{path}: no such prompt file (known prompts: {known})")
    record = _json_object(path.read_text(encoding="utf-8"), path, None)
    try:
        shots = tuple(Shot(s["question"], s["target"]) for s in record["shots"])
        prompt = Prompt(name=record["name"], version=str(record["version"]), source=record["source"],
                        question_template=record["question_template"],
                        target_delimiter=record["target_delimiter"], fewshot_delimiter=record["fewshot_delimiter"],
                        stop=tuple(record["stop"]), shots=shots)
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: not a prompt file (missing or malformed {e})") from None
    if "{question}" not in prompt.question_template:
        raise DataError(f"{path}: question_template has no {{question}} placeholder")
    return prompt


def _render_question(prompt: Prompt, question: str) -> str:
    # replace, not str.format: the template is ours, but LaTeX in questions is full of braces.
    return prompt.question_template.replace("{question}", question)


def build_prompt(prompt: Prompt, item: Item | str) -> str:
    """The text a model continues for `item` (an Item or a question), as lm-eval 0.4.13 renders
    its task without a chat template: for each shot, the rendered question, `target_delimiter`,
    the worked answer and `fewshot_delimiter`; then the rendered question alone."""
    question = item.problem if isinstance(item, Item) else item
    shots = "".join(_render_question(prompt, shot.question) + prompt.target_delimiter + shot.target
                    + prompt.fewshot_delimiter for shot in prompt.shots)
    return shots + _render_question(prompt, question)


def stop_sequences(prompt: Prompt) -> list[str]:
    """What generation stops at (lm-eval's `until` for the task)."""
    return list(prompt.stop)


def truncate(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first stop sequence, as generate-until returns it; for samples from a
    generator that ran on past one, so that a hallucinated next problem does not cast a vote."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


# ---------------------------------------------------------------- scoring

def _rates(rows: list[dict]) -> dict:
    n = len(rows)
    return {"n": n,
            "accuracy": sum(r["correct"] for r in rows) / n if n else 0.0,
            "pass@1": sum(r["pass@1"] for r in rows) / n if n else 0.0,
            "pass@k": sum(r["pass@k"] for r in rows) / n if n else 0.0}


def score_items(items: Sequence[Item], samples: Sequence[Sequence[str]], task: str,
                prompt: Prompt | None = None) -> dict:
    """Scores k sampled generations per problem; `samples[i]` are item i's k generations, already
    cut at the prompt's stop sequences.

    Per item: the extracted answer of every sample, the maj@k answer (`majority_vote`) with its
    votes, whether it is equivalent to the gold answer (`correct`), how many samples are
    (`n_correct`), pass@1 and pass@k (Chen et al.'s estimator with n = k). Overall: `accuracy`
    (maj@k; with k = 1 it is greedy/sampled accuracy), mean pass@1 and pass@k, and for MATH the same
    per subject (`by_subject`) and per level (`by_level`, keys "1".."5", "unknown" for "Level ?").
    `prompt` (default: the task's default prompt) only names the prompt and version in the result.
    Deterministic: the same inputs give the same dict.
    """
    if task not in TASKS:
        raise ValueError(f"unknown math task {task!r}: expected one of {', '.join(TASKS)}")
    if len(samples) != len(items):
        raise ValueError(f"{len(items)} items but samples for {len(samples)}")
    ks = {len(s) for s in samples}
    if len(ks) > 1 or 0 in ks:
        raise ValueError(f"every item needs the same number k >= 1 of samples, got {sorted(ks)}")
    k = ks.pop() if ks else 0
    prompt = prompt or load_prompt(DEFAULT_PROMPTS[task])

    rows = []
    for item, generations in zip(items, samples):
        answers = [extract(text, task) for text in generations]
        majority, votes = majority_vote(answers)
        verdicts: dict[str, bool] = {}  # the k samples often repeat an answer verbatim
        for answer in answers:
            if answer is not None and answer not in verdicts:
                verdicts[answer] = equivalent(answer, item.answer)
        n_correct = sum(verdicts.get(a, False) for a in answers if a is not None)
        rows.append({"id": item.id, "subject": item.subject, "level": item.level, "gold": item.answer,
                     "answers": answers, "majority": majority, "votes": votes,
                     "correct": majority is not None and verdicts.get(majority, False),
                     "n_correct": n_correct, "pass@1": pass_at_k(k, n_correct, 1),
                     "pass@k": pass_at_k(k, n_correct, k)})

    result = {"task": task, "prompt": prompt.name, "prompt_version": prompt.version, "k": k, **_rates(rows)}
    if task == "math":
        result["by_subject"] = {subject: _rates([r for r in rows if r["subject"] == subject])
                                for subject in sorted({r["subject"] for r in rows})}
        levels = sorted({r["level"] for r in rows}, key=lambda lv: (lv is None, lv or 0))
        result["by_level"] = {"unknown" if level is None else str(level):
                              _rates([r for r in rows if r["level"] == level]) for level in levels}
    result["items"] = rows
    return result
