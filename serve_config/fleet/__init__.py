"""A fleet on one machine: N TorchServe replicas behind HAProxy (`make fleet N=3`, `make fleet-stop`).

The map:
- state: what a fleet is (fleet.json in its folder), its clients' token, the keys its replicas share;
- balancer: HAProxy, its config (haproxy.cfg) and runtime API (stats, drain, states, token reload);
- this module: launch, shutdown, and a replica's crash (kill_replica);
- cli: `python -m serve_config.fleet`, behind `make fleet/fleet-stop/fleet-status/fleet-reload-token`.
A rolling update is serve_config.rollout's; each replica is an ordinary instance of serve_config.control.

The fleet lives in one folder (run/fleet by default): fleet.json, haproxy.cfg rendered from haproxy.cfg here, the
balancer's runtime socket, its JSON error pages, and one run folder per replica (replica-0, replica-1, ...).
Clients authenticate at the balancer with the token in the token file (created, mode 600, when it does not exist;
point TOKEN_FILE at a mounted Secret); the replicas keep TorchServe's token authorization on, with keys the fleet
gives them all (replica-keys.json, mode 600), which the balancer sends on.

Everything is stopped by the PIDs recorded here (with their boot and start time: a stale record is never
signalled), never by name.
"""

from __future__ import annotations

import hashlib
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from models.paths import FULL
from serve_config.control import (PID_FILE, Ports, Server, ServerError, end_group, group_alive, netns, owned_pid,
                                  port_free, port_holder, start, stop)
from serve_config.fleet.balancer import (BALANCER_PID, ERRORS, HAPROXY_TEMPLATE, command, drain, haproxy_binary,
                                         reload_token, render_haproxy, set_state, start_balancer, stats, status,
                                         stop_balancer, wait_status)
from serve_config.fleet.state import REPLICA_KEYS, STATE, Fleet, Replica, ensure_token, replica_keys

__all__ = ["BALANCER_PID", "ERRORS", "HAPROXY_TEMPLATE", "REPLICA_KEYS", "STATE", "Fleet", "Replica", "command",
           "drain", "ensure_token", "haproxy_binary", "isolation_mode", "kill_replica", "launch", "reload_token",
           "render_haproxy", "replica_keys", "set_state", "shutdown", "start_balancer", "start_replica", "stats",
           "status", "stop_balancer", "wait_status"]


def start_replica(fleet: Fleet, replica: Replica, *, timeout: float = 240.0) -> Server:
    return start(Path(replica.run_dir), fleet.models, ports=replica.server.ports, model_store=Path(fleet.model_store),
                 keys=replica_keys(fleet), timeout=timeout, netns=replica.netns)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def isolation_mode(wanted: str) -> str:
    """netns (each replica a host of its own: root and iproute2), loopback, or auto: netns where possible."""
    if wanted not in ("auto", "netns", "loopback"):
        raise ServerError(f"isolation is auto, netns or loopback, not {wanted!r}")
    if wanted == "auto":
        return "netns" if netns.available() else "loopback"
    if wanted == "netns" and not netns.available():
        raise ServerError("network namespaces need root and iproute2 (`ip`); use isolation loopback")
    return wanted


def launch(root: Path, n: int, models: Sequence[str], *, model_store: Path = FULL.model_store, port: int = 0,
           stats_port: int = 0, token_file: Path | None = None, timeout: float = 240.0,
           isolation: str = "auto") -> Fleet:
    """Start `n` replicas (in parallel) and the balancer in front of them; wait until HAProxy sees every
    replica UP. Stops what it started when any part fails.

    isolation netns: each replica runs in a network namespace of its own, on that namespace's loopback, so no
    process of the host reaches its ports; only HAProxy does, by connecting into the namespace. loopback: the
    replicas listen on the host's loopback (any local process can reach them). auto: netns where allowed."""
    root = root.resolve()
    if (root / STATE).exists():
        try:
            if _alive_group(Fleet.load(root)):
                raise ServerError(f"a fleet from {root} is running; `make fleet-stop` first")
        except (ValueError, KeyError, TypeError):
            pass
    root.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(str(root), list(models), str(model_store.resolve()), port or free_port(), stats_port or free_port(),
                  str((token_file or root / "token").resolve()))
    taken = [f"port {port} ({variable}) is taken" + (f" by {who}" if (who := port_holder(port)) else "")
             for variable, port in (("FLEET_PORT", fleet.port), ("FLEET_STATS_PORT", fleet.stats_port))
             if not port_free(fleet.bind, port)]
    if taken:  # before any replica starts, rather than as HAProxy's bind error once they all have
        raise ServerError("; ".join(taken) + "; nothing was started. Stop what holds it, or choose other ports: "
                          "make fleet FLEET_PORT=... FLEET_STATS_PORT=...")
    mode = isolation_mode(isolation)
    prefix = "tsfleet-" + hashlib.sha256(str(root).encode()).hexdigest()[:8]
    fleet.replicas = [Replica(f"replica-{i}", str(root / f"replica-{i}"), asdict(Ports.free()),
                              f"{prefix}-{i}" if mode == "netns" else None) for i in range(n)]
    fleet.save()
    try:
        for replica in fleet.replicas:
            if replica.netns:
                netns.create(replica.netns)
        replica_keys(fleet)  # made once, here: replicas starting in parallel would each make their own
        with ThreadPoolExecutor(max_workers=n) as pool:
            list(pool.map(lambda r: start_replica(fleet, r, timeout=timeout), fleet.replicas))
        start_balancer(fleet)
        wait_status(fleet, {r.name: "UP" for r in fleet.replicas}, timeout=30)
    except BaseException:
        shutdown(root)
        raise
    return fleet


def _alive_group(fleet: Fleet) -> bool:
    if (pid := owned_pid(Path(fleet.root) / BALANCER_PID)) is not None and group_alive(pid):
        return True
    return any((pid := r.server.pid()) is not None and group_alive(pid) for r in fleet.replicas)


def shutdown(root: Path) -> None:
    """Stop the balancer, then every replica, each by its recorded PID."""
    root = root.resolve()
    stop_balancer(root)
    if (root / STATE).exists():
        fleet = Fleet.load(root)
        with ThreadPoolExecutor(max_workers=max(1, len(fleet.replicas))) as pool:
            list(pool.map(lambda r: stop(Path(r.run_dir)), fleet.replicas))
        for replica in fleet.replicas:
            if replica.netns:
                netns.delete(replica.netns)


def kill_replica(fleet: Fleet, name: str) -> None:
    """SIGKILL a replica's whole TorchServe (frontend and workers: its process group), as a crash would."""
    pid = fleet.replica(name).server.pid()
    if pid is None or not end_group(pid, timeout=10, sig=signal.SIGKILL):
        raise ServerError(f"{name} is not running")
    (Path(fleet.replica(name).run_dir) / PID_FILE).unlink(missing_ok=True)
