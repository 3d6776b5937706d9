"""Generate DeepMind mathematics problems in the released v1.0 text format.

Drives the `mathematics_dataset` 1.0.1 generator directly (without its absl FLAGS) and writes

    OUT/train-easy/<module>.txt, OUT/train-medium/..., OUT/train-hard/..., OUT/interpolate/...

with lines alternating question / answer, as `generate_to_file.py` does. Output is a pure function
of (module, counts, seed, chunk_size): every chunk of problems reseeds `random` and `numpy.random`
from its own derived seed, so the number of worker processes does not change a byte.

Run as a module (`python -m data_tools.deepmind ...`) this is the child that `generate_released`
starts when the interpreter was not launched with PYTHONHASHSEED=0.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import importlib
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatrain.data.released import TEST_SPLIT, TRAIN_SPLITS
from megatrain.errors import DataError

DEFAULT_CHUNK_SIZE = 1000
"""Problems per seeded chunk. Part of the reproducibility contract: changing it changes output."""

_TRAIN_LEVELS = {split: level for level, split in enumerate(TRAIN_SPLITS)}
_NUM_TRAIN_LEVELS = len(TRAIN_SPLITS)


def _bridge_legacy_dependencies() -> None:
    """Patches the APIs mathematics_dataset 1.0.1 needs from old sympy and numpy.

    All are fixed on the project's GitHub master but were never released to PyPI, and torch
    needs a sympy far newer than the one the release was written for.
    """
    # sympy >= 1.6 moved base_solution_linear into the diophantine.diophantine submodule;
    # `sample/polynomials.py` still imports it from the package. import_module returns the
    # package from sys.modules (the `sympy.solvers.diophantine` attribute is a function).
    diophantine_package = importlib.import_module("sympy.solvers.diophantine")
    if not hasattr(diophantine_package, "base_solution_linear"):
        from sympy.solvers.diophantine.diophantine import base_solution_linear

        diophantine_package.base_solution_linear = base_solution_linear
    # numpy >= 1.24 removed the `np.object` alias used for object arrays of sympy expressions.
    # Check __dict__ rather than hasattr: numpy's module __getattr__ warns on the old name.
    if "object" not in np.__dict__:
        np.object = object
    # numpy >= 2.0 removed ndarray.itemset, which `sample/polynomials.py` calls on the arrays it
    # makes with np.zeros / np.empty (every polynomials__* and most *_composed modules). ndarray
    # is a C type, so give that one module a numpy whose zeros/empty return a subclass with it.
    if not hasattr(np.ndarray, "itemset"):
        from mathematics_dataset.sample import polynomials as sample_polynomials

        if not isinstance(sample_polynomials.np, _NumpyWithItemset):
            sample_polynomials.np = _NumpyWithItemset()


class _ItemsetArray(np.ndarray):
    """An ndarray with numpy 1.x's `itemset(index, value)` (the form the generator uses)."""

    def itemset(self, index, value) -> None:
        self[index] = value


class _NumpyWithItemset(types.ModuleType):
    """numpy, except that zeros() and empty() return `_ItemsetArray`s."""

    def __init__(self):
        super().__init__("numpy_with_itemset")

    def __getattr__(self, name: str):
        return getattr(np, name)

    @staticmethod
    def zeros(*args, **kwargs) -> np.ndarray:
        return np.zeros(*args, **kwargs).view(_ItemsetArray)

    @staticmethod
    def empty(*args, **kwargs) -> np.ndarray:
        return np.empty(*args, **kwargs).view(_ItemsetArray)


def _load_generator():
    """Imports the generator after bridging its dependencies.

    Returns:
        The `(modules, generate_settings)` modules of mathematics_dataset.
    """
    _bridge_legacy_dependencies()
    from mathematics_dataset import generate_settings
    from mathematics_dataset.modules import modules

    return modules, generate_settings


def _make_entropy_fn(level: int, num_levels: int) -> Callable[[tuple[float, float]], tuple[float, float]]:
    """Restricts an entropy range to its `level`-th of `num_levels` slices.

    Same semantics as `mathematics_dataset.generate._make_entropy_fn`, which cannot be imported
    without defining its absl flags.
    """
    lower = level / num_levels
    upper = (level + 1) / num_levels

    def modify_entropy(range_: tuple[float, float]) -> tuple[float, float]:
        length = range_[1] - range_[0]
        return (range_[0] + lower * length, range_[0] + upper * length)

    return modify_entropy


def _flatten(nested: dict, prefix: str | None = None) -> dict[str, Callable]:
    """Flattens {"algebra": {"linear_1d": fn}} into {"algebra__linear_1d": fn}, sorted by name.

    Same naming as `generate._filter_and_flatten` without its FLAGS.filter.
    """
    flat = {}
    for key, module_or_function in nested.items():
        full_name = f"{prefix}__{key}" if prefix is not None else key
        if isinstance(module_or_function, dict):
            flat.update(_flatten(module_or_function, full_name))
        else:
            flat[full_name] = module_or_function
    return dict(sorted(flat.items()))


