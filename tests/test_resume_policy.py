"""What a resume may change (megatrain/resume_policy.py) and how the LR schedule continues (optim.Schedule).

Pure-function tests of each class of the table (allowed, warns, refused, layout, the default) and of
the schedule on a real torch optimizer; one CLI refusal and one real 2-rank resume.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import SMOKE, losses, run_megatrain
from megatrain.config import Config, load_config, save_config, to_dict
from megatrain.errors import CheckpointError, ConfigError
from megatrain.launch.slurm import check_run_folder
from megatrain.optim import Schedule, lr_factor
from megatrain.resume_policy import (ALLOWED, DEFAULT, LAYOUT, POLICY, REFUSED, WARNS, config_changes, flatten,
                                     resume_changes, rule_for)
from test_bad_input import assert_one_clear_line, tree_digest

CKPT = Path("/runs/x/checkpoints/step_4")  # only named in messages by the pure functions
SAVED = to_dict(load_config(SMOKE))  # what the checkpoint of a cpu-smoke run records
LAYOUT_2_RANKS = (2, 1, 1)  # checkpoint.saved_layout: world size, tp_degree, ep_degree


def changes(*overrides: str, world_size: int = 2, layout=LAYOUT_2_RANKS):
    return resume_changes(SAVED, layout, load_config(SMOKE, list(overrides)), world_size, CKPT)


# ----------------------------------------------------------------------------- the schedule

@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("resume_at, new_total", [(40, 200), (40, 60), (99, 150), (100, 300), (10, 11)])
def test_a_new_horizon_continues_from_the_lr_at_the_resume_step(schedule, resume_at, new_total):
    cfg = load_config(None, ["--optim.warmup_steps=10", f"--optim.schedule={schedule}"]).optim
    old = lr_factor(resume_at, 100, cfg)
    anchor = (resume_at, old)
    # 1e-12: the same float64 arithmetic on both sides; only summation order could differ.
    assert lr_factor(resume_at, new_total, cfg, anchor) == pytest.approx(old, abs=1e-12)
    assert lr_factor(new_total, new_total, cfg, anchor) == pytest.approx(cfg.min_lr_ratio, abs=1e-12)
    after = [lr_factor(s, new_total, cfg, anchor) for s in range(resume_at, new_total + 1)]
    assert all(a >= b for a, b in itertools.pairwise(after))  # it only decays: no jump up or down


def schedule_after(steps: int, overrides: list[str], lr: float = 0.01) -> tuple[Schedule, torch.optim.AdamW]:
    """A real AdamW and Schedule of a run of `overrides`, after `steps` optimizer steps."""
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([{"params": [param], "weight_decay": 0.1}], lr=lr)
    schedule = Schedule(optimizer, load_config(None, [*overrides, f"--optim.lr={lr}"]))
    for _ in range(steps):
        param.grad = torch.ones(4)
        optimizer.step()
        schedule.step()
    return schedule, optimizer


def resumed(schedule: Schedule, optimizer, overrides: list[str], lr: float = 0.01) -> tuple[Schedule, torch.optim.AdamW]:
    """A fresh optimizer and schedule loading their states in DeepSpeed's order (the scheduler's, then
    the ZeRO optimizer's, which brings back the checkpoint's param_group lr: engine.load_checkpoint)."""
    state, optimizer_state = schedule.state_dict(), optimizer.state_dict()
    json.dumps(state)  # plain values: the checkpoint is read with torch's weights_only loader
    new_schedule, new_optimizer = schedule_after(0, overrides, lr)
    new_schedule.load_state_dict(state)
    new_optimizer.load_state_dict(optimizer_state)
    return new_schedule, new_optimizer


def step(schedule: Schedule, optimizer) -> float:
    """One optimizer step; the LR it ran at."""
    optimizer.param_groups[0]["params"][0].grad = torch.ones(4)
    optimizer.step()
    used = optimizer.param_groups[0]["lr"]  # set by the step pre-hook, not changed by the step
    schedule.step()
    return used


def test_schedule_continues_through_two_resumes_without_a_jump():
    base = ["--optim.warmup_steps=10", "--train.steps=100"]
    old, old_opt = schedule_after(40, base)
    old_lr_at_40 = old.get_last_lr()[0]
    new, new_opt = resumed(old, old_opt, ["--optim.warmup_steps=10", "--train.steps=200"])
    assert new.get_last_lr()[0] == pytest.approx(old_lr_at_40, abs=1e-12)
    assert step(new, new_opt) == pytest.approx(old_lr_at_40, abs=1e-12)  # the first step after the resume
    for _ in range(60):
        step(new, new_opt)
    lr_at_101 = new.get_last_lr()[0]
    # A second resume without a change keeps the first one's anchor (it travels in the state) ...
    again, _ = resumed(new, new_opt, ["--optim.warmup_steps=10", "--train.steps=200"])
    assert again.get_last_lr()[0] == lr_at_101
    # ... and one that changes the floor continues from there too, to the new floor at the end.
    floor, floor_opt = resumed(new, new_opt, ["--optim.warmup_steps=10", "--train.steps=200",
                                              "--optim.min_lr_ratio=0.01"])
    assert floor.get_last_lr()[0] == pytest.approx(lr_at_101, abs=1e-12)
    for _ in range(99):
        step(floor, floor_opt)
    assert floor.last_epoch == 200 and floor.get_last_lr()[0] == pytest.approx(0.01 * 0.01, abs=1e-12)


def test_a_new_peak_lr_holds_from_the_first_step_after_the_resume():
    old, old_opt = schedule_after(30, ["--optim.warmup_steps=10", "--train.steps=100"], lr=0.01)
    factor_at_30 = lr_factor(30, 100, load_config(None, ["--optim.warmup_steps=10"]).optim)
    new, new_opt = resumed(old, old_opt, ["--optim.warmup_steps=10", "--train.steps=100"], lr=0.004)
    assert new_opt.param_groups[0]["lr"] == pytest.approx(0.01 * factor_at_30)  # the checkpoint's, as loaded
    assert step(new, new_opt) == pytest.approx(0.004 * factor_at_30, abs=1e-15)
    assert new.get_last_lr()[0] == pytest.approx(0.004 * lr_factor(31, 100, new.optim_cfg), abs=1e-15)


def test_during_warmup_the_warmup_goes_on():
    old, old_opt = schedule_after(5, ["--optim.warmup_steps=10", "--train.steps=100"])
    new, new_opt = resumed(old, old_opt, ["--optim.warmup_steps=10", "--train.steps=300"])
    assert [step(new, new_opt) for _ in range(6)] == pytest.approx([0.01 * s / 10 for s in range(6, 11)] + [0.01])
    assert new.horizon.anchor is None  # the decay starts at warmup's end over the new horizon


# ----------------------------------------------------------------------------- the table

def test_every_config_key_has_its_own_entry():
    """The default (refused) is for keys added later; every key today was decided on."""
    undecided = [k for k in flatten(to_dict(Config())) if rule_for(k, "llama") is DEFAULT]
    assert undecided == []
    assert rule_for("model.moe.num_experts", "moe").weights  # a shape field of the family
    assert rule_for("newsection.knob", "llama") is DEFAULT and DEFAULT.kind == REFUSED
    assert {r.kind for r in POLICY.values()} == {ALLOWED, WARNS, REFUSED, LAYOUT}


def test_allowed_changes_are_returned_for_printing():
    lines = [c.line() for c in changes("--train.steps=12", "--eval.final_limit=0", "--data.num_workers=2")]
    assert lines == ["resume: data.num_workers 0 -> 2", "resume: train.steps 8 -> 12", "resume: eval.final_limit 16 -> 0"]


def test_a_new_peak_lr_is_accepted_with_a_warning():
    (change,) = changes("--optim.lr=0.0015")
    assert change.rule.kind == WARNS
    assert change.line().startswith("resume: optim.lr 0.003 -> 0.0015 (warning: the peak: the schedule keeps its shape")


@pytest.mark.parametrize("override, needles", [
    ("--optim.weight_decay=0.2", ("optim.weight_decay: checkpoint 0.1, config 0.2", "silently ignored")),
    ("--train.grad_clip=0.5", ("train.grad_clip: checkpoint 1.0, config 0.5", "clip value")),
    ("--optim.warmup_steps=4", ("optim.warmup_steps: checkpoint 2, config 4", "schedule's shape")),
    ("--run.seed=8", ("run.seed: checkpoint 7, config 8", "orders the data")),
    ("--precision=bf16", ("precision: checkpoint 'fp32', config 'bf16'",)),
    ("--model.rope_theta=500000", ("model.rope_theta", "a new run")),
])
def test_refused_changes_name_the_key_both_values_and_what_to_do(override, needles):
    with pytest.raises(CheckpointError) as refused:
        changes(override)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{CKPT} cannot resume with this config: ")
    assert "resume with the values it was written with, or start a new run.dir" in message
    for needle in needles:
        assert needle in message


def test_wrong_weights_are_named_first():
    with pytest.raises(CheckpointError, match=r"config: model.family: checkpoint 'llama', config 'moe' .*"
                                              r"model.moe.num_experts: checkpoint 8, config 4"):
        changes("--optim.eps=1e-6", "--model.family=moe", "--model.moe.num_experts=4")


def test_precision_auto_keeps_the_checkpoints():
    assert changes("--precision=auto") == []


def test_layout_changes_follow_check_layout():
    assert [c.line() for c in changes("--parallel.tp_degree=2", world_size=4)] == [
        "resume: ranks 2 -> 4", "resume: parallel.tp_degree 1 -> 2"]
    with pytest.raises(CheckpointError, match="with ZeRO-3 it cannot be resumed at tp_degree=2"):
        changes("--parallel.tp_degree=2", "--parallel.zero_stage=3")


def test_another_tokenizer_is_refused(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.model").write_bytes(b"the checkpoint's pieces")
    data_tokenizer = tmp_path / "tokenizer.model"
    data_tokenizer.write_bytes(b"other pieces")
    cfg = load_config(SMOKE)
    with pytest.raises(CheckpointError, match=r"another tokenizer .* \(tokenizer.model differs\)"):
        resume_changes(SAVED, LAYOUT_2_RANKS, cfg, 2, tmp_path, data_tokenizer)
    data_tokenizer.write_bytes(b"the checkpoint's pieces")
    assert resume_changes(SAVED, LAYOUT_2_RANKS, cfg, 2, tmp_path, data_tokenizer) == []


def test_submit_reads_the_same_table(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(SMOKE, [f"--run.dir={run}"]), run / "config.yaml")
    check_run_folder(load_config(SMOKE, [f"--run.dir={run}", "--optim.lr=0.001", "--train.steps=12"]))
    with pytest.raises(ConfigError, match=rf"{run} belongs to another config: optim.weight_decay: folder 0.1, "
                                          r"config 0.2 \(DeepSpeed restores it"):
        check_run_folder(load_config(SMOKE, [f"--run.dir={run}", "--optim.weight_decay=0.2"]))
    assert [c.key for c in config_changes(to_dict(load_config(SMOKE, [f"--run.dir={run}"])),
                                          load_config(SMOKE, [f"--run.dir={run}", "--optim.lr=0.001"]))] == ["optim.lr"]


# ----------------------------------------------------------------------------- real runs

def test_resume_refuses_a_new_weight_decay(reference_run, dm_data, tmp_path):
    """Before the policy, DeepSpeed's optimizer state silently kept the old weight decay."""
    run = tmp_path / "run"  # a copy: a resume that went through would change the shared reference run
    shutil.copytree(reference_run, run)
    before = tree_digest(run)
    result = run_megatrain("train", SMOKE, "--nproc", 2, f"--run.dir={run}", f"--data.shards={dm_data['shards']}",
                           f"--eval.released={dm_data['released']}", "--resume", "--optim.weight_decay=0.2")
    assert_one_clear_line(result, "optim.weight_decay: checkpoint 0.1, config 0.2")
    assert tree_digest(run) == before


