"""What a resumed run may change: one table, read by `--resume`, `--auto-resume` and `megatrain submit`.

A resume compares the config it runs with against the one its checkpoint was written with (the
checkpoint's config.yaml; `submit` also compares the run folder's, before anything is queued). Each
key whose value differs is looked up in POLICY, the most specific entry first (`optim.lr` before
`optim.`):

- allowed: it takes effect from the resume on; rank 0 prints `resume: KEY OLD -> NEW`.
- warns: it takes effect too, and the printed line says what it does to the run.
- refused: nothing starts; one line names the key, both values, why, and what to do.
- layout: the parallel degrees, together with the number of ranks (no config key): check_layout
  accepts what DeepSpeed's universal checkpoint converts exactly and refuses the rest.

A key without an entry is refused (DEFAULT). A key added to Config later gets no say on its own: a
wrongly refused key costs one clear error and a line in this table; a wrongly allowed one could change
a long run silently (the gap this module closes: `--resume` used to check only parameter shapes, and
a new optim.lr or weight_decay was silently overridden by the checkpoint's optimizer state).

Whether a change can take effect decides its class as much as whether it is wise: DeepSpeed restores
the optimizer's param groups (lr, weight decay, betas, eps) and the gradient clip from the checkpoint
over the config. optim.Schedule re-applies the LR, so optim.lr and the schedule's horizon may change;
the others would be ignored, so they are refused.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatrain.config import Config, migrate, to_dict
from megatrain.errors import CheckpointError
from megatrain.export import HF_CONFIG_DIR, HF_DIR
from megatrain.model import family

ALLOWED, WARNS, REFUSED, LAYOUT = "allowed", "warns", "refused", "layout"


@dataclass(frozen=True)
class Rule:
    kind: str
    """allowed | warns | refused | layout (see the module docstring)."""
    reason: str
    """Why: printed with a warning, or in the refusal."""
    weights: bool = False
    """Refused because the checkpoint's weights do not fit (family, shapes): reported before the rest."""


def _allowed(reason: str = "") -> Rule:
    return Rule(ALLOWED, reason)


def _refused(reason: str, weights: bool = False) -> Rule:
    return Rule(REFUSED, reason, weights)


_IGNORED = ("DeepSpeed restores it from the checkpoint's optimizer state over the config, so the change "
            "would be silently ignored")
_RECIPE = "it changes what the model computes: that is a new run, not a continuation"
_STARTUP = "read only when a run starts"

SHAPES = _refused("a parameter shape: the checkpoint's weights do not fit", weights=True)
"""The rule of each field in the model family's shape_fields (ModelFamily.shape_fields)."""

