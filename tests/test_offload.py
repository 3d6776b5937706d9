"""Models larger than the memory allowed: `megatrain eval/generate --max-memory --offload-folder`
load the export with transformers' device_map="auto" and accelerate's disk offload, and answer as
the model held whole in memory does."""

import json

import torch

from conftest import run_megatrain
from megatrain.checkpoint import CONFIG_NAME
from megatrain.cli import offload_placement
from megatrain.config import load_config
from megatrain.model import family
from test_bad_input import assert_one_clear_line


def assert_offloaded_model_matches(checkpoint, tmp_path, budget: str = "100KB") -> None:
    """With a budget below the checkpoint's weights: some layers wait on disk, the logits are the
    in-memory model's, and `megatrain eval` reports the same numbers."""
    hf = checkpoint / "hf"
    assert (hf / "model.safetensors").stat().st_size > 2 * 1024 * 100  # the budget holds under half of it
    model_family = family(load_config(checkpoint / CONFIG_NAME).model.family)
    whole = model_family.load_hf(hf).eval()
    offloaded = model_family.load_hf(hf, **offload_placement(budget, str(tmp_path / "offload"), "cpu")).eval()
    assert "disk" in set(offloaded.hf_device_map.values()), offloaded.hf_device_map
    ids = torch.randint(4, whole.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    extra = {"labels": ids[:, :5].clone()} if whole.config.is_encoder_decoder else {}
    with torch.no_grad():
        torch.testing.assert_close(offloaded(input_ids=ids, **extra).logits, whole(input_ids=ids, **extra).logits,
                                   rtol=0, atol=1e-5)
    results = []
    for flags in ((), ("--max-memory", budget, "--offload-folder", tmp_path / "cli-offload")):
        result = run_megatrain("eval", checkpoint, "--limit", 16, *flags)
        assert result.returncode == 0, result.stderr[-2000:]
        results.append(json.loads(result.stdout.splitlines()[0]))
    assert results[0] == results[1] and results[0]["n"] == 16


def test_eval_of_a_decoder_larger_than_the_budget(reference_run, tmp_path):
    assert_offloaded_model_matches(reference_run / "checkpoints" / "step_8", tmp_path)


def test_generate_with_offload_answers_as_in_memory(reference_run, tmp_path):
    checkpoint = reference_run / "checkpoints" / "step_8"
    answers = [run_megatrain("generate", checkpoint, "Solve 3*x = 9 for x.", *flags).stdout
               for flags in ((), ("--max-memory", "100KB", "--offload-folder", tmp_path / "offload"))]
    assert answers[0] == answers[1]


def test_budget_without_an_offload_folder_on_cpu(reference_run):
    result = run_megatrain("generate", reference_run / "checkpoints" / "step_8", "Solve 3*x = 9 for x.",
                           "--max-memory", "100KB")
    assert_one_clear_line(result, "--offload-folder")


def test_a_budget_that_is_not_a_size(tmp_path):
    import pytest

    from megatrain.errors import MegatrainError

    for value in ("lots", "12", "0GB"):  # accelerate wants a unit, and nothing fits in 0 bytes
        with pytest.raises(MegatrainError, match=f"--max-memory {value}: not a size"):
            offload_placement(value, str(tmp_path), "cpu")
