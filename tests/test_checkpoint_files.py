"""Files in a checkpoint are loaded without unpickling arbitrary objects."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil

import numpy as np
import pytest
import torch

from megatrain.checkpoint import CHECKSUMS, check_pickles, load_rng_file, rng_state, set_rng_state, sha256_of
from megatrain.errors import CheckpointError


def draws():
    return random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.randn()), torch.rand(2)


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    draws()  # past the seeds, with a cached Gaussian on both Python and numpy sides
    torch.save(rng_state(), tmp_path / "rng_rank0.pt")
    want = draws()
    set_rng_state(load_rng_file(tmp_path / "rng_rank0.pt"))
    got = draws()
    assert got[:4] == want[:4] and torch.equal(got[4], want[4])


class Payload:
    """Unpickling this runs a shell command (what a crafted checkpoint file would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_rng_file_is_refused_with_one_line(train_smoke, reference_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    marker = tmp_path / "pwned"
    step = run / "checkpoints" / "step_8"
    rng = step / "rng_rank0.pt"
    torch.save({"python": Payload(marker)}, rng)
    # As a careful attacker would, the checksum is made to match (else the resume would take step_4).
    manifest = json.loads((step / CHECKSUMS).read_text())
    manifest["files"][rng.name] = {"size": rng.stat().st_size, "sha256": sha256_of([rng.name], step, None)[rng.name]}
    (step / CHECKSUMS).write_text(json.dumps(manifest))
    before = (step / "trainer.json").read_bytes()
    result = train_smoke(run, "--resume", "--train.steps=10", check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rng_rank0.pt holds a pickled posix.system" in errors[0], result.stderr[-2000:]
    assert not marker.exists()  # the payload never ran
    assert (run / "checkpoints" / "latest").read_text() == "step_8"
    assert (step / "trainer.json").read_bytes() == before


def test_state_files_are_readable_as_the_umask_allows(reference_run):
    """Atomic writes go through mkstemp (mode 0600); teammates must read a run's config, eval and
    checkpoints like any file written in place."""
    import stat

    umask = os.umask(0)
    os.umask(umask)
    latest = (reference_run / "checkpoints" / "latest").read_text().strip()
    for path in (reference_run / "config.yaml", reference_run / "eval.json", reference_run / "checkpoints" / "latest",
                 reference_run / "checkpoints" / latest / CHECKSUMS):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


@pytest.mark.parametrize("kind", ["pickle_dump", "legacy_torch_save", "truncated_zip", "random_bytes", "empty"])
def test_a_pt_file_that_torch_save_did_not_write_is_a_checkpoint_error(tmp_path, kind):
    """Refused by name (the CLI's one line, exit 2), never torch's own RuntimeError from its reader."""
    marker = tmp_path / "pwned"
    whole = tmp_path / "whole.pt"
    torch.save({"w": torch.ones(64)}, whole)
    bad = tmp_path / "step" / "mp_rank_00_model_states.pt"
    bad.parent.mkdir()
    if kind == "pickle_dump":
        bad.write_bytes(pickle.dumps({"x": Payload(marker)}))
    elif kind == "legacy_torch_save":
        torch.save({"w": torch.ones(64)}, bad, _use_new_zipfile_serialization=False)
    elif kind == "truncated_zip":
        bad.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    elif kind == "random_bytes":
        bad.write_bytes(random.Random(0).randbytes(whole.stat().st_size))
    else:
        bad.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"^{bad} is not a file torch.save writes \(not a zip archive"):
        check_pickles(bad.parent)
    assert not marker.exists()
