"""How a file is replaced so that a crash, a kill or a full disk never leaves half of it: the one home of that.

A file is written beside its destination under a temporary name, flushed to disk, renamed over the destination,
and the folder is flushed too (so the rename itself survives a power loss). A reader sees the old file or the new
one, never a mix. The build (export/archive.py) and the control plane (serve_config/) both write this way.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename or a new name in it) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, dest: Path, *, mode: int = 0o644) -> None:
    """Move the finished file `tmp` over `dest` (same folder), with `mode`: flushed, renamed, the folder flushed."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, dest)
    sync_folder(dest.parent)


@contextmanager
def replacing(dest: Path, *, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path beside `dest` to write the new file to; published over `dest` when the block ends
    without error, removed otherwise."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        publish(tmp, dest, mode=mode)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: str | bytes, *, mode: int = 0o644) -> None:
    """Replace `path` with `data` (text is written as UTF-8) in one step."""
    with replacing(path, mode=mode) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def copy_atomic(source: Path, dest: Path) -> None:
    """Replace `dest` with a copy of `source` in one step."""
    with replacing(dest) as tmp:
        shutil.copyfile(source, tmp)
