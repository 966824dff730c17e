"""Network namespaces for fleet replicas that are hosts of their own (`ip netns`, Linux, root).

A replica started inside a namespace listens on that namespace's own loopback: no process of the host reaches
its ports, only HAProxy, which connects into the namespace (`server ... namespace <name>`). The control plane
reaches it by entering the namespace for the length of a call, in the calling thread only (`entered`): the
network namespace is per thread, and a socket keeps the namespace it was made in.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
from typing import Iterator

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"
_libc = ctypes.CDLL(None, use_errno=True)


class NamespaceError(OSError):
    """A namespace could not be made, entered or left."""


def _setns(fd: int, name: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise NamespaceError(errno, f"setns into {name}: {os.strerror(errno)}")


@contextlib.contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the block with this thread in network namespace `name` (nothing changes for None)."""
    if not name:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
        try:
            _setns(target, name)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own, "the thread's own namespace")
    finally:
        os.close(own)


def available() -> bool:
    """Whether this process may make namespaces: root, with iproute2's `ip`."""
    return os.geteuid() == 0 and shutil.which("ip") is not None


def create(name: str) -> None:
    """A new namespace with its loopback up (an old one of the same name is replaced)."""
    if os.path.exists(os.path.join(NETNS_DIR, name)):
        delete(name)
    for command in (["ip", "netns", "add", name], ["ip", "-n", name, "link", "set", "lo", "up"]):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise NamespaceError(f"{' '.join(command)}: {done.stderr.strip()}")


def delete(name: str) -> None:
    subprocess.run(["ip", "netns", "delete", name], capture_output=True, text=True)


def exec_prefix(name: str | None) -> list[str]:
    """What runs a command inside namespace `name` (`ip netns exec` execs it: the PID stays the command's)."""
    return ["ip", "netns", "exec", name] if name else []