POLICY: dict[str, Rule] = {
    "run.dir": _allowed("a moved run folder continues"),
    "run.seed": _refused("it orders the data, and the checkpoint's data position is a place in that order"),
    "model.": _refused(_RECIPE),
    "model.family": _refused("another architecture: the checkpoint's weights do not fit", weights=True),
    "model.attention": _allowed("the attention kernel; the same math"),
    "model.init_std": _allowed(_STARTUP),
    "model.allow_bin_weights": _allowed(_STARTUP),
    "model.from_pretrained": Rule(WARNS, f"{_STARTUP}: the resume loads the checkpoint's weights, not these"),
    "model.moe.capacity_factor": _allowed("how many tokens an expert takes, not its weights"),
    "model.moe.eval_capacity_factor": _allowed("how many tokens an expert takes, not its weights"),
    "model.moe.min_capacity": _allowed("how many tokens an expert takes, not its weights"),
    "model.moe.drop_tokens": _allowed("how many tokens an expert takes, not its weights"),
    "model.moe.jitter": _allowed("router noise in training"),
    "model.moe.aux_loss_coef": _allowed("a loss weight"),
    "model.moe.z_loss_coef": _allowed("a loss weight"),
    "data.shards": Rule(WARNS, "the data position continues in these shards, which must hold the same samples "
                               "(the loader checks their number; the tokenizer is checked)"),
    "data.sources.": _allowed("a next data stage: each source continues where it stopped"),
    "data.mixture_window": _allowed(),
    "data.attention_reset": _refused(_RECIPE),
    "data.on_bad_shard": _allowed(),
    "data.num_workers": _allowed(),
    "data.verify": _allowed(),
    "train.steps": _allowed("the LR continues from its value at the resume step to the floor at the new end"),
    "train.micro_batch_size": _allowed("the global batch stays; only gradient accumulation changes"),
    "train.global_batch_size": Rule(WARNS, "each step now takes another number of samples; the data continues "
                                           "at the next sample and train.steps still counts steps"),
    "train.grad_clip": _refused("DeepSpeed restores the checkpoint's clip value over the config, so the change "
                                "would be silently ignored"),
    "train.exit_interval": _allowed(),
    "train.max_skipped_steps": _allowed(),
    "train.skip_window": _allowed(),
    "optim.lr": Rule(WARNS, "the peak: the schedule keeps its shape under it, so the LR jumps by the same "
                            "ratio at the resume step"),
    "optim.min_lr_ratio": _allowed("the LR continues from its value at the resume step to the new floor"),
    "optim.schedule": _refused("the schedule's shape; on resume only its length (train.steps), floor "
                               "(optim.min_lr_ratio) and peak (optim.lr) may change"),
    "optim.warmup_steps": _refused("the schedule's shape; on resume only its length (train.steps), floor "
                                   "(optim.min_lr_ratio) and peak (optim.lr) may change"),
    "optim.weight_decay": _refused(_IGNORED),
    "optim.beta1": _refused(_IGNORED),
    "optim.beta2": _refused(_IGNORED),
    "optim.eps": _refused(_IGNORED),
    "parallel.tp_degree": Rule(LAYOUT, "check_layout"),
    "parallel.ep_degree": Rule(LAYOUT, "check_layout"),
    "parallel.zero_stage": _refused("DeepSpeed partitions the optimizer state per ZeRO stage; loading one "
                                    "stage's state into another is not measured"),
    "parallel.offload_optimizer": _refused("another optimizer (DeepSpeedCPUAdam or torch's AdamW) would load "
                                           "this one's state; not measured"),
    "parallel.offload_params": _refused("ZeRO-3 with parameters on the CPU loading a checkpoint without is "
                                        "not measured"),
    "parallel.fp32_grad_reduce": _refused("DeepSpeed builds the bf16 optimizer's gradient buffers in this dtype; "
                                          "loading a checkpoint across it is not measured"),
    "parallel.activation_checkpointing": _allowed("recomputes activations; the same math"),
    "parallel.collective_timeout_s": _allowed(),
    "precision": _refused("DeepSpeed keeps a bf16 run's optimizer state apart from an fp32 one's; "
                          "precision=auto keeps the checkpoint's"),
    "checkpoint.": _allowed(),
    "eval.": _allowed(),
    "log.": _allowed(),
}

DEFAULT = _refused("not in megatrain/resume_policy.py's table; add it there once a change is known to be safe")


def rule_for(key: str, model_family: str) -> Rule:
    """The rule of a dotted config key: the model family's shape fields, else the longest POLICY match."""
    if key.startswith("model.") and key.removeprefix("model.") in family(model_family).shape_fields:
        return SHAPES
    matches = [p for p in POLICY if key == p or (p.endswith(".") and key.startswith(p))]
    return POLICY[max(matches, key=len)] if matches else DEFAULT


