"""The fleet's balancer: HAProxy, its configuration (haproxy.cfg beside this file) and its runtime API
(`show stat`, `set server ... state drain|maint|ready`, ACL updates), which draining, the rolling update
(serve_config.rollout) and token reloads drive. Its health check of each replica asks the replica's readiness
route, the one readiness of serve_config/control/probe.py."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Mapping

from handlers import tracing
from models.durable import write_atomic
from serve_config.control import TEMPLATE, ServerError, end_group, owned_pid, read_properties, record_pid
from serve_config.fleet.state import Fleet, ensure_token, replica_keys

HAPROXY_TEMPLATE = Path(__file__).resolve().parent / "haproxy.cfg"
TRACING_LUA = Path(__file__).resolve().parent / "tracing.lua"
BALANCER_PID = "haproxy.pid"
ERRORS = {
    502: ("Bad Gateway", "BadGateway", "the replica answering this request failed; retry"),
    503: ("Service Unavailable", "NoReadyReplica", "no replica is ready to serve; retry with backoff"),
    504: ("Gateway Timeout", "GatewayTimeout", "the replica did not answer in time"),
}


def tracing_lines(environ: Mapping[str, str], max_body: int = 0) -> dict[str, str]:
    """haproxy.cfg's tracing lines: the balancer's span of each request (tracing.lua) when `environ` (the balancer's
    environment) names an OpenTelemetry collector, as the replicas' tracing is turned on; none otherwise. Its own
    refusals (413 past `max_body`, 401) end the span just before they answer."""
    if not tracing.enabled(environ):
        return {"tracing_global": "", "tracing_frontend": "", "tracing_refused_413": "", "tracing_refused_401": ""}
    return {"tracing_global": f"    lua-load {TRACING_LUA}\n",
            "tracing_frontend": "    # its span in the request's trace, the replica's frontend span its child (tracing.lua)\n"
                                "    http-request lua.trace_start\n    http-response lua.trace_end\n",
            "tracing_refused_413": f"    http-request lua.trace_refused 413 if {{ req.hdr_val(content-length) gt {max_body} }}\n",
            "tracing_refused_401": "    http-request lua.trace_refused 401 unless authorized\n"}


def render_haproxy(fleet: Fleet, template: Path = HAPROXY_TEMPLATE, environ: Mapping[str, str] | None = None) -> str:
    """haproxy.cfg for `fleet`: its addresses, its replicas as checked servers, the error pages and token, and its
    tracing when `environ` (by default the process's) names a collector."""
    root = Path(fleet.root)
    errors = root / "errors"
    errors.mkdir(exist_ok=True)
    for status, (reason, kind, message) in ERRORS.items():
        body = json.dumps({"code": status, "type": kind, "message": message})
        write_atomic(errors / f"{status}.http",
                     f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nCache-Control: no-cache\r\n"
                     f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n{body}")
    write_atomic(root / "bearers.lst", f"Bearer {ensure_token(Path(fleet.token_file))}\n", mode=0o600)
    bearers = root / "bearers.lst"
    max_body = int(read_properties(TEMPLATE).get("max_request_size", 8388608))
    servers = "\n".join(f"    server {r.name} 127.0.0.1:{r.ports['inference']} check"
                        + (f" namespace {r.netns}" if r.netns else "") for r in fleet.replicas)
    return template.read_text().format(socket=fleet.socket, errors=errors, bind=fleet.bind, port=fleet.port,
                                       stats_port=fleet.stats_port, bearers=bearers, max_body=max_body,
                                       servers=servers, replica_key=replica_keys(fleet)["inference"],
                                       **tracing_lines(os.environ if environ is None else environ, max_body))


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if Path(p).exists()), None)
    if found is None:
        raise ServerError("haproxy is not installed: apt-get install haproxy (Debian's package; `make prereqs`)")
    return found


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


def stop_balancer(root: Path, timeout: float = 10.0) -> None:
    pid_file = root / BALANCER_PID
    if (pid := owned_pid(pid_file)) is not None:  # a stale record is removed, and nothing signalled
        end_group(pid, timeout=timeout)
        pid_file.unlink(missing_ok=True)


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
    write_atomic(bearers, new + "\n", mode=0o600)  # what a restart of the balancer loads
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
