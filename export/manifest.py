"""The export manifest: what was exported, from which checkpoint and commit, how, and each file's sha256.
Verification, archiving and the server's start read it; it is the single record of an export.

Integrity is checked in one way wherever the files lie: an export folder (before verification and archiving)
or a .mar (before serving), whose own sha256 must also match the `<name>.mar.sha256` its build wrote.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

from models import durable
from models.digest import sha256

MANIFEST = "manifest.json"
# File name per export format inside artifacts/<model>/.
ARTIFACT_FILES = {"trace": "model.trace.pt", "script": "model.script.pt", "onnx": "model.onnx",
                  "onnx_int8": "model.int8.onnx", "program": "model.program.pt2", "aoti": "model.aoti.pt2"}
ARCHIVE_DIGEST = ".sha256"  # <name>.mar.sha256 beside each archive
MAR_MANIFEST = "MAR-INF/MANIFEST.json"  # torch-model-archiver's record inside each .mar

__all__ = ["ARCHIVE_DIGEST", "ARTIFACT_FILES", "ArchiveError", "IntegrityError", "MANIFEST", "MAR_MANIFEST",
           "archive_model", "check_archive",
           "check_folder", "copy_archive", "check_integrity", "read", "sha256", "write", "write_archive_digest"]


class IntegrityError(RuntimeError):
    """A file's bytes differ from the sha256 recorded when it was built."""


class ArchiveError(IntegrityError):
    """An archive in the model store is not the one the build produced (tampered, truncated or unchecked)."""


def write(directory: Path, manifest: dict[str, Any]) -> Path:
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make export MODEL=<name>` first")
    return json.loads(path.read_text())


def recorded_files(manifest: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(what, file name, sha256) of every artifact and asset the manifest records."""
    entries = [(fmt, entry["file"], entry["sha256"]) for fmt, entry in manifest["artifacts"].items()]
    return entries + [("asset", name, digest) for name, digest in manifest.get("assets", {}).items()]


def check_integrity(where: str, manifest: dict[str, Any], opener: Callable[[str], BinaryIO | None], *,
                    only_present: bool = False) -> None:
    """Raise IntegrityError naming every recorded file whose bytes no longer match the manifest. `opener(name)`
    opens a file of the folder or archive, or returns None when it is not there (missing is a mismatch unless
    `only_present`: an archive carries only the artifact it serves)."""
    bad = []
    for what, name, expected in recorded_files(manifest):
        stream = opener(name)
        if stream is None:
            if not only_present:
                bad.append(f"{where}/{name} ({what}): missing, manifest sha256 {expected}")
            continue
        with stream:
            actual = sha256(stream)
        if actual != expected:
            bad.append(f"{where}/{name} ({what}): sha256 {actual} != manifest {expected}")
    if bad:
        raise IntegrityError("; ".join(bad))


def check_folder(directory: Path, manifest: dict[str, Any] | None = None) -> None:
    """Every artifact and asset of an export folder matches its manifest."""
    manifest = manifest if manifest is not None else read(directory)
    check_integrity(str(directory), manifest, lambda name: open(directory / name, "rb") if (directory / name).exists() else None)


def write_archive_digest(mar: Path, digest: str | None = None) -> Path:
    """Record the archive's sha256 beside it, as `sha256sum` writes it (`digest` where it is already known)."""
    path = mar.with_name(mar.name + ARCHIVE_DIGEST)
    durable.write_atomic(path, f"{digest or sha256(mar)}  {mar.name}\n")
    return path


def archive_model(archive: zipfile.ZipFile) -> dict[str, Any]:
    """The `model` record torch-model-archiver wrote into an open .mar: name, version, handler, config file."""
    return json.loads(archive.read(MAR_MANIFEST))["model"]


def copy_archive(source: Path, dest: Path) -> str:
    """Copy an archive, once it passes check_archive, with its sha256 record (the same bytes: hashed once); its
    sha256. Each file is replaced in one step; a copy killed between the two leaves an archive that fails its
    check, which the next copy replaces."""
    digest = check_archive(source)
    durable.copy_atomic(source, dest)
    write_archive_digest(dest, digest)
    return digest


def check_archive(mar: Path) -> str:
    """The archive's sha256, once it matches the `<name>.mar.sha256` the build wrote beside it and the files
    inside match the export manifest packed with them; ArchiveError otherwise."""
    recorded = mar.with_name(mar.name + ARCHIVE_DIGEST)
    if not recorded.exists():
        raise ArchiveError(f"{mar} has no {recorded.name}: only archives built by `make archive` are served")
    digest, expected = sha256(mar), (recorded.read_text().split() or [""])[0]
    if digest != expected:
        raise ArchiveError(f"{mar} has sha256 {digest}, not the {expected} recorded when it was built: the archive "
                           f"was changed or damaged; refusing to serve it (rebuild with `make archive MODEL={mar.stem}`)")
    try:
        with zipfile.ZipFile(mar) as archive:
            names = set(archive.namelist())
            if MANIFEST in names:
                opener = lambda name: archive.open(name) if name in names else None  # noqa: E731
                try:
                    check_integrity(str(mar), json.loads(archive.read(MANIFEST)), opener, only_present=True)
                except IntegrityError as err:
                    raise ArchiveError(f"{err}: the archive does not match its export manifest") from None
    except zipfile.BadZipFile as err:
        raise ArchiveError(f"{mar} is not a readable archive: {err}") from None
    return digest
