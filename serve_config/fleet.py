"""A fleet on one machine: N TorchServe replicas behind HAProxy (`make fleet N=3`, `make fleet-stop`).

The fleet lives in one folder (run/fleet by default): fleet.json (where everything listens, which models, which
store), haproxy.cfg rendered from serve_config/haproxy.cfg, the balancer's runtime socket, its JSON error
pages, and one run folder per replica (replica-0, replica-1, ...), each an ordinary instance of
serve_config.control. Clients authenticate at the balancer with the token in the token file (created, mode 600,
when it does not exist; point TOKEN_FILE at a mounted Secret); the replicas keep TorchServe's token authorization
on, with keys the fleet gives them all (replica-keys.json, mode 600), which the balancer sends on.

Everything is stopped by the PIDs recorded here (with their boot and start time: a stale record is never
signalled), never by name. HAProxy's runtime API (`show stat`, `set server
... state drain|maint|ready`) drives draining and the rolling update (serve_config.rollout).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from models.paths import FULL, ROOT
from serve_config.control import (PID_FILE, TEMPLATE, Ports, Server, ServerError, end_group, group_alive, netns,
                                  owned_pid, port_free, port_holder, read_properties, record_pid, start, stop,
                                  write_atomic)
from serve_config.control.instance import KEY_KINDS

HAPROXY_TEMPLATE = ROOT / "serve_config" / "haproxy.cfg"
STATE, BALANCER_PID = "fleet.json", "haproxy.pid"
# The keys every replica takes (the frontend agent keeps a key file it finds at start-up), so the balancer can
# send them: a replica's ports refuse anyone without them, in every isolation mode.
REPLICA_KEYS = "replica-keys.json"
ERRORS = {
    502: ("Bad Gateway", "BadGateway", "the replica answering this request failed; retry"),
    503: ("Service Unavailable", "NoReadyReplica", "no replica is ready to serve; retry with backoff"),
    504: ("Gateway Timeout", "GatewayTimeout", "the replica did not answer in time"),
}


@dataclass
class Replica:
    name: str
    run_dir: str
    ports: dict
    netns: str | None = None  # its own network namespace (a host of its own), or None: the host's loopback

    @property
    def server(self) -> Server:
        return Server(Path(self.run_dir), Ports(**self.ports), netns=self.netns)


@dataclass
class Fleet:
    root: str
    models: list[str]
    model_store: str
    port: int
    stats_port: int
    token_file: str
    bind: str = "127.0.0.1"
    replicas: list[Replica] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.bind}:{self.port}"

    @property
    def socket(self) -> Path:
        return Path(self.root) / "haproxy.sock"

    def token(self) -> str:
        return Path(self.token_file).read_text().strip()

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"}

    def replica(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name == name)

    def save(self) -> None:
        (Path(self.root) / STATE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, root: Path) -> "Fleet":
        path = root / STATE
        if not path.exists():
            raise ServerError(f"{path} does not exist: no fleet was started in {root} (make fleet)")
        data = json.loads(path.read_text())
        return cls(**{**data, "replicas": [Replica(**r) for r in data["replicas"]]})


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def ensure_token(path: Path) -> str:
    """The fleet's bearer token from `path`; a new random one (written with mode 600) when there is none."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
    token = path.read_text().strip()
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ServerError(f"{path}: a token is one word of at least 16 characters")
    return token


def replica_keys(fleet: Fleet) -> dict[str, str]:
    """The replicas' keys (inference, management, api), made once per fleet folder, mode 600."""
    path = Path(fleet.root) / REPLICA_KEYS
    if not path.exists():
        write_atomic(path, json.dumps({kind: secrets.token_urlsafe(32) for kind in KEY_KINDS}),
                     mode=0o600)
    return json.loads(path.read_text())


