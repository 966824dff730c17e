"""`make serve` from a clean clone: answer as soon as the first model is built, serve each further one as soon as it
is built, and say meanwhile which are still building.

    python -m serve_config.control serve --run-dir run --models cancer digits minilm shapes \
        --build "make --no-print-directory RECIPE=full {archive}" --check "make -q RECIPE=full {archive}"

The models whose archives are already up to date (`--check` exits 0) start together; with none, the first one named
is built first (the Makefile names the default models fastest first). Each other model is then built (`--build`,
its output on the terminal: training prints an estimate of the time left after each epoch) and added to the
running server (lifecycle.add_model). Meanwhile FILE in the run directory lists the models still to come:
the readiness route names them and is not ready (handlers/frontend, Settings.building), and so `make ready` says
so. A model that fails to build or load is named at the end, the others are served; the command returns when
every model is served or has failed, as `make serve` always did.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from models.durable import write_atomic
from models.progress import duration

FILE = "building.json"


def write(run_dir: Path, waiting: Sequence[str], current: str | None = None) -> None:
    """Record the models still to come (`current`: the one being built now), or remove the record when none."""
    path = run_dir / FILE
    if not waiting:
        path.unlink(missing_ok=True)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"building": list(waiting), "current": current, "since": time.time()}))


def read(run_dir: Path) -> dict | None:
    """The record of the models still to come, or None when nothing is building."""
    try:
        record = json.loads((run_dir / FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("building") else None


def describe(record: dict | None) -> str | None:
    """One line for people: which models are still building, and for how long the current one has been."""
    if record is None:
        return None
    current, since = record.get("current"), record.get("since")
    what = ", ".join(record["building"])
    if current and since:
        return f"still building {what} ({current} for {duration(time.time() - since)})"
    return f"still building {what}"


def command(template: str, archive: Path) -> list[str]:
    return shlex.split(template.replace("{archive}", shlex.quote(str(archive))))


def serve(run_dir: Path, models: Sequence[str], *, model_store: Path, build: str, check: str,
          start: Callable[[list[str]], object], add: Callable[[object, str], None],
          say: Callable[[str], None] = print) -> dict[str, str]:
    """Serve `models` as they are built; return {model: why} of those that failed to build or load. `start(names)`
    starts the server on the first ones and returns it; `add(server, name)` serves one more."""
    run_dir = run_dir.resolve()

    def built(name: str) -> bool:
        return subprocess.run(command(check, model_store / f"{name}.mar"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL).returncode == 0

    def make(name: str, waiting: list[str]) -> bool:
        write(run_dir, waiting, current=name)
        started = time.monotonic()
        say(f"building {name} ({len(waiting) - 1} more after it)")
        ok = subprocess.run(command(build, model_store / f"{name}.mar")).returncode == 0
        say(f"{name}: {'built' if ok else 'FAILED to build'} in {duration(time.monotonic() - started)}")
        return ok

    failed: dict[str, str] = {}
    ready_now = [name for name in models if built(name)]
    waiting = [name for name in models if name not in ready_now]
    first = ready_now
    try:
        while not first and waiting:
            name = waiting[0]
            if make(name, waiting):
                first = [name]
            else:
                failed[name] = "its build failed (above)"
            waiting.pop(0)
        if not first:
            return failed
        write(run_dir, waiting)
        server = start(first)
        for index, name in enumerate(list(waiting)):
            if not make(name, waiting[index:]):
                failed[name] = "its build failed (above)"
                continue
            try:
                add(server, name)
            except Exception as err:  # noqa: BLE001 - one model that will not load costs only itself
                failed[name] = str(err).splitlines()[0][:300]
                continue
            say(f"{name} is served too")
    finally:
        write(run_dir, [])
    return failed
