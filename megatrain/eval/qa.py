"""Question/answer exact match: the first evaluation task.

Three numbers per module and overall:
- `exact_match`: greedy generation after `<bos> question <sep>`, compared with the gold answer
  after stripping whitespace. The headline.
- `numeric_match`: the generated and gold answers parse to the same rational (`2/4` == `1/2`).
- `teacher_forced_exact_match`: the gold answer is fed in and the argmax at every answer position
  is decoded and compared as a string. This is what CyberSolve-LinAlg reports as "exact match"
  (../shared/notes/data.md), printed beside ours so results compare with theirs.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from megatrain.config import Config
from megatrain.data.loader import collate, collate_seq2seq, qa_example, seq2seq_example
from megatrain.data.released import read_split
from megatrain.data.tokenizer import Tokenizer
from megatrain.parallel.dims import World
from megatrain.parallel.host import all_gather_object, all_reduce_sum
from megatrain.parallel.parallelize import whole_logits
from megatrain.parallel.zero import partitioned

HEADLINE = ("exact_match", "numeric_match", "teacher_forced_exact_match")


def normalize(answer: str) -> str:
    return "".join(answer.split())


def as_rational(text: str) -> Fraction | None:
    try:
        return Fraction(normalize(text))
    except (ValueError, ZeroDivisionError):
        return None


def score(prediction: str, gold: str) -> tuple[bool, bool]:
    """(exact, numeric) match of one prediction."""
    exact = normalize(prediction) == normalize(gold)
    gold_value = as_rational(gold)
    numeric = exact or (gold_value is not None and as_rational(prediction) == gold_value)
    return exact, numeric


def summarize(counts: dict[str, list[float]]) -> dict:
    """counts: module -> [n, exact, numeric, teacher_forced] to fractions per module and overall."""
    def rates(n, exact, numeric, forced):
        return {"n": int(n), "exact_match": exact / max(n, 1), "numeric_match": numeric / max(n, 1),
                "teacher_forced_exact_match": forced / max(n, 1)}
    total = [sum(c[i] for c in counts.values()) for i in range(4)]
    return {**rates(*total), "modules": {m: rates(*c) for m, c in sorted(counts.items())}}


@torch.no_grad()
def generate_answers(model, tokenizer: Tokenizer, questions: list[str], max_new_tokens: int,
                     max_seq_len: int, synced: bool = False) -> list[str]:
    """Greedy answers for a batch of questions: a decoder continues `<bos> question <sep>` (left-padded so
    every row generates from its end); an encoder-decoder reads `question <eos>` and writes the answer.

    synced: every rank of the world calls this together and each goes on running forward passes until
    all have finished (transformers' synced_gpus), as ZeRO-3 needs: each forward gathers every layer's
    partitions from the other ranks."""
    device = input_device(model)
    if model.config.is_encoder_decoder:
        no_answer = np.zeros(0, dtype=np.int64)
        examples = [seq2seq_example(np.array(tokenizer.encode(q)), no_answer, {"eos": tokenizer.eos_id}, max_seq_len)
                    for q in questions]
        batch = collate_seq2seq(examples, tokenizer.pad_id)
        out = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_id,
                             pad_token_id=tokenizer.pad_id, decoder_start_token_id=model.config.decoder_start_token_id,
                             synced_gpus=synced)
        return [_until_eos(tokenizer, row) for row in out[:, 1:].tolist()]  # after the decoder's start token
    prompts = [[tokenizer.bos_id, *tokenizer.encode(q)[-(max_seq_len - max_new_tokens - 2):], tokenizer.sep_id]
               for q in questions]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), tokenizer.pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_id,
                         pad_token_id=tokenizer.pad_id, synced_gpus=synced)
    return [_until_eos(tokenizer, row) for row in out[:, width:].tolist()]


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a batch goes: the first parameter's device; the CPU when that parameter is offloaded to
    disk (accelerate keeps it on the meta device and moves each layer's inputs itself)."""
    device = next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


def _until_eos(tokenizer: Tokenizer, row: list[int]) -> str:
    if tokenizer.eos_id in row:
        row = row[: row.index(tokenizer.eos_id)]
    return tokenizer.decode(row)


@torch.no_grad()
def teacher_forced(model, tokenizer: Tokenizer, pairs: list[tuple[str, str]], max_seq_len: int) -> list[bool]:
    """Whether the argmax at every answer position, given the gold answer so far, is the gold token
    (CyberSolve's metric)."""
    ids = {"bos": tokenizer.bos_id, "sep": tokenizer.sep_id, "eos": tokenizer.eos_id}
    device = input_device(model)
    if model.config.is_encoder_decoder:
        examples = [seq2seq_example(np.array(tokenizer.encode(q)), np.array(tokenizer.encode(a)), ids, max_seq_len)
                    for q, a in pairs]
        batch = collate_seq2seq(examples, tokenizer.pad_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       labels=batch["labels"].to(device)).logits  # (B, T_answer, V): position t predicts label t
        predicted = logits.argmax(-1).cpu()
        return [normalize(tokenizer.decode(predicted[row, : len(answer) - 1].tolist())) == normalize(gold)
                for row, ((_, answer), (_, gold)) in enumerate(zip(examples, pairs))]  # the answer, not its <eos>
    examples = [qa_example(torch.tensor(tokenizer.encode(q)), torch.tensor(tokenizer.encode(a)), ids, max_seq_len)
                for q, a in pairs]
    batch = collate(examples, tokenizer.pad_id)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    predicted = logits.argmax(-1).cpu()  # (B, T): position t predicts token t+1
    results = []
    for row, ((tokens, start), (_, gold)) in enumerate(zip(examples, pairs)):
        answer_positions = range(start - 1, len(tokens) - 2)  # the answer's tokens, not its <eos>
        results.append(normalize(tokenizer.decode(predicted[row, answer_positions].tolist())) == normalize(gold))
    return results


def load_problems(cfg: Config, limit: int) -> list[tuple[str, str, str]]:
    """(module, question, answer): the first `limit` problems of each of eval.modules."""
    return [(module, q, a) for module in cfg.eval.modules
            for q, a in read_split(cfg.eval.released, module, [cfg.eval.split])[:limit]]


def evaluate(model, tokenizer: Tokenizer, problems: list[tuple[str, str, str]], world: World, batch_size: int,
             max_new_tokens: int, max_seq_len: int, examples: int = 0) -> dict:
    """Score (module, question, answer) problems; each rank takes a strided share, counts are summed.

    Every rank must call this (the final sum is a collective). Under ZeRO-3 it decodes on the sharded
    model: DeepSpeed gathers each layer's partitions as the layer runs (one layer at a time on the
    device, never the whole model), which every rank must do together, so every rank runs the same
    number of batches (padded with repeats whose answers are dropped) and generates until all ranks
    are done (generate_answers' synced).

    Args:
        examples: keep this many (question, answer, gold) per module from rank 0's share, as
            result["examples"][module] (on rank 0 only).
    """
    was_training = model.training
    model.eval()
    counts: dict[str, list[float]] = {m: [0.0] * 4 for m in sorted({p[0] for p in problems})}
    group, groups, leads = world.model_group  # the ranks of a TP or EP group decode their share together
    mine = problems[group::groups]
    chunks = [mine[i: i + batch_size] for i in range(0, len(mine), batch_size)]
    sharded = partitioned(model)
    if sharded:  # ZeRO-3: the same number of forward passes on every rank (see above)
        most = max(all_gather_object(len(chunks)))
        chunks += [None] * (most - len(chunks))
    shown: dict[str, list[dict]] = {m: [] for m in counts} if examples and world.is_main else {}
    with whole_logits(model):
        for chunk in chunks:
            padding = chunk is None
            chunk = problems[:batch_size] if padding else chunk
            predictions = generate_answers(model, tokenizer, [q for _, q, _ in chunk], max_new_tokens, max_seq_len,
                                           synced=sharded)
            forced = teacher_forced(model, tokenizer, [(q, a) for _, q, a in chunk], max_seq_len)
            if padding:
                continue
            for (module, _, gold), prediction, forced_ok in zip(chunk, predictions, forced):
                exact, numeric = score(prediction, gold)
                c = counts[module]
                c[0] += 1; c[1] += exact; c[2] += numeric; c[3] += forced_ok  # noqa: E702
            for (module, question, gold), prediction in zip(chunk, predictions):
                if module in shown and len(shown[module]) < examples:
                    shown[module].append({"question": question, "answer": prediction, "gold": gold})
    counted_here = 1.0 if leads else 0.0  # a TP or EP group scored its share once
    flat = all_reduce_sum([v * counted_here for m in counts for v in counts[m]])
    counts = {m: flat[4 * i: 4 * i + 4] for i, m in enumerate(counts)}
    model.train(was_training)
    return {**summarize(counts), **({"examples": shown} if shown else {})}


def format_report(summary: dict) -> str:
    """Per-module table of the three metrics, then the kept examples beside their gold answers."""
    rows = [(m, r) for m, r in summary["modules"].items()] + [("overall", summary)]
    width = max(len(m) for m, _ in rows)
    lines = [f"{'module':<{width}}  {'n':>5}  exact  numeric  teacher-forced"]
    for module, r in rows:
        lines.append(f"{module:<{width}}  {r['n']:>5}  {r['exact_match']:>5.1%}  {r['numeric_match']:>7.1%}  "
                     f"{r['teacher_forced_exact_match']:>14.1%}")
    for module, shown in summary.get("examples", {}).items():
        lines.append(f"\n{module}:")
        for e in shown:
            mark = "ok" if normalize(e["answer"]) == normalize(e["gold"]) else "--"
            lines.append(f"  [{mark}] {e['question']}\n       model: {e['answer']!r}   gold: {e['gold']!r}")
    return "\n".join(lines)


class QAExactMatch:
    """The task as the evaluator runs it: problems from the released-format folder, scored on a model."""

    name = "qa_exact_match"

    def __init__(self, cfg: Config, tokenizer_path: Path):
        self.cfg, self.tokenizer = cfg, Tokenizer(tokenizer_path)

    def problems(self, limit: int) -> list[tuple[str, str, str]]:
        return load_problems(self.cfg, limit)

    def run(self, model, problems: list, world: World, examples: int = 0) -> dict:
        e = self.cfg.eval
        return evaluate(model, self.tokenizer, problems, world, e.batch_size, e.max_new_tokens,
                        self.cfg.model.max_seq_len, examples)

    def log_metrics(self, result: dict) -> dict:
        """What an in-training eval adds to metrics.jsonl."""
        out = {f"eval/{k}": result[k] for k in HEADLINE}
        if len(result["modules"]) > 1:
            out.update({f"eval/exact_match/{m}": r["exact_match"] for m, r in result["modules"].items()})
        return out