@dataclass(frozen=True)
class Change:
    """One value a resume changes, with its rule."""

    key: str
    old: Any
    new: Any
    rule: Rule

    def line(self) -> str:
        """What rank 0 prints for an accepted change."""
        warning = f" (warning: {self.rule.reason})" if self.rule.kind == WARNS else ""
        return f"resume: {self.key} {self.old!r} -> {self.new!r}{warning}"

    def diff(self, saved_name: str) -> str:
        """`key: checkpoint OLD, config NEW (why)` for a refusal."""
        return f"{self.key}: {saved_name} {self.old!r}, config {self.new!r} ({self.rule.reason})"


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config values to dotted keys (an empty mapping, such as no data.sources, gives none)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict, cfg: Config, where: str = "") -> list[Change]:
    """Every key whose value differs between a saved config and cfg, with its rule, in cfg's order.

    Args:
        saved: the nested values a checkpoint or run folder recorded (its config.yaml). A key it lacks
            (added to Config after it was written) counts as its default.
        where: names the saved file in migrate's warnings about renamed keys.
    """
    ours = flatten(to_dict(cfg))
    theirs = {**flatten(to_dict(Config())), **flatten(migrate(saved, where))}
    if ours.get("precision") == "auto":  # auto keeps what the checkpoint trained in (precision.choose)
        ours["precision"] = theirs.get("precision")
    keys = [*ours, *(k for k in theirs if k not in ours)]
    return [Change(k, theirs.get(k), ours.get(k), rule_for(k, cfg.model.family)) for k in keys
            if theirs.get(k) != ours.get(k)]


def refuse(changes: list[Change], head: str, saved_name: str, then: str, error: type[Exception]) -> None:
    """Raise one line `HEAD: KEY: SAVED OLD, config NEW (why); ...; THEN` for the refused changes (the
    weights first, at most three), if any.

    Args:
        saved_name: what the old values are called (checkpoint, folder).
        then: what to do.
    """
    refused = sorted((c for c in changes if c.rule.kind == REFUSED), key=lambda c: not c.rule.weights)
    if refused:
        more = f"; and {len(refused) - 3} more" if len(refused) > 3 else ""
        raise error(f"{head}: {'; '.join(c.diff(saved_name) for c in refused[:3])}{more}; {then}")


def check_layout(saved_world: int | None, saved_tp: int, saved_ep: int, cfg: Config, world_size: int,
                 source: Path) -> list[Change]:
    """Refuse a resume onto another layout that would not load or not be exact; the layout changes accepted.

    Another number of ranks or another tp_degree loads through DeepSpeed's universal checkpoint
    (layout_conversion.prepare_resume); measured exact with ZeRO 1 and 2, TP 2 -> 1, 1 -> 2 and DP 1 -> 2
    under TP 2 (tests/test_tensor_parallel.py).

    Args:
        saved_world, saved_tp, saved_ep: the layout that wrote the checkpoint (checkpoint.saved_layout;
            world size None: not recorded).
        source: the checkpoint, named in the errors.
    """
    tp, ep, stage = cfg.parallel.tp_degree, cfg.parallel.ep_degree, cfg.parallel.zero_stage
    expert_files = family(cfg.model.family).expert_parallel
    if expert_files and (saved_world not in (None, world_size) or saved_ep != ep):
        # DeepSpeed writes one file per expert and the optimizer state per expert-parallel rank; its
        # universal-checkpoint converter fails on them (0.19.8, measured: ds_to_universal stops in
        # _merge_zero_shards with "shape '[128, 64]' is invalid" for an expert's weight).
        raise CheckpointError(f"{source} was written by {saved_world} ranks with parallel.ep_degree={saved_ep}; an "
                              f"MoE checkpoint resumes only on the same layout: {saved_world} ranks with "
                              f"--parallel.ep_degree={saved_ep}")
    if saved_tp != tp and stage in (0, 3):
        # ZeRO-0 keeps each TP rank's slice in its own model file, with no ZeRO state to convert;
        # ZeRO-3 through the universal checkpoint is not exact (below).
        raise CheckpointError(f"{source} was written with parallel.tp_degree={saved_tp}; with ZeRO-{stage} it "
                              f"cannot be resumed at tp_degree={tp}. Resume with --parallel.tp_degree={saved_tp}, "
                              "or with zero_stage 1 or 2 (which convert between layouts exactly)")
    if saved_world not in (None, world_size) and stage == 3:
        # Measured with DeepSpeed 0.19.8: ZeRO-3 through the universal checkpoint loads, but the first
        # optimizer step after it differs (loss 4.1722 instead of 4.1614 two steps later).
        raise CheckpointError(f"{source} was written by {saved_world} ranks with ZeRO-3; resuming it on {world_size} "
                              "ranks would not restore ZeRO-3's optimizer state exactly. Resume on "
                              f"{saved_world} ranks, or train with parallel.zero_stage 1 or 2 to change the rank count")
    how = Rule(ALLOWED, "through DeepSpeed's universal checkpoint")
    return [Change(key, old, new, how) for key, old, new in
            (("ranks", saved_world, world_size), ("parallel.tp_degree", saved_tp, tp),
             ("parallel.ep_degree", saved_ep, ep)) if old is not None and old != new]


