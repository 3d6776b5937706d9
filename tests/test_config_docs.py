"""Every config key is discoverable: `train --help`, `train --print-config` and docs/config.md, all read
from the field docstrings in megatrain/config.py."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatrain import cli
from megatrain.config import Config, load_config, to_dict
from megatrain.config_docs import MARKDOWN_COMMAND, config_keys
from megatrain.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "cpu-smoke.yaml"


def _leaves(tree: dict, prefix: str = "") -> set[str]:
    """Dotted keys of the nested values (a mapping of named sections, empty by default, is one leaf)."""
    keys = set()
    for name, value in tree.items():
        if isinstance(value, dict) and value:
            keys |= _leaves(value, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def test_every_key_is_listed_once_with_a_doc():
    keys = config_keys()
    names = [k.key for k in keys]
    assert len(names) == len(set(names))
    # The walk misses no field: every value of a default config is a key (mapping items are documented
    # under <name>, e.g. data.sources.<name>.path).
    assert _leaves(to_dict(Config())) == {n for n in names if "<name>" not in n}
    assert {"data.sources.<name>.path", "data.sources.<name>.weight"} <= set(names)
    undocumented = [k.key for k in keys if not k.doc]
    assert not undocumented, f"give these fields a docstring in megatrain/config.py: {undocumented}"


def test_docs_come_from_the_field_docstrings():
    by_key = {k.key: k for k in config_keys()}
    zero = by_key["parallel.zero_stage"]
    assert (zero.type, zero.default) == ("int", "2")
    assert zero.doc == "DeepSpeed ZeRO stage 0-3, passed through deepspeed_config()."
    assert (by_key["eval.modules"].type, by_key["eval.modules"].default) == ("list[str]", "[algebra__linear_1d]")
    assert by_key["model.from_pretrained"].default == "''"  # an empty string, as YAML writes it


def test_checked_in_docs_are_current():
    """docs/config.md is what its generator prints now; after editing a field, run the command it names."""
    docs = (REPO / "docs" / "config.md").read_text()
    assert MARKDOWN_COMMAND in docs.splitlines()[0]
    command = MARKDOWN_COMMAND.split(" > ")[0].split()
    fresh = subprocess.run([sys.executable, *command[1:]], cwd=REPO, capture_output=True, text=True, check=True)
    assert docs == fresh.stdout, f"docs/config.md is stale: run `{MARKDOWN_COMMAND}`"
    for k in config_keys():
        assert f"| `{k.key}` |" in docs


def test_train_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--print-config" in out
    for k in config_keys():
        assert f"  {k.key} ({k.type}, default {k.default})\n" in out


def test_print_config_prints_resolved_config_and_derived_values(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = cli.main(["train", str(SMOKE), "--nproc", "2", f"--run.dir={run_dir}", "--print-config"])
    assert code == 0
    resolved, derived = yaml.safe_load_all(capsys.readouterr().out)
    assert resolved == to_dict(load_config(SMOKE, [f"--run.dir={run_dir}"]))
    # cpu-smoke: 4 per micro batch, 16 per step; on 2 ranks that is 2 micro batches each.
    assert derived["batch_plan"] == {"micro_batch_size": 4, "accumulation_steps": 2, "data_parallel_ranks": 2,
                                     "global_batch_size": 16, "tp_degree": 1, "ep_degree": 1}
    ds = derived["deepspeed_config"]
    assert ds["zero_optimization"]["stage"] == 2
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (16, 2)
    assert derived["precision"] == "fp32" and not ds["bf16"]["enabled"]
    assert not run_dir.exists()  # nothing started, nothing written


def test_print_config_world_defaults_to_one_rank(capsys):
    assert cli.main(["train", str(SMOKE), "--print-config"]) == 0
    derived = list(yaml.safe_load_all(capsys.readouterr().out))[1]
    assert derived["world_size"] == 1 and derived["batch_plan"]["accumulation_steps"] == 4


@pytest.mark.parametrize("override", ["--train.bogus=1", "--train.steps=abc"])
def test_print_config_keeps_the_one_line_errors(override, capsys):
    with pytest.raises(ConfigError) as expected:
        load_config(SMOKE, [override])
    assert cli.main(["train", str(SMOKE), "--print-config", override]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {expected.value}\n" and not captured.out
