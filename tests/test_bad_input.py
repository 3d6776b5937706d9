"""Bad input: one clear `error:` line, a non-zero exit, no traceback, and nothing on disk damaged."""

from __future__ import annotations

import hashlib

import pytest

from conftest import SMOKE, run_megatrain


def assert_one_clear_line(result, *needles):
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def tree_digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return h.hexdigest()


def test_missing_data_folder(tmp_path):
    missing = tmp_path / "nope"
    result = run_megatrain("train", SMOKE, "--nproc", 2, f"--run.dir={tmp_path / 'run'}", f"--data.shards={missing}")
    assert_one_clear_line(result, str(missing), "megatrain-data")
    assert not (tmp_path / "run").exists()


def test_unknown_config_key_in_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SMOKE.read_text() + "\noptim:\n  learning_rate: 0.1\n")
    assert_one_clear_line(run_megatrain("train", bad), "optim", str(bad))


def test_unknown_override():
    assert_one_clear_line(run_megatrain("train", SMOKE, "--parallel.zero=2"), "parallel.zero")


def test_batch_sizes_that_do_not_divide(dm_data, tmp_path):
    result = run_megatrain("train", SMOKE, "--nproc", 2, f"--data.shards={dm_data['shards']}",
                           "--train.micro_batch_size=3", "--train.global_batch_size=16")
    assert_one_clear_line(result, "train.global_batch_size=16", "multiple of 6")


@pytest.mark.parametrize("content, needle", [("", "empty"), ("What is 1+1?\n2\nWhat is 2+2?\n", "3 lines")])
def test_bad_released_file_for_eval(reference_run, tmp_path, content, needle):
    released = tmp_path / "released" / "interpolate"
    released.mkdir(parents=True)
    (released / "algebra__linear_1d.txt").write_text(content)
    result = run_megatrain("eval", reference_run, f"--eval.released={tmp_path / 'released'}")
    assert_one_clear_line(result, "algebra__linear_1d.txt", needle)


def test_checkpoint_from_another_model_shape(reference_run, dm_data):
    before = tree_digest(reference_run)
    result = run_megatrain("train", SMOKE, "--nproc", 2, f"--run.dir={reference_run}",
                           f"--data.shards={dm_data['shards']}", "--resume", "--model.hidden_size=32")
    assert_one_clear_line(result, "model.hidden_size", "checkpoint 64", "config 32")
    assert tree_digest(reference_run) == before


def test_existing_run_without_resume_is_refused(reference_run, dm_data):
    before = tree_digest(reference_run)
    result = run_megatrain("train", SMOKE, f"--run.dir={reference_run}", f"--data.shards={dm_data['shards']}")
    assert_one_clear_line(result, "--resume")
    assert tree_digest(reference_run) == before


def test_not_a_checkpoint(tmp_path):
    assert_one_clear_line(run_megatrain("generate", tmp_path, "Solve 2*x = 4 for x."), str(tmp_path))


MIXTURE = SMOKE.parent / "mixture-smoke.yaml"


@pytest.mark.parametrize("override, needles", [
    ("--data.sources.coq.weight=0", ("data.sources.coq.weight=0", "positive")),
    ("--data.sources.coq.weight=-1", ("data.sources.coq.weight=-1", "positive")),
    ("--data.sources.tex.path=", ("data.sources.tex.path is empty",)),
    ("--data.sources.coq.wieght=2", ("data.sources.coq.wieght",)),
])
def test_bad_mixture_settings(tmp_path, override, needles):
    result = run_megatrain("train", MIXTURE, f"--run.dir={tmp_path / 'run'}", override)
    assert_one_clear_line(result, *needles)
    assert not (tmp_path / "run").exists()


def test_a_mixture_source_that_was_never_built(tmp_path):
    result = run_megatrain("train", MIXTURE, f"--run.dir={tmp_path / 'run'}", f"--data.sources.tex.path={tmp_path}/x")
    assert_one_clear_line(result, f"{tmp_path}/x", "megatrain-data build")


def test_zero3_resume_onto_another_rank_count_is_refused(reference_run, dm_data):
    before = tree_digest(reference_run)
    result = run_megatrain("train", SMOKE, "--nproc", 1, f"--run.dir={reference_run}",
                           f"--data.shards={dm_data['shards']}", "--resume", "--parallel.zero_stage=3")
    assert_one_clear_line(result, "written by 2 ranks with ZeRO-3", "on 1 ranks")
    assert tree_digest(reference_run) == before


def test_a_pretrained_folder_without_its_weights(dm_data, reference_run, tmp_path):
    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(reference_run / "checkpoints" / "step_8" / "hf", folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    result = run_megatrain("train", SMOKE, "--nproc", 2, f"--run.dir={tmp_path / 'run'}",
                           f"--data.shards={dm_data['shards']}", f"--model.from_pretrained={folder}")
    assert_one_clear_line(result, f"model.from_pretrained={folder}", "no weights there")
    assert not (tmp_path / "run").exists()
