"""LR schedules and answer scoring: pure functions checked against known values."""

import math

import pytest

from megatrain.config import OptimConfig
from megatrain.eval.qa import score, summarize
from megatrain.optim import lr_factor


def test_warmup_then_cosine_to_min_ratio():
    cfg = OptimConfig(schedule="cosine", warmup_steps=500, min_lr_ratio=1 / 30)  # LLEMMA
    assert lr_factor(0, 10_000, cfg) == pytest.approx(1 / 500)
    assert lr_factor(499, 10_000, cfg) == pytest.approx(1.0)
    midpoint = 500 + (10_000 - 500) // 2
    assert lr_factor(midpoint, 10_000, cfg) == pytest.approx((1 + 1 / 30) / 2, rel=1e-3)
    assert lr_factor(10_000, 10_000, cfg) == pytest.approx(1 / 30)
    values = [lr_factor(s, 10_000, cfg) for s in range(500, 10_001)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_decay():
    cfg = OptimConfig(schedule="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert [lr_factor(s, 4, cfg) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_constant():
    cfg = OptimConfig(schedule="constant", warmup_steps=2)
    assert [lr_factor(s, 10, cfg) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("prediction, gold, expected", [
    ("-6", "-6", (True, True)),
    (" -6 ", "-6", (True, True)),
    ("-6.0", "-6", (False, True)),
    ("2/4", "1/2", (False, True)),
    ("-5", "-6", (False, False)),
    ("x", "-6", (False, False)),
    ("1/0", "3", (False, False)),
    ("True", "True", (True, True)),
])
def test_score_known_predictions(prediction, gold, expected):
    assert score(prediction, gold) == expected


def test_summarize_per_module_and_overall():
    s = summarize({"a": [4, 3, 4, 2], "b": [6, 0, 3, 6]})
    assert s["n"] == 10 and s["exact_match"] == 0.3 and s["numeric_match"] == 0.7
    assert s["teacher_forced_exact_match"] == 0.8
    assert math.isclose(s["modules"]["a"]["exact_match"], 0.75)
