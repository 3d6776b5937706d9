"""The data bench/gpu_check.py writes on the GPU machine itself (no network there): synthetic math-like
documents for the packed pretraining stages, arithmetic question/answer pairs in the DeepMind released
format for the Q/A stages, and the megatrain-data commands that turn them into shards."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

QA_MODULE = "synthetic__arithmetic"
PACKED_SEQ_LEN = 1024

WORDS = ["let", "the", "sum", "of", "and", "is", "then", "we", "have", "so", "therefore", "product", "equals",
         "suppose", "number", "prime", "divides", "remainder", "when", "divided", "by", "square", "root",
         "integer", "value", "solve", "for", "gives", "hence", "a", "an", "which", "proves", "lemma", "claim"]


def synthetic_documents(n: int, seed: int) -> list[str]:
    """Math-flavoured prose with arithmetic that holds (so the model has something to learn); the
    same (n, seed) gives the same documents."""
    rng = random.Random(seed)
    # Pseudo-words from syllables widen the vocabulary the BPE tokenizer sees.
    syllables = ["ka", "lo", "mi", "ren", "tu", "sa", "vel", "qua", "dor", "ix", "pe", "no", "ra", "zu"]
    lexicon = WORDS + ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(1500)]
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(rng.randint(12, 30)):
            a, b = rng.randint(0, 9999), rng.randint(1, 999)
            op = rng.choice("+-*%")
            value = {"+": a + b, "-": a - b, "*": a * b, "%": a % b}[op]
            words = " ".join(rng.choice(lexicon) for _ in range(rng.randint(4, 14)))
            lines.append(f"{words.capitalize()}: {a} {op} {b} = {value}.")
        docs.append("\n".join(lines))
    return docs


def synthetic_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """DeepMind-style arithmetic questions with their answers, as the released format holds them."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.randint(-999, 9999), rng.randint(-999, 999)
        if rng.random() < 0.5:
            pairs.append((f"What is {a} + {b}?", str(a + b)))
        else:
            pairs.append((f"Calculate {a} - {b}.", str(a - b)))
    return pairs


def write_data(data: Path, seed: int = 1) -> None:
    """jsonl documents for the packed path and a released-format Q/A module for t5/switch_t5."""
    (data / "text").mkdir(parents=True, exist_ok=True)
    with open(data / "text" / "synth.jsonl", "w") as f:
        f.writelines(json.dumps({"text": doc}) + "\n" for doc in synthetic_documents(2500, seed))
    for i, (split, n) in enumerate((("train-easy", 3000), ("train-medium", 3000), ("train-hard", 3000),
                                    ("interpolate", 200))):
        (data / "released" / split).mkdir(parents=True, exist_ok=True)
        text = "".join(f"{q}\n{a}\n" for q, a in synthetic_pairs(n, seed * 100 + i))
        (data / "released" / split / f"{QA_MODULE}.txt").write_text(text)


def data_commands(data: Path) -> list[list[str]]:
    """megatrain-data commands, in order, that turn write_data's files into what training reads."""
    cli = [sys.executable, "-m", "data_tools.cli"]
    return [
        [*cli, "tokenizer", "train", f"synth=jsonl:{data / 'text'}", "--vocab-size", "2048", "--out",
         str(data / "tok")],
        [*cli, "build", "--source", f"synth=jsonl:{data / 'text'}", "--tokenizer", str(data / "tok"), "--out",
         str(data / "packed"), "--seq-len", str(PACKED_SEQ_LEN), "--workers", "4", "--no-progress"],
        [*cli, "deepmind", "shards", "--released", str(data / "released"), "--module", QA_MODULE, "--out",
         str(data / "qa"), "--vocab-size", "512", "--overwrite"],
    ]
