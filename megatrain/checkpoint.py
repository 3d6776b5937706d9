"""Checkpoints that a crash cannot corrupt.

Where they live in the run folder (`checkpoints/step_<N>`, `latest`): run_dir.py. Inside one:
    step_<N>/            DeepSpeed's engine state (model, optimizer, scheduler, per-rank shards)
        hf/              the model as a Hugging Face `save_pretrained` folder, plus the tokenizer files, in
                         the checkpoints checkpoint.hf_export names (megatrain/export.py; resume never reads it)
        hf_config/       hf/'s files but the weights, in every checkpoint (`megatrain export` writes hf/ from them)
        rng_rank<R>.pt   each rank's RNG states (tensors and plain values: loaded with weights_only=True)
        zero_to_fp32.py  DeepSpeed's scripts that join the ZeRO shards into whole fp32 weights, from
        zero_to_torch.py   the run folder: `python checkpoints/step_<N>/zero_to_fp32.py checkpoints OUT --tag step_<N>`
        universal/       only after a resume onto another layout (layout_conversion.py)
        config.yaml      the resolved config of the run that wrote it
        trainer.json     step and data position (human-readable; also in DeepSpeed's client state)
        checksums.json   size and sha256 of every other file, written last
    latest               the name of the newest complete checkpoint

A checkpoint is written under `.tmp-step_<N>/`, renamed to `step_<N>/` only once every rank has
finished, and `latest` is replaced atomically afterwards. A crash at any point leaves the previous
checkpoint and `latest` as they were; stale `.tmp-*` folders are removed by the next save. A resume
takes the newest checkpoint whose files all match checksums.json (pick_checkpoint): a file truncated,
deleted or changed later (a bad disk, a user's copy) sends it back to the one before, saying which.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

from megatrain.config import Config, save_config
from megatrain.errors import CheckpointError
from megatrain.files import atomic_write_text
from megatrain.export import checkpoint_export, hf_weights_due
from megatrain.model import family
from megatrain.parallel.dims import World
from megatrain.parallel.host import all_gather_object, barrier
from megatrain.resume_policy import Change, announce_changes, check_layout, resume_changes
from megatrain.run_dir import RunDir

CONFIG_NAME = "config.yaml"
"""The resolved config inside a checkpoint folder (the run folder's own copy: RunDir.config)."""
CHECKSUMS = "checksums.json"
UNIVERSAL = "universal"
"""Written into a checkpoint after it was saved, for a resume onto another layout (layout_conversion.py);
not in the checkpoint's checksums but in its own universal/checksums.json."""


def checkpoint_files(step_dir: Path) -> list[str]:
    """Every file a checkpoint's checksums cover, as paths relative to it."""
    return sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*")
                  if p.is_file() and p.name != CHECKSUMS and p.relative_to(step_dir).parts[0] != UNIVERSAL)


def my_share(items: list, world: World | None) -> list:
    """This rank's part of `items` where the ranks share reading files out (all of them without a world)."""
    return items[world.rank::world.world_size] if world else items


def sha256_of(names: list[str], step_dir: Path, world: World | None) -> dict[str, str]:
    """sha256 of each file, the files shared out over the ranks (every rank must call it with a world)."""
    mine = {}
    for name in my_share(names, world):
        with open(step_dir / name, "rb") as f:
            mine[name] = hashlib.file_digest(f, "sha256").hexdigest()
    return {k: v for part in (all_gather_object(mine) if world else [mine]) for k, v in part.items()}


RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")
"""DeepSpeed's scripts that join a checkpoint's ZeRO shards into whole fp32 weights (Checkpointer._take_recovery_scripts)."""

WRITE_ERRORS = (OSError, RuntimeError)
"""What a failed write raises: OSError from Python's files; from torch.save's C++ writer on a full disk
a RuntimeError that does not say so ("basic_ios::clear: iostream error", "unexpected pos 421120 vs
421008", measured with torch 2.13 on a full tmpfs), hence the free space in write_error's line."""


