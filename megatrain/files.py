"""Atomic file writes: a reader sees the old file or the new one, never half of one.

The one helper every writer of small state files uses (config.yaml, trainer.json, `latest`,
eval.json, data_tools' JSON reports and images).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

# mkstemp makes files 0600; a file written in place would get 0666 less the umask (teammates read a
# run's config and checkpoints). Read once at import, where no other thread can race os.umask.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_binary_file(path: str | Path, durable: bool = True) -> Iterator[IO[bytes]]:
    """Opens a temp file next to `path`; on success it is flushed to disk and replaces `path`, on
    error it is removed.

    Args:
        path: The final destination; its folder is created if missing.
        durable: fsync before the rename, so a machine crash cannot leave an empty file under the name.
            False for notes rewritten every few seconds (heartbeats): an fsync there would stall a
            training step on a shared file system, and a lost note costs nothing.

    Yields:
        A binary file object to write to.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(descriptor, 0o666 & ~_UMASK)
        with os.fdopen(descriptor, "wb") as file:
            yield file
            file.flush()
            if durable:
                os.fsync(file.fileno())  # the rename must not reach the disk before the data does
        os.replace(temp_name, path)
    except BaseException:
        os.unlink(temp_name)
        raise


def atomic_write_text(path: str | Path, text: str, durable: bool = True) -> None:
    with atomic_binary_file(path, durable) as file:
        file.write(text.encode("utf-8"))
