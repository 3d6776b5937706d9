"""Reader of the DeepMind mathematics dataset released text format (v1.0).

Layout: ROOT/<split>/<module>.txt for splits train-easy, train-medium, train-hard, interpolate and
extrapolate; each file alternates question and answer lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from megatrain.errors import DataError

TRAIN_SPLITS = ("train-easy", "train-medium", "train-hard")
TEST_SPLIT = "interpolate"


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """Reads one `<module>.txt` of alternating question / answer lines.

    Args:
        path: The module file.

    Returns:
        (question, answer) pairs in file order, trailing newlines stripped.

    Raises:
        DataError: The file is missing, empty, not UTF-8 or has an odd number of lines.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; generate it with `megatrain-data deepmind generate`")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 ({error.reason} at byte {error.start}); regenerate or re-download it")
    if not text:
        raise DataError(f"{path} is empty; regenerate it or choose a non-empty module file")
    # Split on "\n" only: str.splitlines would also break on characters such as \x0c or \u2028.
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    if len(lines) % 2:
        raise DataError(
            f"{path} has {len(lines)} lines; the released format alternates question/answer lines, "
            "so the count must be even"
        )
    # Files written on Windows keep a \r before each \n; it is not part of the text.
    lines = [line.removesuffix("\r") for line in lines]
    return list(zip(lines[0::2], lines[1::2]))


def read_split(root: str | Path, module: str, splits: Sequence[str]) -> list[tuple[str, str]]:
    """Reads one module from several splits and concatenates them in the given order.

    Args:
        root: The released folder (e.g. `mathematics_dataset-v1.0`).
        module: Module name, e.g. "algebra__linear_1d".
        splits: Split folder names, e.g. TRAIN_SPLITS or (TEST_SPLIT,).

    Returns:
        (question, answer) pairs of all splits.

    Raises:
        DataError: The root, a split folder or the module file is missing, or a file is malformed.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"released DeepMind folder {root} does not exist; create it with "
            f"`megatrain-data deepmind generate --module {module} --train N --test M --out {root}`"
        )
    pairs = []
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir():
            present = sorted(child.name for child in root.iterdir() if child.is_dir())
            raise DataError(f"split folder {split_dir} does not exist; {root} has {_describe(present)}")
        module_path = split_dir / f"{module}.txt"
        if not module_path.is_file():
            present = sorted(child.stem for child in split_dir.glob("*.txt"))
            raise DataError(f"module file {module_path} does not exist; {split_dir} has modules {_describe(present)}")
        pairs.extend(read_pairs(module_path))
    return pairs


def _describe(names: list[str], limit: int = 8) -> str:
    """Lists at most `limit` names for an error message."""
    if not names:
        return "nothing"
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"
