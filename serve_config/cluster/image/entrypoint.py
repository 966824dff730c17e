"""The serving container's main process (under tini, which reaps zombies and passes signals on to it).

    entrypoint.py torchserve --start --foreground ...

It runs the given command: TorchServe's launcher, which starts the Java frontend, which starts the Python
workers. On SIGTERM (`docker stop`, `podman stop`, Kubernetes deleting the pod) it drains before it stops:

1. it writes the drain file (TS_DRAIN_FILE), so the readiness probe (probe.py) fails at once and the pod
   leaves its Service's endpoints while TorchServe keeps answering what still arrives;
2. after TS_DRAIN_SECONDS it sends SIGTERM to the Java frontend, which finishes its shutdown (workers
   included), and waits up to TS_STOP_SECONDS for the launcher to return; what is left is killed.

The launcher itself does not forward signals to Java (TorchServe 0.12's `--foreground` only waits), so a
plain init that signalled the launcher alone would leave the frontend to be killed mid-request. A second
SIGTERM or a SIGINT skips what is left of the drain. Exit status: 0 after a requested stop, else the
launcher's own (so a crashed frontend restarts the container).

Standard library and psutil only (TorchServe depends on psutil): it runs before anything else is up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

DRAIN_FILE = Path(os.environ.get("TS_DRAIN_FILE", "/tmp/torchserve.draining"))


def log(message: str) -> None:
    print(f"[entrypoint] {message}", file=sys.stderr, flush=True)


def seconds(name: str, default: float) -> float:
    try:
        return max(0.0, float(os.environ.get(name, default)))
    except ValueError:
        log(f"{name}={os.environ[name]!r} is not a number of seconds; using {default}")
        return default


def frontends(launcher: psutil.Process) -> list[psutil.Process]:
    """The launcher's Java children (the frontend); the launcher itself where it has none (any other command)."""
    try:
        found = [p for p in launcher.children() if "java" in os.path.basename(p.exe() or p.name())]
    except psutil.Error:
        found = []
    return found or [launcher]


def stop(launcher: subprocess.Popen, timeout: float) -> None:
    """SIGTERM the frontend, wait for the launcher to return, then kill whatever of the tree is left."""
    try:
        root = psutil.Process(launcher.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return
    for process in frontends(root):
        log(f"sending SIGTERM to PID {process.pid} ({process.name()})")
        try:
            process.terminate()
        except psutil.Error:
            pass
    try:
        launcher.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"TorchServe did not stop within {timeout:.0f}s; killing it")
    _, alive = psutil.wait_procs([p for p in tree if p.is_running()], timeout=1)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass


def main(argv: list[str]) -> int:
    if not argv:
        log("usage: entrypoint.py COMMAND [ARG ...]")
        return 2
    DRAIN_FILE.unlink(missing_ok=True)
    try:
        launcher = subprocess.Popen(argv)
    except OSError as err:
        log(f"cannot run {argv[0]}: {err}")
        return 127
    requested = threading.Event()
    hurry = threading.Event()

    def on_signal(signum: int, _frame) -> None:
        if requested.is_set() or signum == signal.SIGINT:
            hurry.set()
        requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while launcher.poll() is None and not requested.is_set():
        requested.wait(0.5)
    if not requested.is_set():
        log(f"TorchServe exited by itself with status {launcher.returncode}")
        return launcher.returncode or 1
    drain = seconds("TS_DRAIN_SECONDS", 5)
    try:
        DRAIN_FILE.write_text(f"{time.time():.3f}\n")
    except OSError as err:
        log(f"cannot write {DRAIN_FILE}: {err}; readiness will not fail before the stop")
    log(f"stop requested: draining for {drain:.0f}s (readiness now fails), then stopping TorchServe")
    hurry.wait(drain)
    stop(launcher, seconds("TS_STOP_SECONDS", 20))
    log(f"TorchServe stopped (launcher status {launcher.returncode})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
