"""The one sha256 helper: of a file by path, or of an open binary stream (a member of a zip archive)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO


def sha256(source: Path | str | BinaryIO) -> str:
    """Hex sha256 of a file (read in chunks, never whole into memory) or of an already open binary stream."""
    if isinstance(source, (str, Path)):
        with open(source, "rb") as stream:
            return hashlib.file_digest(stream, "sha256").hexdigest()
    return hashlib.file_digest(source, "sha256").hexdigest()
