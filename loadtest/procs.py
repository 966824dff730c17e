"""CPU accounting of process trees (a TorchServe: launcher, Java frontend, Python workers), for the bench suite
and the fleet's scaling table."""

from __future__ import annotations

import psutil


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (TorchServe: launcher, Java, workers)."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total
