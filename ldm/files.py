"""Atomic file writes, once for the whole package: whatever a user saved is never half-overwritten."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp makes 0600)


@contextmanager
def atomic_path(path: Union[str, os.PathLike], fsync: bool = False) -> Iterator[Path]:
    """A fresh temporary file beside `path` to write to; when the block ends without error it is renamed over
    `path` (os.replace: readers see the old file or the new one, never a part), else removed. fsync=True
    flushes it to disk first (checkpoints that must survive a power cut)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: its folder {path.parent} does not exist")
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else _MODE)  # as the file it replaces
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Union[str, os.PathLike], text: str) -> None:
    """Text (UTF-8) written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
