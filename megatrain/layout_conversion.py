"""Resuming onto another layout (rank count, tp_degree) through DeepSpeed's universal checkpoint.

ZeRO partitions optimizer state by data-parallel rank and AutoTP by tensor-parallel rank, and
DeepSpeed refuses to load either into another layout. DeepSpeed's own answer is the universal
checkpoint (one file per parameter and state), which its converter `ds_to_universal` writes; the
engine is then built with checkpoint.load_universal (Checkpointer.load reads it). Inside a
checkpoint folder (checkpoint.py describes the rest):

    step_<N>/universal/      what ds_to_universal wrote: zero/<param>/{fp32,exp_avg,...}.pt, the
                             mp_rank_*_model_states.pt it copied, and checksums.json over them

Rank 0 converts, once per checkpoint, in a child process. Meanwhile every rank meets it in a small
agreement every `collective_timeout_s / 3` seconds: a slow conversion is a rank that keeps
answering, never one the collective timeout takes for lost, and the outcome (done, or the
converter's last line) reaches every rank at the same agreement, so a failed conversion is the same
CheckpointError on every rank (exit 2) instead of an error on rank 0 and a lost-rank exit 3
elsewhere. A `universal/` left by an earlier resume is used again only while it matches its
checksums (else it is converted again), and its .pt files go through the same pickle check as the
checkpoint's own before DeepSpeed's unrestricted torch.load reads them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from megatrain.checkpoint import (CHECKSUMS, UNIVERSAL, WRITE_ERRORS, agree, check_pickles, damage, saved_layout,
                                  write_checksums, write_error)
from megatrain.config import Config
from megatrain.errors import CheckpointError
from megatrain.parallel.dims import World
from megatrain.parallel.host import all_gather_object

WORK = ".tmp-universal"
"""Where a conversion is written before it is renamed to universal/; also holds the `latest_universal`
file that ds_to_universal (0.19.8) writes beside its output folder."""


def needs_universal(step_dir: Path, world: World, zero_stage: int) -> bool:
    """Whether `step_dir` was written in another layout than this world's (and must be converted)."""
    saved, saved_tp, _ = saved_layout(step_dir)
    same_layout = saved in (None, world.world_size) and saved_tp == world.tp
    return not same_layout and zero_stage != 0  # stage 0 keeps whole optimizer state in the model file


def prepare_resume(step_dir: Path, cfg: Config, world: World) -> bool:
    """Before the engine exists: make the checkpoint loadable by this world's layout (a collective).

    Returns:
        True if the engine must load the universal checkpoint (checkpoint.load_universal).

    Raises:
        CheckpointError: on every rank alike, when the conversion failed, its checksums could not be
            written, or a file in universal/ would unpickle more than tensors and DeepSpeed's state.
    """
    if not needs_universal(step_dir, world, cfg.parallel.zero_stage):
        return False
    universal = step_dir / UNIVERSAL
    problem = "not converted yet"
    if universal.is_dir():
        # The same verdict on every rank: the folder is the same on all (a shared file system) and
        # damage() shares the hashing out.
        problem = (f"its {CHECKSUMS} is missing" if not (universal / CHECKSUMS).is_file()
                   else damage(universal, world))
        if problem and world.is_main:
            print(f"{universal} {problem}: converting {step_dir.name} again", flush=True)
    if problem:
        error = while_answering(lambda: convert(step_dir), world, cfg.parallel.collective_timeout_s / 3)
        if error:
            saved, saved_tp, _ = saved_layout(step_dir)
            raise CheckpointError(f"converting {step_dir} (written by {saved} ranks at tp_degree {saved_tp}) for "
                                  f"{world.world_size} ranks at tp_degree {world.tp} failed ({error}); resume it on "
                                  f"{saved} ranks with parallel.tp_degree={saved_tp}, the layout it was written with")
        written = None
        try:
            write_checksums(universal, world)
        except WRITE_ERRORS as e:
            written = f"rank {world.rank}: {write_error(e, universal)}"
        written = agree(written)
        if written:
            raise CheckpointError(f"writing {universal / CHECKSUMS} failed ({written}); free space there and "
                                  "resume again")
    check_pickles(universal, world)
    return True


def convert(step_dir: Path) -> str | None:
    """Run ds_to_universal on `step_dir` into step_dir/universal (renamed there once complete); what
    failed (the converter's last line), or None."""
    work, universal = step_dir / WORK, step_dir / UNIVERSAL
    shutil.rmtree(work, ignore_errors=True)  # left by a conversion that was interrupted
    shutil.rmtree(universal, ignore_errors=True)  # one that no longer matches its checksums
    work.mkdir()
    # The converter's output goes to a file, not a pipe: a long conversion could fill a pipe nobody reads.
    with tempfile.TemporaryFile("w+") as log:
        code = subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(step_dir),
             "--output_folder", str(work / UNIVERSAL), "--inject_missing_state", "--num_extract_workers", "1",
             "--num_merge_workers", "1"], check=False, stdout=log, stderr=subprocess.STDOUT, text=True).returncode
        if code != 0:
            log.seek(0)
            lines = [line.strip() for line in log.read().splitlines() if line.strip()]
            shutil.rmtree(work, ignore_errors=True)
            return f"ds_to_universal exited with {code}: {lines[-1][:200] if lines else 'no output'}"
    (work / UNIVERSAL).rename(universal)
    shutil.rmtree(work)
    return None


def while_answering(work: Callable[[], str | None], world: World, poll_s: float) -> str | None:
    """Run `work` on rank 0 while all ranks meet every `poll_s` seconds (less than the collective
    timeout); its result (an error line, or None), on every rank once it returns.

    The number of meetings depends on how long the work takes, but every rank leaves after the same
    one: the one where rank 0 reports the result.
    """
    outcome: list[str | None] = []
    if world.is_main:
        def run() -> None:
            try:
                outcome.append(work())
            except Exception as e:  # noqa: BLE001 -- it must reach the other ranks, not end this thread
                outcome.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")

        thread = threading.Thread(target=run, name="universal-checkpoint", daemon=True)
        thread.start()
    while True:
        status = None
        if world.is_main:
            thread.join(poll_s)
            status = {"running": True} if thread.is_alive() else {"error": outcome[0]}
        status = all_gather_object(status)[0]
        if "error" in status:
            return status["error"]
