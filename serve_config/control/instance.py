"""One TorchServe instance as the control plane sees it: its run directory, ports, addresses and keys.

Each instance lives in its own run directory: its rendered config.properties, logs, key_file.json
(TorchServe writes it to its working directory), its own temp dir (TorchServe keeps a pid file there, so two
instances never collide) and torchserve.pid, the PID of its process group's leader.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path

import psutil

from models.durable import write_atomic
from serve_config.control import netns
from serve_config.control.records import read_pid

PID_FILE, KEY_FILE, OUT_FILE, CONFIG_FILE = "torchserve.pid", "key_file.json", "torchserve.out", "config.properties"
NETNS_FILE = "netns"  # the network namespace the instance runs in, when not the host's (serve_config/control/netns.py)
KEY_KINDS = ("inference", "management", "api")


class ServerError(RuntimeError):
    """TorchServe did not start, did not become ready, did not stop, or cannot be reached."""


@dataclass(frozen=True)
class Ports:
    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071

    @classmethod
    def free(cls) -> "Ports":
        """Five distinct free loopback ports, for tests that must not collide with anything."""
        sockets = [socket.socket() for _ in range(5)]
        try:
            for s in sockets:
                s.bind(("127.0.0.1", 0))
            return cls(*(s.getsockname()[1] for s in sockets))
        finally:
            for s in sockets:
                s.close()


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on `port` of `host` now. Sockets in TIME_WAIT do not count: servers bind
    with SO_REUSEADDR, and so does this probe."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def port_holder(port: int) -> str | None:
    """Who listens on TCP `port` on this host ("PID 123 (java)"), where this user can see it; else None."""
    try:
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return f"PID {conn.pid} ({psutil.Process(conn.pid).name()})"
    except psutil.Error:
        pass
    return None


def read_properties(path: Path) -> dict[str, str]:
    """A config.properties file as {key: value}, comments and blank lines left out."""
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))


def read_keys(run_dir: Path) -> dict[str, str]:
    """{"inference": ..., "management": ..., "api": ...} from the key file TorchServe wrote in `run_dir`."""
    path = run_dir / KEY_FILE
    if not path.exists():
        raise ServerError(f"{path} does not exist: is TorchServe running from {run_dir}? (make serve)")
    data = json.loads(path.read_text())
    return {"inference": data["inference"]["key"], "management": data["management"]["key"], "api": data["API"]["key"]}


def write_keys(run_dir: Path, keys: dict[str, str]) -> None:
    """Put `keys` (as read_keys returns them) where TorchServe's frontend takes them at start-up instead of making
    its own (the frontend agent's TokenAuthorization), mode 600."""
    data = {"management": {"key": keys["management"]}, "inference": {"key": keys["inference"]},
            "API": {"key": keys["api"]}}
    write_atomic(run_dir / KEY_FILE, json.dumps(data, indent=2), mode=0o600)


@dataclass(frozen=True)
class Server:
    """A running (or stopped) instance: where it lives and how to reach it."""

    run_dir: Path
    ports: Ports
    host: str = "127.0.0.1"
    netns: str | None = None  # a network namespace of its own: its addresses are reachable only inside it

    def network(self):
        """A context in which this thread reaches the instance's addresses (inside its namespace, if any)."""
        return netns.entered(self.netns)

    @property
    def inference_url(self) -> str:
        return f"http://{self.host}:{self.ports.inference}"

    @property
    def management_url(self) -> str:
        return f"http://{self.host}:{self.ports.management}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports.metrics}"

    def pid(self) -> int | None:
        """The PID of the instance's process group leader, while its record names the process that was started
        (serve_config/control/records.py); None when there is no record, or a stale one."""
        record = read_pid(self.run_dir / PID_FILE)
        return record.pid if record is not None and not record.stale else None

    def keys(self) -> dict[str, str]:
        return read_keys(self.run_dir)

    def token_auth(self) -> bool:
        """Whether this instance checks keys: off only where its config says so (a replica behind a balancer
        that authenticates instead)."""
        config = self.run_dir / CONFIG_FILE
        return not config.exists() or read_properties(config).get("disable_token_authorization") != "true"

    def headers(self, kind: str = "inference") -> dict[str, str]:
        """The Authorization header for `kind`'s API; none where the instance checks no key."""
        return {"Authorization": f"Bearer {self.keys()[kind]}"} if self.token_auth() else {}

    @classmethod
    def from_run_dir(cls, run_dir: Path) -> "Server":
        """The instance started from `run_dir`, its addresses read from the config.properties rendered there."""
        config = run_dir / CONFIG_FILE
        if not config.exists():
            raise ServerError(f"{config} does not exist: no TorchServe was started from {run_dir} (make serve)")
        props = read_properties(config)
        port = lambda key: int(props[key].rsplit(":", 1)[1])  # noqa: E731
        namespace = (run_dir / NETNS_FILE).read_text().strip() if (run_dir / NETNS_FILE).exists() else None
        return cls(run_dir.resolve(), Ports(port("inference_address"), port("management_address"), port("metrics_address"),
                                            int(props["grpc_inference_port"]), int(props["grpc_management_port"])),
                   netns=namespace)
