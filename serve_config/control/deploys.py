"""Which version of each model an instance serves, kept where a restart finds it.

`make deploy` and `make rollback` (serve_config.rollout) record every version they serve in
`<run dir>/deploys/<model>.json`, oldest first, each with the archive that holds exactly that version (kept in
the same folder). The last entry is the default version. Whatever starts TorchServe for that run directory again
(the supervisor after a crash, `make stop serve`, a fleet replica restarted) starts it on that version, from the
store's `<model>-<version>.mar`, and rollback still goes back through the same history. A run directory with no
history serves the store's `<model>.mar`, as built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from export.manifest import check_archive, copy_archive
from serve_config.control.records import write_atomic

DEPLOYS_DIR = "deploys"


def history_file(run_dir: Path, model: str) -> Path:
    return run_dir / DEPLOYS_DIR / f"{model}.json"


def read_history(run_dir: Path, model: str) -> list[dict]:
    """The versions recorded for `model`, oldest first ([] when none was recorded)."""
    path = history_file(run_dir, model)
    return json.loads(path.read_text()) if path.exists() else []


def write_history(run_dir: Path, model: str, entries: Sequence[dict]) -> None:
    write_atomic(history_file(run_dir, model), json.dumps(list(entries), indent=2))


def versioned_name(model: str, version: str) -> str:
    """The store's file name of `model` at `version`, as rollout registers it."""
    return f"{model}-{version}.mar"


def startup_archive(run_dir: Path, model: str, store: Path) -> str:
    """The archive of the store (its file name) that `model` starts on in `run_dir`: its recorded default version,
    put back into the store from the kept copy when the store lost it, else the store's `<model>.mar`."""
    entries = read_history(run_dir, model)
    if not entries:
        return f"{model}.mar"
    current = entries[-1]
    name = versioned_name(model, current["version"])
    in_store = store / name
    if in_store.exists():
        check_archive(in_store)
    else:
        copy_archive(Path(current["archive"]), in_store)
    return name
