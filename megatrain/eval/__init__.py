"""Evaluation: tasks with their metrics, and the evaluator that owns their schedule.

A task (eval/qa.py is the first: question/answer exact match) gives its problems, scores a model
on them across the ranks, and names the metrics a training run logs. The evaluator runs it every
`eval.interval` steps on `eval.limit` problems and at the end on `eval.final_limit`, writing the
final result to the run folder's eval.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatrain.config import Config
from megatrain.eval.qa import QAExactMatch
from megatrain.files import atomic_write_text
from megatrain.parallel.dims import World
from megatrain.run_dir import RunDir


class Evaluator:
    """Owns the eval schedule: `eval.limit` problems per module every `eval.interval` steps, and
    `eval.final_limit` per module at the end (written to <run.dir>/eval.json with a few examples)."""

    def __init__(self, cfg: Config, engine, world: World, tokenizer_path: Path):
        self.cfg, self.engine, self.world = cfg, engine, world
        self.task = QAExactMatch(cfg, tokenizer_path) if cfg.eval.interval or cfg.eval.final_limit else None
        self.problems = self.task.problems(cfg.eval.limit) if cfg.eval.interval else []

    def maybe_run(self, step: int) -> dict | None:
        """Metrics of an in-training eval when one is due at `step`, else None."""
        if not self.cfg.eval.interval or step % self.cfg.eval.interval:
            return None
        return self.task.log_metrics(self.task.run(self.engine.module, self.problems, self.world))

    def final(self, step: int) -> dict:
        """The end-of-run eval; {} when eval.final_limit is 0."""
        if not self.cfg.eval.final_limit:
            return {}
        problems = self.task.problems(self.cfg.eval.final_limit)
        summary = self.task.run(self.engine.module, problems, self.world, self.cfg.eval.examples)
        if self.world.is_main:
            atomic_write_text(RunDir(self.cfg.run.dir).eval, json.dumps({"step": step, **summary}, indent=2))
        return summary