def write_error(e: Exception, folder: Path) -> str:
    free = shutil.disk_usage(folder).free if folder.exists() else 0
    return f"{str(e).splitlines()[0][:160]}, with {free / 2**20:.1f} MiB free in {folder}"


def agree(error: str | None) -> str | None:
    """The first rank's error, on every rank (a collective)."""
    return next((e for e in all_gather_object(error) if e), None)


def write_checksums(step_dir: Path, world: World) -> None:
    names = checkpoint_files(step_dir)
    digests = sha256_of(names, step_dir, world)
    if world.is_main:
        files = {n: {"size": (step_dir / n).stat().st_size, "sha256": digests[n]} for n in names}
        atomic_write_text(step_dir / CHECKSUMS, json.dumps({"algorithm": "sha256", "files": files}, indent=1))


def damage(step_dir: Path, world: World | None = None) -> str | None:
    """What is wrong with a checkpoint folder, or None when intact. Without a world only presence and
    sizes are checked (cheap, before any process group); with one the ranks also hash the files."""
    if not step_dir.is_dir():
        return "the folder does not exist"
    manifest = step_dir / CHECKSUMS
    if not manifest.is_file():  # written by a megatrain before checksums: only its completeness is known
        return None if (step_dir / "trainer.json").is_file() else "trainer.json is missing"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{CHECKSUMS} is unreadable ({e})"
    for name, want in files.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["size"]:
            return f"{name} has {path.stat().st_size} bytes, {want['size']} when saved"
    if world is None:
        return None
    digests = sha256_of(sorted(files), step_dir, world)
    bad = [n for n in sorted(files) if digests[n] != files[n]["sha256"]]
    return f"{bad[0]} differs from its sha256 in {CHECKSUMS}" if bad else None


def pick_checkpoint(run: RunDir, world: World | None = None) -> Path | None:
    """The checkpoint to resume from: the one `latest` names if intact, else the newest intact older
    one (kept by checkpoint.keep_last), saying on rank 0 what was wrong; None without checkpoints.

    Raises:
        CheckpointError: no checkpoint is intact.
    """
    if not run.has_checkpoint():
        return None
    named = run.latest()
    candidates = [named, *(p for _, p in reversed(run.step_dirs()) if p != named)]
    problems = []
    for path in candidates:
        problem = damage(path, world)
        if problem is None:
            if problems and world is not None and world.is_main:
                print(f"damaged checkpoint {'; '.join(problems)}; resuming from {path.name}", flush=True)
            return path
        problems.append(f"{path.name} ({problem})")
    raise CheckpointError(f"no intact checkpoint in {run.checkpoints} ({'; '.join(problems)}); restore the files "
                          "named, or start the run over in a new run.dir")

def resolve(path: str | Path) -> Path:
    """A step folder, or a run folder / checkpoints folder (then its `latest`)."""
    path = Path(path)
    for run in (RunDir(path), RunDir(path.parent)):  # a run folder, or its checkpoints/ folder
        if path in (run.root, run.checkpoints) and run.has_checkpoint():
            path = run.latest()
            break
    if not (path / "hf").is_dir():
        raise CheckpointError(f"{path} is not a complete megatrain checkpoint (no hf/ inside); pass a "
                              "checkpoints/step_<N> folder or a run folder that has checkpoints/latest")
    return path


def saved_config(ckpt_dir: Path) -> dict:
    """The resolved config a checkpoint was written with, as a plain dict."""
    saved_path = ckpt_dir / CONFIG_NAME
    if not saved_path.is_file():
        raise CheckpointError(f"{saved_path} is missing; this folder was not written by megatrain")
    return yaml.safe_load(saved_path.read_text()) or {}