def render_haproxy(fleet: Fleet, template: Path = HAPROXY_TEMPLATE) -> str:
    """haproxy.cfg for `fleet`: its addresses, its replicas as checked servers, the error pages and token."""
    root = Path(fleet.root)
    errors = root / "errors"
    errors.mkdir(exist_ok=True)
    for status, (reason, kind, message) in ERRORS.items():
        body = json.dumps({"code": status, "type": kind, "message": message})
        (errors / f"{status}.http").write_text(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nCache-Control: no-cache\r\n"
            f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n{body}")
    bearers = root / "bearers.lst"
    bearers.write_text(f"Bearer {ensure_token(Path(fleet.token_file))}\n")
    bearers.chmod(0o600)
    max_body = int(read_properties(TEMPLATE).get("max_request_size", 8388608))
    servers = "\n".join(f"    server {r.name} 127.0.0.1:{r.ports['inference']} check port {r.ports['management']}"
                        + (f" namespace {r.netns}" if r.netns else "") for r in fleet.replicas)
    keys = replica_keys(fleet)
    checks = "\n".join(f"    http-check connect\n    http-check send meth GET uri /models/{model} "
                       f"hdr Authorization \"Bearer {keys['management']}\"\n"
                       f"    http-check expect rstring '\"status\": \"READY\"'" for model in fleet.models)
    return template.read_text().format(socket=fleet.socket, errors=errors, bind=fleet.bind, port=fleet.port,
                                       stats_port=fleet.stats_port, bearers=bearers, max_body=max_body,
                                       servers=servers, checks=checks, replica_key=keys["inference"])


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if Path(p).exists()), None)
    if found is None:
        raise ServerError("haproxy is not installed: apt-get install haproxy (Debian's package; `make prereqs`)")
    return found


def start_replica(fleet: Fleet, replica: Replica, *, timeout: float = 240.0) -> Server:
    return start(Path(replica.run_dir), fleet.models, ports=replica.server.ports, model_store=Path(fleet.model_store),
                 keys=replica_keys(fleet), timeout=timeout, netns=replica.netns)


def start_balancer(fleet: Fleet) -> int:
    root = Path(fleet.root)
    config = root / "haproxy.cfg"
    write_atomic(config, render_haproxy(fleet), mode=0o600)  # it holds the replicas' keys
    binary = haproxy_binary()
    check = subprocess.run([binary, "-c", "-q", "-f", str(config)], capture_output=True, text=True)
    if check.returncode != 0:
        raise ServerError(f"haproxy refused {config}:\n{check.stdout}{check.stderr}")
    with open(root / "haproxy.out", "wb") as out:
        process = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, cwd=root)
    record_pid(root / BALANCER_PID, process.pid)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"haproxy exited ({process.returncode}):\n{(root / 'haproxy.out').read_text()[-2000:]}")
        if fleet.socket.exists():
            try:
                stats(fleet)
                return process.pid
            except OSError:
                pass
        time.sleep(0.1)
    raise ServerError("haproxy's runtime socket did not answer in 15 s")


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
    prefix = "tsfleet-" + sha256_text(str(root))[:8]
    fleet.replicas = [Replica(f"replica-{i}", str(root / f"replica-{i}"), asdict(Ports.free()),
                              f"{prefix}-{i}" if mode == "netns" else None) for i in range(n)]
    fleet.save()
    try:
        for replica in fleet.replicas:
            if replica.netns:
                netns.create(replica.netns)
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


def stop_balancer(root: Path, timeout: float = 10.0) -> None:
    pid_file = root / BALANCER_PID
    if (pid := owned_pid(pid_file)) is not None:  # a stale record is removed, and nothing signalled
        end_group(pid, timeout=timeout)
        pid_file.unlink(missing_ok=True)


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


# ---- HAProxy's runtime API ------------------------------------------------------------------------------

def command(fleet: Fleet, line: str) -> str:
    """One runtime API command on the balancer's socket; its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(fleet.socket))
        s.sendall(line.encode() + b"\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def stats(fleet: Fleet) -> dict[str, dict[str, str]]:
    """`show stat` of the replicas' backend: {replica: row} (status UP/DOWN/DRAIN/MAINT, scur, stot, ...)."""
    text = command(fleet, "show stat").lstrip("# ")
    rows = csv.DictReader(io.StringIO(text))
    return {r["svname"]: r for r in rows if r["pxname"] == "replicas" and r["svname"] not in ("FRONTEND", "BACKEND")}


def status(fleet: Fleet) -> dict[str, str]:
    """{replica: status word} as the balancer sees it (UP, DOWN, DRAIN, MAINT, with transitions as 'UP 1/2')."""
    return {name: row["status"] for name, row in stats(fleet).items()}


def wait_status(fleet: Fleet, wanted: dict[str, str], *, timeout: float) -> float:
    """Wait until each named replica has its wanted status; the seconds it took."""
    t0 = time.monotonic()
    while True:
        now = status(fleet)
        if all(now.get(name) == want for name, want in wanted.items()):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise ServerError(f"balancer status {now}, wanted {wanted} within {timeout:.0f}s")
        time.sleep(0.1)


