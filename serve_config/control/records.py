"""The files the control plane keeps about the processes it started, and how they are written.

- every file is written with `write_atomic` (models/durable.py): replaced whole or not at all, so a crash
  mid-write never leaves half a record for the next command to trip on.
- PID records (`record_pid`, `owned_pid`): a bare PID names whatever process holds that number now, which after a
  reboot, or once the process is gone, can be anyone's. A record therefore also names the boot it was made in and
  the process's start time; a PID whose record no longer matches is stale, is never signalled, and its file is
  removed. A leader that is gone while its process group lives on still counts as ours: Linux does not hand out
  a PID again while a process group of that number exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import psutil

from models.durable import write_atomic

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_SAME_START_S = 0.5  # psutil's start times come from the kernel's clock ticks: the same process reads the same


def boot_id() -> str:
    return BOOT_ID.read_text().strip() if BOOT_ID.exists() else ""


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def record_pid(path: Path, pid: int) -> None:
    """Record `pid` (a process group leader just started) with this boot and its start time."""
    write_atomic(path, json.dumps({"pid": pid, "boot_id": boot_id(), "started": _start_time(pid)}) + "\n")


@dataclass(frozen=True)
class PidRecord:
    pid: int
    stale: str | None  # why the record no longer names the process that was started, or None


def read_pid(path: Path) -> PidRecord | None:
    """What `path` records, checked against this machine now; None when there is no record."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        pid, booted, started = int(data["pid"]), str(data["boot_id"]), data["started"]
    except (ValueError, TypeError, KeyError):
        return PidRecord(-1, f"{path} is not a PID record of ours ({text.strip()[:40]!r})")
    if booted != boot_id():
        return PidRecord(pid, f"PID {pid} was recorded before this machine last booted")
    now = _start_time(pid)
    if now is None:
        return PidRecord(pid, None)  # gone; its group may live on, and no one else can hold its number meanwhile
    if started is None or abs(now - float(started)) > _SAME_START_S:
        try:
            who = psutil.Process(pid).name()
        except psutil.Error:
            who = "another process"
        return PidRecord(pid, f"PID {pid} now belongs to another process ({who}) than the one recorded")
    return PidRecord(pid, None)


def owned_pid(path: Path) -> int | None:
    """The PID `path` records while it still names the process that was started (it may have exited since);
    None when there is no record, or when the record is stale: then the file is removed, and nothing is
    signalled."""
    record = read_pid(path)
    if record is None:
        return None
    if record.stale:
        path.unlink(missing_ok=True)
        return None
    return record.pid