def check_resume(ckpt_dir: Path, cfg: Config, world_size: int, tokenizer_path: Path | None = None,
                 announce: bool = False) -> list[Change]:
    """Refuse, before touching the engine, a resume that megatrain/resume_policy.py refuses; the changes it
    accepts.

    Args:
        tokenizer_path: the data's tokenizer, compared with the one in the checkpoint's hf/ (None: not).
        announce: print each accepted change (resume_policy.announce); rank 0 of the run does.
    """
    changes = resume_changes(saved_config(ckpt_dir), saved_layout(ckpt_dir), cfg, world_size, ckpt_dir,
                             tokenizer_path)
    if announce:
        announce_changes(changes)
    return changes


def saved_layout(ckpt_dir: Path) -> tuple[int | None, int, int]:
    """(world size, tp_degree, ep_degree) of the run that wrote a checkpoint (None: not recorded)."""
    trainer = json.loads((ckpt_dir / "trainer.json").read_text())
    return trainer.get("world_size"), trainer.get("tp_degree", 1), trainer.get("ep_degree", 1)


def check_elastic(ckpt_dir: Path, cfg: Config, world_size: int) -> list[Change]:
    """Refuse a resume onto another layout that would not load or not be exact (resume_policy.check_layout,
    part of check_resume); the layout changes accepted."""
    return check_layout(*saved_layout(ckpt_dir), cfg, world_size, ckpt_dir)


def rng_state() -> dict:
    """This process's RNG states as tensors, ints and floats only, so that loading them needs no
    pickle of arbitrary objects (`torch.load(..., weights_only=True)`)."""
    version, mt_words, gauss_next = random.getstate()
    kind, np_words, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {"python": {"version": version, "state": torch.tensor(mt_words, dtype=torch.int64),
                       "gauss_next": gauss_next},
            "numpy": {"kind": kind, "state": torch.from_numpy(np_words.astype(np.int64)), "pos": int(np_pos),
                      "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["kind"], npy["state"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_rng_file(path: Path) -> dict:
    """An `rng_rank<R>.pt`, read without unpickling anything but tensors and plain values.

    Raises:
        CheckpointError: the file holds other objects (a crafted pickle, or a file written before
            RNG states were stored this way).
    """
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path} holds objects other than tensors and plain values, which megatrain "
                              f"does not unpickle ({str(error).splitlines()[-1][:120]}); delete the rng_rank*.pt "
                              "files of that checkpoint to resume with only run.seed for the RNGs") from None