def _split_modules(split: str) -> dict[str, Callable]:
    """Returns the flattened problem functions of one split."""
    modules, _ = _load_generator()
    if split == TEST_SPLIT:
        return _flatten(modules.test())
    return _flatten(modules.train(_make_entropy_fn(_TRAIN_LEVELS[split], _NUM_TRAIN_LEVELS)))


def module_names() -> list[str]:
    """Returns the sorted names of the modules that have both train and interpolate problems."""
    return sorted(set(_split_modules(TRAIN_SPLITS[0])) & set(_split_modules(TEST_SPLIT)))


def _check_module(module: str) -> None:
    """Raises DataError for a module name the generator does not know."""
    names = module_names()
    if module in names:
        return
    close_matches = difflib.get_close_matches(module, names, n=3)
    if close_matches:
        hint = f"did you mean {', '.join(close_matches)}?"
    else:
        hint = f"valid names include {', '.join(names[:4])}"
    raise DataError(f"unknown DeepMind module {module!r}; {hint} ({len(names)} modules in all)")


def _sample_problem(problem_fn: Callable, max_question_length: int, max_answer_length: int) -> tuple[str, str]:
    """Samples until a problem fits the length limits, as `generate.sample_from_module` does.

    Reimplemented because the original reads FLAGS.show_dropped, which needs parsed absl flags.
    """
    while True:
        problem = problem_fn()
        question = str(problem.question)
        if len(question) > max_question_length:
            continue
        answer = str(problem.answer)
        if len(answer) > max_answer_length:
            continue
        return question, answer


@dataclass(frozen=True)
class _Chunk:
    """One unit of work: `count` problems of one (split, module), seeded on its own."""

    split: str
    module: str
    index: int
    count: int
    seed: int


def _chunk_seed(seed: int, split: str, module: str, index: int) -> int:
    """Derives a 32-bit seed per (split, module, chunk) so splits and chunks are independent."""
    digest = hashlib.sha256(f"{seed}/{split}/{module}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def split_train_count(train: int) -> dict[str, int]:
    """Splits `train` problems over the three difficulty levels, remainder to the first ones."""
    base, remainder = divmod(train, _NUM_TRAIN_LEVELS)
    return {split: base + (1 if level < remainder else 0) for level, split in enumerate(TRAIN_SPLITS)}


def _plan_chunks(module: str, train: int, test: int, seed: int, chunk_size: int) -> list[_Chunk]:
    """Cuts every split's count into chunks, in output order."""
    counts = {**split_train_count(train), TEST_SPLIT: test}
    chunks = []
    for split, count in counts.items():
        for index, start in enumerate(range(0, count, chunk_size)):
            chunk_count = min(chunk_size, count - start)
            chunks.append(_Chunk(split, module, index, chunk_count, _chunk_seed(seed, split, module, index)))
    return chunks


def _generate_chunk(chunk: _Chunk) -> str:
    """Generates one chunk and returns its lines ("question\\nanswer\\n" per problem)."""
    _, generate_settings = _load_generator()
    problem_fn = _split_modules(chunk.split)[chunk.module]
    random.seed(chunk.seed)
    np.random.seed(chunk.seed)
    lines = []
    for _ in range(chunk.count):
        question, answer = _sample_problem(
            problem_fn, generate_settings.MAX_QUESTION_LENGTH, generate_settings.MAX_ANSWER_LENGTH
        )
        lines.append(f"{question}\n{answer}\n")
    return "".join(lines)


def _hash_seed_is_zero() -> bool:
    """True when this interpreter and the processes it spawns hash strings with seed 0."""
    # The environment variable alone can be set after start-up (e.g. by a test); the flag says
    # whether this interpreter really started with it, and the variable reaches spawned workers.
    return os.environ.get("PYTHONHASHSEED") == "0" and sys.flags.hash_randomization == 0


def default_workers() -> int:
    """Default number of generator processes: min(2, cpu_count)."""
    return max(1, min(2, os.cpu_count() or 1))


def parse_modules(modules: str | Sequence[str]) -> list[str]:
    """"a,b" or ["a", "b"] -> ["a", "b"], without duplicates, in the order given."""
    names = modules.split(",") if isinstance(modules, str) else list(modules)
    return list(dict.fromkeys(name.strip() for name in names if name.strip()))


def generate_released(
    out_dir: str | Path,
    module: str | Sequence[str],
    train: int,
    test: int,
    seed: int,
    workers: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = True,
) -> Path:
    """Generates `train` + `test` problems of each module in the released v1.0 layout.

    Args:
        out_dir: Folder to create; must not exist. Written atomically (temp folder + rename).
        module: Flattened module name, e.g. "algebra__linear_1d"; or several ("a,b" or a list). A
            module's files are the same whether it is generated alone or with others.
        train: Problems per module, split over train-easy/medium/hard (remainder to the first ones).
        test: Problems per module in interpolate.
        seed: Base seed; the same seed gives byte-identical files.
        workers: Generator processes (default min(2, cpu_count)); does not change the output.
        chunk_size: Problems per seeded chunk; changing it changes the output.
        progress: Show a tqdm progress bar on stderr.

    Returns:
        `out_dir` as a Path.

    Raises:
        DataError: `out_dir` exists, the module is unknown or a count is negative.
    """
    out_dir = Path(out_dir)
    workers = default_workers() if workers is None else workers
    if out_dir.exists():
        raise DataError(f"{out_dir} already exists; remove it or choose another --out for the generated problems")
    if train < 0 or test < 0 or workers < 1 or chunk_size < 1:
        raise DataError(
            f"--train ({train}) and --test ({test}) must be >= 0, --workers ({workers}) and chunk size "
            f"({chunk_size}) >= 1; fix the generate arguments"
        )
    modules = parse_modules(module)
    if not modules:
        raise DataError("no module named; pass --module NAME (or NAME,NAME,...)")
    for name in modules:
        _check_module(name)
    module = ",".join(modules)
    if not _hash_seed_is_zero():
        _generate_in_subprocess(out_dir, module, train, test, seed, workers, chunk_size, progress)
    else:
        _generate_here(out_dir, module, train, test, seed, workers, chunk_size, progress)
    return out_dir


def _generate_in_subprocess(
    out_dir: Path, module: str, train: int, test: int, seed: int, workers: int, chunk_size: int, progress: bool
) -> None:
    """Re-runs the generation in a child interpreter started with PYTHONHASHSEED=0.

    The generator's output depends on str hashing (it iterates sets and dicts of names): the same
    seeds under two PYTHONHASHSEED values give different problems.
    """
    package_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONHASHSEED="0")
    # The child must import data_tools even when megatrain is not installed (run from a checkout).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    command = [
        sys.executable, "-m", "data_tools.deepmind",
        "--out", str(out_dir), "--module", module, "--train", str(train), "--test", str(test),
        "--seed", str(seed), "--workers", str(workers), "--chunk-size", str(chunk_size),
    ]  # fmt: skip
    if not progress:
        command.append("--no-progress")
    completed = subprocess.run(command, env=env, check=False)
    if completed.returncode != 0:
        raise DataError(
            f"generating {out_dir} in a PYTHONHASHSEED=0 subprocess failed (exit status "
            f"{completed.returncode}); see its error above"
        )


