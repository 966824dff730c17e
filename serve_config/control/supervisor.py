"""Keeps one TorchServe running: `python -m serve_config.control supervise --run-dir <run dir>`, started by
serve_config.control.lifecycle.start as the leader of the instance's process group (its PID is the one in
torchserve.pid, so `make stop` and the fleet stop it and everything under it together).

It starts TorchServe with the command lifecycle wrote to `<run dir>/supervisor.json`, each model on the version its
run directory serves (serve_config.control.deploys), and waits. When TorchServe exits without being asked to (a
SIGKILL, an out-of-memory exit of the JVM, a crash), it ends what is left of it in the group (orphaned workers),
says so on its output (`<run dir>/torchserve.out`) and starts it again after a backoff: 1 s, doubling to 30 s at
most, back to 1 s once a run has lasted a minute. SIGTERM (make stop) ends TorchServe and the supervisor.

A frontend that hangs without exiting (stopped, deadlocked, in a GC spiral) is noticed too: the supervisor asks its
liveness route (`/ping`, with the instance's key) every LIVENESS_PERIOD_S seconds, and after LIVENESS_FAILURES checks
in a row that failed it kills the whole group at once (SIGKILL: a stopped JVM ignores SIGTERM) and starts TorchServe
again like after an exit, within about 40 s of the hang. A check fails when the frontend takes the connection and
gives no answer within LIVENESS_TIMEOUT_S (hung, from its first second on), or, once it has answered, when nothing
listens any more; a refused connection before its first answer is a frontend still starting.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import psutil

from serve_config.control import probe
from serve_config.control.deploys import startup_archive
from serve_config.control.instance import Server, ServerError

SPEC_FILE = "supervisor.json"
EXITED = "supervisor: TorchServe exited"  # how its output says TorchServe died (lifecycle.wait_ready reads it)
HUNG = "supervisor: TorchServe stopped answering"  # how its output says it killed a hung frontend
BACKOFF_S, MAX_BACKOFF_S, STEADY_S = 1.0, 30.0, 60.0
LIVENESS_PERIOD_S, LIVENESS_TIMEOUT_S, LIVENESS_FAILURES = 5.0, 5.0, 3


def say(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} supervisor: {message}", flush=True)


def command(run_dir: Path, spec: dict) -> list[str]:
    store = Path(spec["model_store"])
    return [*spec["command"], "--models", *[f"{m}={startup_archive(run_dir, m, store)}" for m in spec["models"]]]


def end_leftovers(grace: float = 10.0) -> None:
    """Stop every other process of this process group (what a killed TorchServe left: its workers); with no
    `grace`, kill them at once."""
    me, group = os.getpid(), os.getpgid(0)
    left = []
    for process in psutil.process_iter(["pid"]):
        try:
            if process.pid != me and os.getpgid(process.pid) == group:
                if grace > 0:
                    process.terminate()
                else:
                    process.kill()
                left.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    _, alive = psutil.wait_procs(left, timeout=grace)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass


ANSWERED, SILENT, ABSENT = "answered", "silent", "absent"


def liveness(run_dir: Path) -> str:
    """How the instance's frontend meets its liveness route: ANSWERED (any HTTP status within the timeout), SILENT
    (it took the connection and said nothing in time: hung) or ABSENT (not listening, or no key file yet)."""
    try:
        server = Server.from_run_dir(run_dir)
        key = server.keys()["inference"] if server.token_auth() else None
        with server.network():
            probe.get(f"{server.inference_url}/ping", key, LIVENESS_TIMEOUT_S)
        return ANSWERED
    except probe.ProbeError as err:
        return SILENT if err.silent else ABSENT
    except TimeoutError:
        return SILENT
    except (ServerError, OSError, KeyError, ValueError):
        return ABSENT


def watch(child: subprocess.Popen, run_dir: Path, stopping: Callable[[], bool]) -> int | None:
    """Wait for `child` to exit (its code), checking its frontend's liveness meanwhile: None when it hung and
    was killed with its whole group."""
    seen_alive, failures, next_check = False, 0, time.monotonic() + LIVENESS_PERIOD_S
    while (code := child.poll()) is None:
        if stopping() or time.monotonic() < next_check:
            time.sleep(0.2)
            continue
        state = liveness(run_dir)
        if state == ANSWERED:
            seen_alive, failures = True, 0
        elif state == SILENT or seen_alive:  # refused before its first answer: still starting
            failures += 1
            if failures >= LIVENESS_FAILURES and child.poll() is None and not stopping():
                say(f"TorchServe stopped answering (PID {child.pid}): {failures} liveness checks in a row without "
                    f"an answer within {LIVENESS_TIMEOUT_S:.0f} s; killing it")
                end_leftovers(grace=0)
                child.wait()
                return None
        next_check = time.monotonic() + LIVENESS_PERIOD_S
    return code


def run(run_dir: Path) -> int:
    spec = json.loads((run_dir / SPEC_FILE).read_text())
    stopping = False
    child: subprocess.Popen | None = None

    def on_term(signum, frame):  # noqa: ARG001
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    backoff, restarts = BACKOFF_S, 0
    while not stopping:
        started = time.monotonic()
        try:
            argv = command(run_dir, spec)
        except Exception as err:  # noqa: BLE001 - a lost archive: say so and try again later
            say(f"cannot start TorchServe: {err}")
            argv = None
        if argv is not None:
            child = subprocess.Popen(argv, cwd=run_dir, stdin=subprocess.DEVNULL)
            if restarts:
                say(f"TorchServe started again (PID {child.pid}, restart {restarts}), serving "
                    f"{', '.join(argv[argv.index('--models') + 1:])}")
            code = watch(child, run_dir, lambda: stopping)
            if stopping:
                child.wait()
                break
            if code is not None:
                say(f"TorchServe exited (PID {child.pid}, code {code}) while serving; restarting in {backoff:.0f} s")
        end_leftovers()
        if time.monotonic() - started >= STEADY_S:
            backoff = BACKOFF_S
        deadline = time.monotonic() + backoff
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)
        backoff, restarts = min(backoff * 2, MAX_BACKOFF_S), restarts + 1
    if child is not None:
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
    end_leftovers(grace=5.0)
    return 0