def set_state(fleet: Fleet, name: str, state: str) -> None:
    """Put a replica in `state`: drain (no new requests, in-flight ones finish), maint (out) or ready (in)."""
    answer = command(fleet, f"set server replicas/{name} state {state}").strip()
    if answer:
        raise ServerError(f"haproxy refused 'state {state}' for {name}: {answer}")


def reload_token(fleet: Fleet) -> bool:
    """Take in a rotated token file (a Kubernetes Secret is updated in place) without restarting the balancer: the
    new token is added to the running ACL before the old one is removed, so no moment refuses both. False when the
    file still holds the token in use."""
    bearers = Path(fleet.root) / "bearers.lst"
    old = bearers.read_text().strip()
    new = f"Bearer {ensure_token(Path(fleet.token_file))}"
    if new == old:
        return False
    escape = lambda pattern: pattern.replace("\\", "\\\\").replace(" ", "\\ ")  # noqa: E731  (CLI words)
    for line in (f"add acl {bearers} {escape(new)}", f"del acl {bearers} {escape(old)}"):
        answer = command(fleet, line).strip()
        if answer:
            raise ServerError(f"haproxy refused '{line.split(' ', 1)[0]} acl': {answer}")
    bearers.write_text(new + "\n")  # what a restart of the balancer loads
    return True


def drain(fleet: Fleet, name: str, *, timeout: float = 60.0) -> float:
    """Stop sending new requests to `name` and wait until it holds none; the seconds it took."""
    set_state(fleet, name, "drain")
    t0 = time.monotonic()
    while int(stats(fleet)[name]["scur"] or 0) > 0:
        if time.monotonic() - t0 > timeout:
            raise ServerError(f"{name} still holds requests after {timeout:.0f}s of draining")
        time.sleep(0.05)
    return time.monotonic() - t0


# ---- command line ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_start = sub.add_parser("start", help="start N replicas behind HAProxy")
    p_start.add_argument("--replicas", type=int, default=3)
    p_start.add_argument("--models", nargs="+", required=True)
    p_start.add_argument("--model-store", type=Path, default=FULL.model_store)
    p_start.add_argument("--port", type=int, default=8090)
    p_start.add_argument("--stats-port", type=int, default=8091)
    p_start.add_argument("--token-file", type=Path)
    p_start.add_argument("--isolation", choices=("auto", "netns", "loopback"), default="auto",
                         help="each replica in a network namespace of its own (netns: root), or on the host's loopback")
    for name in ("stop", "status", "token", "reload-token"):
        sub.add_parser(name)
    for p in sub.choices.values():
        p.add_argument("--root", type=Path, default=ROOT / "run" / "fleet")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "start":
            if args.replicas < 1:
                parser.error("--replicas must be at least 1")
            fleet = launch(args.root, args.replicas, args.models, model_store=args.model_store, port=args.port,
                           stats_port=args.stats_port, token_file=args.token_file, isolation=args.isolation)
            where = "each in its own network namespace" if fleet.replicas[0].netns else "on the host's loopback"
            print(f"fleet of {args.replicas} up ({where}): {fleet.url} (token: {fleet.token_file}), per-replica stats "
                  f"http://{fleet.bind}:{fleet.stats_port}/stats")
            print(f'  curl -H "Authorization: Bearer $(cat {fleet.token_file})" -T docs/examples/digits/seven.png '
                  f"{fleet.url}/predictions/{fleet.models[0]}")
        elif args.cmd == "stop":
            shutdown(args.root)
            print(f"fleet in {args.root} stopped")
        elif args.cmd == "status":
            fleet = Fleet.load(args.root.resolve())
            for name, row in stats(fleet).items():
                print(f"{name:<12} {row['status']:<10} in flight {row['scur']:>4}  served {row['stot']:>8}  "
                      f"errors {row['eresp'] or 0}")
        elif args.cmd == "token":
            print(Fleet.load(args.root.resolve()).token())
        elif args.cmd == "reload-token":
            changed = reload_token(Fleet.load(args.root.resolve()))
            print("the balancer now takes the new token; the old one is refused" if changed
                  else "the token file holds the token in use; nothing to do")
    except (ServerError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