def _generate_here(
    out_dir: Path, module: str, train: int, test: int, seed: int, workers: int, chunk_size: int, progress: bool
) -> None:
    """Generates into a temp folder next to `out_dir`, then renames it into place."""
    from tqdm import tqdm

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    modules = parse_modules(module)
    chunks = [chunk for name in modules for chunk in _plan_chunks(name, train, test, seed, chunk_size)]
    temp_parent = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    # mkdtemp makes a private (0700) folder; the folder that gets renamed is made with the umask.
    temp_dir = temp_parent / out_dir.name
    try:
        for split in (*TRAIN_SPLITS, TEST_SPLIT):
            (temp_dir / split).mkdir(parents=True)
        desc = modules[0] if len(modules) == 1 else f"{len(modules)} modules"
        with tqdm(total=(train + test) * len(modules), unit="problem", desc=desc, disable=not progress) as bar:
            files = {}
            try:
                for chunk, text in zip(chunks, _run_chunks(chunks, workers)):
                    key = (chunk.split, chunk.module)
                    if key not in files:
                        files[key] = open(temp_dir / chunk.split / f"{chunk.module}.txt", "w", encoding="utf-8")
                    files[key].write(text)
                    bar.update(chunk.count)
            finally:
                for file in files.values():
                    file.close()
        # A split with zero problems still gets its (empty) file, as the released layout has one.
        for split in (*TRAIN_SPLITS, TEST_SPLIT):
            for name in modules:
                (temp_dir / split / f"{name}.txt").touch()
        os.rename(temp_dir, out_dir)
    finally:
        shutil.rmtree(temp_parent, ignore_errors=True)


def _run_chunks(chunks: list[_Chunk], workers: int) -> Iterator[str]:
    """Yields each chunk's text in plan order, from a process pool when it helps."""
    if workers == 1 or len(chunks) <= 1:
        for chunk in chunks:
            yield _generate_chunk(chunk)
        return
    with multiprocessing.get_context().Pool(min(workers, len(chunks))) as pool:
        # imap keeps plan order, so files are written sequentially while workers run ahead.
        yield from pool.imap(_generate_chunk, chunks, chunksize=1)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the PYTHONHASHSEED=0 child; users call `megatrain-data deepmind generate`."""
    parser = argparse.ArgumentParser(prog="python -m data_tools.deepmind", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--module", required=True)
    parser.add_argument("--train", required=True, type=int)
    parser.add_argument("--test", required=True, type=int)
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not _hash_seed_is_zero():
        print("error: run this module with PYTHONHASHSEED=0 in the environment", file=sys.stderr)
        return 2
    try:
        generate_released(
            args.out, args.module, args.train, args.test, args.seed,
            workers=args.workers, chunk_size=args.chunk_size, progress=not args.no_progress,
        )  # fmt: skip
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