def deepspeed_pickle_types() -> list[type]:
    """The classes DeepSpeed 0.19.8 pickles into its checkpoint files besides tensors and containers
    (found by listing the GLOBAL opcodes of ZeRO 0-3, bf16, TP and MoE checkpoints)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def check_pickles(step_dir: Path, world: World | None = None) -> None:
    """Refuse a checkpoint whose .pt files would unpickle anything but tensors, containers and
    DeepSpeed's own state classes: DeepSpeed's loader unpickles them without restriction, so a
    crafted file could run code. Each file is read with torch's weights_only unpickler first (memory-
    mapped, so tensors are not read); the ranks share the files out.

    Raises:
        CheckpointError: naming the file and the object it holds.
    """
    files = sorted(p for p in step_dir.rglob("*.pt") if UNIVERSAL not in p.relative_to(step_dir).parts)
    problem = None
    with torch.serialization.safe_globals(deepspeed_pickle_types()):
        for path in my_share(files, world):
            problem = pickle_problem(path)
            if problem:
                break
    # Every rank gets here whatever its files held, so all raise the same error (exit 2): one rank's
    # failure must not leave the others waiting in a collective until they take it for lost (exit 3).
    problem = agree(problem) if world else problem
    if problem:
        raise CheckpointError(problem)


def pickle_problem(path: Path) -> str | None:
    """Why DeepSpeed must not load `path` (see check_pickles), or None."""
    then = "remove that checkpoint folder or restore it from a copy you trust"
    if not zipfile.is_zipfile(path):
        # torch.save writes zip archives. DeepSpeed's unrestricted torch.load would unpickle a plain
        # pickle.dump or torch's legacy format as it reads it, and fail on other bytes on this rank only.
        return (f"{path} is not a file torch.save writes (not a zip archive: a plain or legacy pickle, a file cut "
                f"short, or other bytes); {then}")
    try:
        torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        return (f"{path} holds a pickled {found.group(1) if found else 'object'}, which megatrain does not unpickle "
                f"(DeepSpeed would run it); {then}")
    except Exception as error:  # noqa: BLE001 -- whatever torch's reader refuses (RuntimeError from its zip reader)
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        return f"{path} is not readable as torch.save writes it ({reason}); {then}"
    return None


class Checkpointer:
    """Owns the checkpoint schedule, the atomic save and the exact resume."""

    def __init__(self, cfg: Config, world: World, tokenizer_path: Path, config_comment: str = ""):
        self.cfg, self.world, self.tokenizer_path = cfg, world, tokenizer_path
        self.config_comment = config_comment  # e.g. why precision auto chose what the config records
        self.run = RunDir(cfg.run.dir)
        self.root = self.run.checkpoints

    def due(self, step: int, last_step: int) -> bool:
        """Every checkpoint.interval steps, and always at the step this process stops at (the run's
        end, or an exit_interval stop that a --resume continues from)."""
        every = self.cfg.checkpoint.interval
        return step == last_step or (every > 0 and step % every == 0)

    def save(self, step: int, engine, data_state: dict, last: bool = True) -> Path | None:
        """Checkpoint the engine at `step`, with the data position `data_state` (loader.state_dict()).
        `last`: the last checkpoint this process writes (its final step, or a stop), which
        checkpoint.hf_export=last gives an hf/ folder; the training loop passes False for the others.

        A save that fails (no room on the disk, an I/O error on any rank) leaves the previous checkpoint
        and `latest` as they were, removes what it wrote, and raises CheckpointError, or with
        checkpoint.on_save_failure=continue says so and returns None (the next save tries again).
        """
        tmp, final = self.run.tmp_step_dir(step), self.run.step_dir(step)
        if self.world.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.run.tmp_dirs():
                shutil.rmtree(stale)  # left by a crash mid-save; never a complete checkpoint
        barrier()
        trainer_state = {"step": step, "world_size": self.world.world_size, "tp_degree": self.world.tp,
                         "ep_degree": self.world.ep, "data": data_state}
        problem = agree(self._no_room()) or self._write(tmp, engine, trainer_state, last)
        if problem:
            return self._failed(step, tmp, problem)
        if self.world.is_main:
            if final.exists():  # an earlier attempt at this step (before a requeue): replace it whole
                shutil.rmtree(final)
            tmp.rename(final)
            atomic_write_text(self.run.latest_file, final.name)
            self._prune()
        barrier()
        return final

    def _write(self, tmp: Path, engine, trainer_state: dict, last: bool = True) -> str | None:
        """Write every file of the checkpoint into `tmp`; the first failure of any rank, or None.

        Every rank goes through the same collectives whatever fails where, so a full disk on one rank
        cannot leave the others waiting: DeepSpeed's save_checkpoint is (0.19.8) a barrier, this rank's
        writes, a barrier; the HF export gathers module by module on every rank and rank 0 raises a failed
        write only once the walk is done (megatrain/export.py).
        """
        rank = self.world.rank
        error = self._attempt(lambda: engine.save_checkpoint(str(self.root), tag=tmp.name, client_state=trainer_state,
                                                             save_latest=False))
        if self.world.is_main:
            error = self._attempt(lambda: self._take_recovery_scripts(tmp)) or error
        if error:
            barrier()  # the one that closes DeepSpeed's save, where the other ranks wait
        else:
            error = self._attempt(lambda: torch.save(rng_state(), tmp / f"rng_rank{rank}.pt"))
        # On every rank, failed or not: the HF export's gathers are collectives (megatrain/export.py).
        export_error = self._attempt(lambda: checkpoint_export(engine, family(self.cfg.model.family), tmp, self.world,
                                                               self.tokenizer_path,
                                                               hf_weights_due(self.cfg.checkpoint.hf_export, last)))
        error = error or export_error
        if error is None and self.world.is_main:
            error = self._attempt(lambda: (save_config(self.cfg, tmp / CONFIG_NAME, self.config_comment),
                                           atomic_write_text(tmp / "trainer.json", json.dumps(trainer_state, indent=2))))
        error = agree(error)  # also: every rank's files are in tmp before they are summed
        if error is None:
            error = agree(self._attempt(lambda: write_checksums(tmp, self.world)))
        return error

    def _take_recovery_scripts(self, tmp: Path) -> None:
        """Move DeepSpeed's zero_to_fp32.py and zero_to_torch.py from checkpoints/ into the checkpoint.

        DeepSpeed 0.19.8 copies them into the folder save_checkpoint was given (checkpoints/, the
        step folder's parent) on global rank 0 right after that rank's optimizer shard is written
        (deepspeed/runtime/engine.py: _save_zero_checkpoint, lines 5566-5567, calls
        _copy_recovery_script, lines 5530-5537). Left there, checkpoints/ would hold them or not after a
        failed save depending on which rank's write failed first. Inside the step folder they are
        checksummed, pruned and removed with it; rank 0's own save has returned here, so they are
        either copied already or will not be.
        """
        for name in RECOVERY_SCRIPTS:
            script = self.root / name
            if script.is_file():
                script.replace(tmp / name) if tmp.is_dir() else script.unlink()

    def _attempt(self, write: Callable[[], object]) -> str | None:
        """Run one write; what failed (naming this rank and the free space), or None."""
        try:
            write()
        except WRITE_ERRORS as e:
            return f"rank {self.world.rank}: {write_error(e, self.root)}"
        return None

    def _no_room(self) -> str | None:
        """Why the next checkpoint will not fit (less free space than the last one took), or None."""
        previous = self.run.step_dirs()[-1:]
        if not previous:
            return None
        need = sum(p.stat().st_size for p in previous[0][1].rglob("*") if p.is_file())
        free = shutil.disk_usage(self.root).free
        if free >= need:
            return None
        return (f"rank {self.world.rank}: {free / 2**20:.1f} MiB free in {self.root}, the last checkpoint took "
                f"{need / 2**20:.1f} MiB")

    def _failed(self, step: int, tmp: Path, problem: str) -> None:
        if self.world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        kept = self.run.latest()
        message = (f"saving checkpoint step_{step} failed ({problem}); "
                   + (f"{kept.name} and `latest` are unchanged" if kept else "no checkpoint was written yet"))
        if self.cfg.checkpoint.on_save_failure == "stop":
            then = "continue with --resume" if kept else "start the run again"
            raise CheckpointError(f"{message}; free space in {self.root} and {then}")
        if self.world.is_main:
            print(f"warning: {message}; training goes on and the next checkpoint tries again", flush=True)
        return None

    def _prune(self) -> None:
        for _, path in self.run.step_dirs()[: -self.cfg.checkpoint.keep_last]:
            shutil.rmtree(path)

    def load(self, engine, loader, path: Path) -> int:
        """Restore model, optimizer, scheduler, RNG and data position from `path` (pick_checkpoint's,
        checked by train.setup before the engine was built); returns the step reached."""
        if engine.load_universal_checkpoint():  # another layout: see layout_conversion.py
            load_path, client = engine.load_checkpoint(str(path), tag="universal")
            client = {**client, **json.loads((path / "trainer.json").read_text())}
        else:
            load_path, client = engine.load_checkpoint(str(path.parent), tag=path.name)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {path}; is it complete?")
        loader.load_state_dict(client["data"])
        rng = path / f"rng_rank{self.world.rank}.pt"
        if rng.is_file():  # absent when the world size changed; then only the global seed carries over
            set_rng_state(load_rng_file(rng))
        return int(client["step"])