def tokenizer_problem(hf_dir: Path, tokenizer_path: Path) -> str | None:
    """The first tokenizer file that differs between a checkpoint's hf_config/ or hf/ (export.py copies the
    data's tokenizer there) and the data's, or None. Files the checkpoint lacks are not compared: one
    written before hf_config/ existed, without hf/, cannot tell its tokenizer."""
    files = sorted(p for p in tokenizer_path.iterdir() if p.is_file()) if tokenizer_path.is_dir() else [tokenizer_path]
    for file in files:
        name = file.name if tokenizer_path.is_dir() else "tokenizer.model"
        saved = hf_dir / name
        if saved.is_file() and saved.read_bytes() != file.read_bytes():
            return name
    return None


def resume_changes(saved: dict, layout: tuple[int | None, int, int], cfg: Config, world_size: int, source: Path,
                   tokenizer_path: Path | None = None) -> list[Change]:
    """Refuse a resume the policy refuses; the changes it accepts (for rank 0 to print, Change.line).

    Checked in this order, so the first line says the most: the checkpoint's weights (family, shapes),
    its tokenizer, the layout, then every other key.

    Args:
        saved: the checkpoint's config (checkpoint.saved_config); layout: checkpoint.saved_layout's.
        source: the checkpoint folder; its hf/ holds the tokenizer it was trained with.
        tokenizer_path: the data's tokenizer (TrainingData.tokenizer_path); None skips that check.

    Raises:
        CheckpointError: naming the key, both values, why, and what to do.
    """
    changes = config_changes(saved, cfg, f" (in {source})")
    then = ("resume with the values it was written with, or start a new run.dir (model.from_pretrained starts "
            "it from this checkpoint's weights exported as a Hugging Face folder)")
    head = f"{source} cannot resume with this config"
    refuse([c for c in changes if c.rule.weights], head, "checkpoint", then, CheckpointError)
    if tokenizer_path is not None:
        # hf_config/ is in every checkpoint, hf/ (with the weights) only where checkpoint.hf_export put it.
        saved_files = next((d for d in (source / HF_CONFIG_DIR, source / HF_DIR) if d.is_dir()), source / HF_DIR)
        differs = tokenizer_problem(saved_files, tokenizer_path)
        if differs:
            raise CheckpointError(f"{source} was trained with another tokenizer than {tokenizer_path} ({differs} "
                                  "differs), so token ids would mean other pieces; resume with the data it was "
                                  "trained on, or start a new run.dir")
    accepted_layout = check_layout(*layout, cfg, world_size, source)
    refuse(changes, head, "checkpoint", then, CheckpointError)
    return [*(c for c in changes if c.rule.kind in (ALLOWED, WARNS)), *accepted_layout]


def announce_changes(changes: list[Change]) -> None:
    """Print each accepted change once (the caller is rank 0), on stderr with the other notes on the
    config (migrate's renamed keys): stdout starts with the precision line."""
    for change in changes:
        print(change.line(), file=sys.stderr, flush=True)