def test_more_steps_on_resume_continue_the_lr_without_a_jump(train_smoke, reference_run, tmp_path):
    """The 8-step reference run, resumed from its step-4 checkpoint with train.steps=12."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    (run / "checkpoints" / "latest").write_text("step_4")
    result = train_smoke(run, "--resume", "--train.steps=12", "--eval.final_limit=0")
    assert result.stderr.count("resume: train.steps 8 -> 12\n") == 1  # rank 0 only
    assert result.stderr.count("resume: eval.final_limit 16 -> 0\n") == 1
    got, want = losses(run), losses(reference_run)
    # Update 5 ran at the LR the 8-step run had after step 4 (the schedule's pre-hook sets the LR it
    # continues from), so the loss after it is the same, bit for bit.
    assert (got[5], got[6]) == (want[5], want[6])
    cfg = load_config(SMOKE)
    anchor = (4, lr_factor(4, 8, cfg.optim))
    logged = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "lr" in r and r["step"] > 4}
    # engine.get_lr() after step k: the LR of step k + 1, i.e. lr x factor(k)
    for k in range(5, 13):
        assert logged[k] == pytest.approx(cfg.optim.lr * lr_factor(k, 12, cfg.optim, anchor), abs=1e-12)
    assert logged[12] == pytest.approx(cfg.optim.lr * cfg.optim.min_lr_ratio, abs=1e-12)
