"""Which version of each model an instance serves, kept where a restart finds it: the one home of the folder
contract between lifecycle (which starts an instance) and rollout (which changes its versions).

A run directory holds, per model:
- `served/<model>.mar`: a copy of the archive the instance was started with (the store's file may be rebuilt
  later), from which rollout's history begins;
- `deploys/<model>.json`: every version `make deploy` / `make rollback` (serve_config.rollout) left it on, oldest
  first, each with the archive that holds exactly that version (kept in the same folder). The last entry is the
  default version, and the history is the truth: a command killed before it wrote the history did not happen,
  and the next command puts the server back on the history's version (rollout's reconcile);
- `deploys/<model>.lock`: held (flock) by the command changing the model, so a second one is refused; the kernel
  releases it when that process ends, killed or not.

Whatever starts TorchServe for that run directory again (the supervisor after a crash, `make stop serve`, a fleet
replica restarted) starts it on the history's default version, from the store's `<model>-<version>.mar` (put back
from the kept copy when the store lost it or holds a damaged one). A run directory with no history serves the
store's `<model>.mar`, as built. Every file here is written in one step (models/durable.py).

Retention: the history keeps the last `KEEP` versions (the default one and the versions rollback can return to);
every other archive of the model's versions (those the history dropped, and those rollback left) is deleted from
the run directory and from the store.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from export.manifest import ARCHIVE_DIGEST, ArchiveError, check_archive, copy_archive
from models.durable import write_atomic
from serve_config.control.instance import ServerError

DEPLOYS_DIR = "deploys"
SERVED_DIR = "served"
KEEP = 5  # versions a history keeps: `make deploy KEEP=...` changes it


class DeployInProgress(ServerError):
    """Another command is changing this model's versions."""


def started_copy(run_dir: Path, model: str) -> Path:
    """The copy of the archive the instance of `run_dir` was started with for `model`."""
    return run_dir / SERVED_DIR / f"{model}.mar"


def history_file(run_dir: Path, model: str) -> Path:
    return run_dir / DEPLOYS_DIR / f"{model}.json"


def kept_archive(run_dir: Path, model: str, version: str) -> Path:
    """Where the history keeps the archive of `model` at `version`."""
    return run_dir / DEPLOYS_DIR / versioned_name(model, version)


def read_history(run_dir: Path, model: str) -> list[dict]:
    """The versions recorded for `model`, oldest first ([] when none was recorded)."""
    path = history_file(run_dir, model)
    return json.loads(path.read_text()) if path.exists() else []


def write_history(run_dir: Path, model: str, entries: Sequence[dict]) -> None:
    write_atomic(history_file(run_dir, model), json.dumps(list(entries), indent=2))


def versioned_name(model: str, version: str) -> str:
    """The store's file name of `model` at `version`, as rollout registers it."""
    return f"{model}-{version}.mar"


def place(source: Path, dest: Path) -> None:
    """Make `dest` hold the archive `source` holds (both with their sha256 records): copied again where it is
    missing, damaged, or left half-copied by a killed command."""
    try:
        if check_archive(dest) == check_archive(source):
            return
    except (ArchiveError, OSError):
        pass
    copy_archive(source, dest)


def startup_archive(run_dir: Path, model: str, store: Path) -> str:
    """The archive of the store (its file name) that `model` starts on in `run_dir`: its recorded default version,
    put back into the store from the kept copy where needed, else the store's `<model>.mar`."""
    entries = read_history(run_dir, model)
    if not entries:
        return f"{model}.mar"
    current = entries[-1]
    name = versioned_name(model, current["version"])
    place(Path(current["archive"]), store / name)
    return name


def retain(run_dir: Path, model: str, store: Path, entries: list[dict], keep: int) -> list[dict]:
    """The last `keep` entries of a history. Every other archive of `model`'s versions is deleted from the run
    directory and from the store: the versions the history drops now, and those rollback dropped before. (A
    fleet's replicas share the store: one that still needs such a version puts it back from its own kept copy,
    `place`.)"""
    if keep < 1:
        raise ServerError(f"a history keeps at least 1 version, not {keep}")
    kept = entries[-keep:]
    wanted = {versioned_name(model, e["version"]) for e in kept}
    for folder in (run_dir / DEPLOYS_DIR, store):
        for mar in folder.glob(versioned_name(model, "*")):
            version = mar.name[len(model) + 1:-len(".mar")]
            if mar.name not in wanted and "-" not in version:  # "-": another model's name that begins with ours
                mar.unlink(missing_ok=True)
                mar.with_name(mar.name + ARCHIVE_DIGEST).unlink(missing_ok=True)
    return kept


@contextmanager
def lock(folder: Path, model: str, what: str) -> Iterator[None]:
    """Hold `model`'s lock in `folder` (a run directory, or a fleet's) while `what` runs; DeployInProgress names
    the command that holds it. The kernel drops the lock when its holder exits, however it exits."""
    path = folder / DEPLOYS_DIR / f"{model}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "another process"
            raise DeployInProgress(f"{model}: cannot {what} while another command changes its versions ({holder}); "
                                   "wait for it to finish (the lock goes when that process ends)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{what} by PID {os.getpid()} since {time.strftime('%H:%M:%S')}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
