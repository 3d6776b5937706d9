"""The config tree: every recipe loads, bad input names the key and the file, DeepSpeed JSON is derived."""

from pathlib import Path

import pytest

from megatrain.config import Config, batch_plan, load_config, parse_overrides, validate
from megatrain.errors import ConfigError
from megatrain.parallel.dims import ParallelDims
from megatrain.parallel.zero import deepspeed_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("**/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_loads_and_validates(path):
    """On the smallest world of at least 2 data-parallel ranks that the recipe's TP and EP degrees divide."""
    cfg = load_config(path)
    tp, ep = cfg.parallel.tp_degree, cfg.parallel.ep_degree
    dp = max(2, ep)
    validate(cfg, world_size=tp * dp)
    ds = deepspeed_config(cfg, ParallelDims(tp * dp, tp, ep))
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * dp


def test_required_key_names_exist():
    cfg = load_config(None, ["--run.dir=/tmp/x", "--train.steps=5", "--log.interval=2",
                             "--checkpoint.interval=3", "--parallel.zero_stage=3", "--precision=bf16"])
    assert (cfg.run.dir, cfg.train.steps, cfg.log.interval) == ("/tmp/x", 5, 2)
    assert (cfg.checkpoint.interval, cfg.parallel.zero_stage, cfg.precision) == (3, 3, "bf16")


def test_precedence_defaults_file_cli(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.01\ntrain:\n  steps: 7\n")
    cfg = load_config(f, ["--optim.lr=1e-4"])
    assert cfg.optim.lr == 1e-4 and cfg.train.steps == 7 and cfg.model.hidden_size == Config().model.hidden_size


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("parallel:\n  zero_stag: 2\n")
    with pytest.raises(ConfigError, match=r"parallel\.zero_stag.*bad\.yaml"):
        load_config(f)


def test_unknown_section_and_cli_key():
    with pytest.raises(ConfigError, match="unknown config key trian"):
        load_config(None, ["--trian.steps=3"])


@pytest.mark.parametrize("override, message", [
    ("--train.steps=ten", r"train\.steps: expected int, got str"),
    ("--train.steps=true", r"train\.steps: expected int, got bool"),
    ("--precision=fp16", "use auto, fp32 or bf16"),
    ("--optim.schedule=step", "optim.schedule"),
    ("--log.progress=3", r"log\.progress: expected bool"),
])
def test_wrong_types_and_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_float_accepts_int_and_exponent_strings():
    assert load_config(None, ["--optim.lr=1"]).optim.lr == 1.0
    assert load_config(None, ["--optim.lr=3e-4"]).optim.lr == 3e-4  # YAML 1.1 reads this as a string


def test_batch_arithmetic_vs_world_size():
    cfg = load_config(None, ["--train.micro_batch_size=4", "--train.global_batch_size=24"])
    assert batch_plan(cfg, ParallelDims(2)).accumulation == 3
    with pytest.raises(ConfigError, match="does not divide.*multiple of 16"):
        validate(cfg, world_size=4)


@pytest.mark.parametrize("overrides, message", [
    (["--parallel.zero_stage=4"], "stages are 0, 1, 2 and 3"),
    (["--parallel.zero_stage=0", "--parallel.offload_optimizer=true"], "needs parallel.zero_stage >= 1"),
    (["--parallel.zero_stage=2", "--parallel.offload_params=true"], "needs parallel.zero_stage=3"),
    (["--optim.warmup_steps=50", "--train.steps=10"], "exceeds train.steps"),
    (["--checkpoint.keep_last=0"], "keep at least 1"),
    (["--precision=bf16", "--parallel.zero_stage=0"], "bf16 needs parallel.zero_stage >= 1"),
])
def test_cross_section_checks(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, overrides), world_size=2)


def test_deepspeed_config_is_derived():
    cfg = load_config(None, ["--parallel.zero_stage=3", "--parallel.offload_optimizer=true",
                             "--parallel.offload_params=true", "--precision=bf16", "--train.grad_clip=0",
                             "--train.micro_batch_size=2", "--train.global_batch_size=8"])
    ds = deepspeed_config(cfg, ParallelDims(2))
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.0  # explicit: DeepSpeed defaults to 1.0
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (8, 2)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="overrides look like"):
        parse_overrides(["train.steps=3"])
    assert parse_overrides(["--train.steps", "3"]) == {"train": {"steps": 3}}


def test_tensor_parallel_batch_plan_counts_data_parallel_ranks():
    """4 ranks at tp_degree=2 are 2 data-parallel replicas: the batch divides over 2, not 4."""
    cfg = load_config(None, ["--parallel.tp_degree=2", "--train.micro_batch_size=4", "--train.global_batch_size=24"])
    dims = validate(cfg, world_size=4)
    assert (dims.dp, dims.tp, dims.dp_rank(3), dims.tp_rank(3)) == (2, 2, 1, 1)
    assert batch_plan(cfg, dims).accumulation == 3
    ds = deepspeed_config(cfg, dims)
    assert ds["tensor_parallel"] == {"autotp_size": 2} and ds["train_batch_size"] == 24
    assert "tensor_parallel" not in deepspeed_config(load_config(None, []), ParallelDims(2))


@pytest.mark.parametrize("world_size, tp, message", [
    (3, 2, "tp_degree=2 does not divide the world size 3"),
    (2, 0, "tp_degree=0 does not divide the world size 2"),
])
def test_tp_degree_must_divide_the_world(world_size, tp, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, [f"--parallel.tp_degree={tp}"]), world_size=world_size)


def test_moved_eval_keys_still_load_with_a_warning(tmp_path, capsys):
    """Run folders and checkpoints written before eval's settings moved to eval.* keep loading."""
    old = tmp_path / "config.yaml"
    old.write_text("data:\n  eval_released: /data/rel\n  eval_modules: [a, b]\n  eval_split: extrapolate\n")
    cfg = load_config(old)
    assert (cfg.eval.released, cfg.eval.modules, cfg.eval.split) == ("/data/rel", ["a", "b"], "extrapolate")
    assert f"warning: data.eval_released is now eval.released (in {old})" in capsys.readouterr().err
    assert load_config(None, ["--data.eval_modules=x,y"]).eval.modules == ["x", "y"]
    with pytest.raises(ConfigError, match="unknown config key data.eval_typo"):
        load_config(None, ["--data.eval_typo=1"])
