"""Start, wait for, query and stop a TorchServe instance: used by `make serve/stop/token` and the tests.

    python -m serve_config.server start --run-dir run --models digits [--inference-port 8080 ...]
    python -m serve_config.server token --run-dir run [--kind inference|management]
    python -m serve_config.server stop --run-dir run

Each instance lives in its own run directory: its rendered config.properties, logs, key_file.json
(TorchServe writes it to its working directory) and its own temp dir (TorchServe keeps a pid file in
the temp dir, so two instances never collide). The server runs in its own process group, whose leader
PID is recorded in torchserve.pid; stopping signals that group by PID, never by name.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import requests

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "serve_config" / "config.properties"
PID_FILE, KEY_FILE, OUT_FILE = "torchserve.pid", "key_file.json", "torchserve.out"


class ServerError(RuntimeError):
    """TorchServe did not start, did not become ready, or did not stop."""


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


@dataclass(frozen=True)
class Server:
    """A running (or stopped) instance: where it lives and how to reach it."""

    run_dir: Path
    ports: Ports
    host: str = "127.0.0.1"

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
        path = self.run_dir / PID_FILE
        return int(path.read_text()) if path.exists() else None

    def keys(self) -> dict[str, str]:
        """{"inference": ..., "management": ..., "api": ...} from the key file TorchServe wrote."""
        return read_keys(self.run_dir)

    def headers(self, kind: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys()[kind]}"}


def render_config(template: Path, ports: Ports, model_store: Path, host: str = "127.0.0.1") -> str:
    """The checked-in config.properties with this instance's addresses, gRPC ports and model store."""
    settings = {
        "inference_address": f"http://{host}:{ports.inference}",
        "management_address": f"http://{host}:{ports.management}",
        "metrics_address": f"http://{host}:{ports.metrics}",
        "grpc_inference_port": ports.grpc_inference,
        "grpc_management_port": ports.grpc_management,
        "model_store": model_store,
    }
    text = template.read_text()
    for key, value in settings.items():
        text, count = re.subn(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
        if count != 1:
            raise ServerError(f"{template} must set {key} exactly once")
    return text


def read_keys(run_dir: Path) -> dict[str, str]:
    path = run_dir / KEY_FILE
    if not path.exists():
        raise ServerError(f"{path} does not exist: is TorchServe running from {run_dir}? (make serve)")
    data = json.loads(path.read_text())
    return {
        "inference": data["inference"]["key"],
        "management": data["management"]["key"],
        "api": data["API"]["key"],
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def start(run_dir: Path, models: Sequence[str], *, ports: Ports = Ports(), model_store: Path = ROOT / "model_store",
          template: Path = TEMPLATE, timeout: float = 180.0, extra_env: dict[str, str] | None = None) -> Server:
    """Start TorchServe serving `models` from `model_store` and wait until every model has a ready worker."""
    run_dir = run_dir.resolve()
    server = Server(run_dir, ports)
    if (pid := server.pid()) is not None and _alive(pid):
        raise ServerError(f"a TorchServe from {run_dir} is already running (PID {pid}); `make stop` first")
    for name in models:
        if not (model_store / f"{name}.mar").exists():
            raise ServerError(f"{model_store}/{name}.mar is missing: run `make archive MODEL={name}`")
    (run_dir / "tmp").mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    (run_dir / KEY_FILE).unlink(missing_ok=True)
    config = run_dir / "config.properties"
    config.write_text(render_config(template, ports, model_store.resolve()))
    env = {**os.environ, "TMPDIR": str(run_dir / "tmp"), "TEMP": str(run_dir / "tmp"),
           "LOG_LOCATION": str(run_dir / "logs"), "METRICS_LOCATION": str(run_dir / "logs"), **(extra_env or {})}
    torchserve = Path(sys.executable).parent / "torchserve"
    command = [str(torchserve), "--start", "--foreground", "--ncs", "--ts-config", str(config),
               "--model-store", str(model_store.resolve()), "--models", *[f"{m}={m}.mar" for m in models]]
    with open(run_dir / OUT_FILE, "wb") as out:
        process = subprocess.Popen(command, cwd=run_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    (run_dir / PID_FILE).write_text(str(process.pid))
    try:
        wait_ready(server, models, timeout=timeout)
    except ServerError:
        stop(run_dir)
        raise
    return server


def wait_ready(server: Server, models: Sequence[str], *, timeout: float) -> None:
    """Poll until the key file exists and each model reports a READY worker; fail early if the server dies."""
    deadline = time.monotonic() + timeout
    pending = list(models)
    while time.monotonic() < deadline:
        pid = server.pid()
        if pid is None or not _alive(pid):
            raise ServerError(f"TorchServe exited during start-up; see {server.run_dir / OUT_FILE} and "
                              f"{server.run_dir / 'logs'}:\n{_tail(server.run_dir / OUT_FILE)}")
        try:
            headers = server.headers("management")
            for name in list(pending):
                answer = requests.get(f"{server.management_url}/models/{name}", headers=headers, timeout=5)
                if answer.ok and any(w.get("status") == "READY" for w in answer.json()[0].get("workers", [])):
                    pending.remove(name)
            if not pending:
                return
        except (ServerError, requests.RequestException, ValueError, KeyError, IndexError):
            pass
        time.sleep(0.5)
    raise ServerError(f"models {pending} not ready after {timeout:.0f}s; see {server.run_dir / 'logs'}:\n"
                      f"{_tail(server.run_dir / 'logs' / 'model_log.log')}")


def stop(run_dir: Path, *, timeout: float = 30.0) -> bool:
    """Stop the instance of `run_dir` by its recorded PID (its process group). False if none was running."""
    pid_file = run_dir / PID_FILE
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text())
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _group_alive(pid):
        time.sleep(0.2)
    if _group_alive(pid):
        os.killpg(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return True


def _group_alive(pgid: int) -> bool:
    _alive(pgid)  # reaps the leader if it is our child
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def curl_example(server: Server, model: str) -> str:
    """A ready-to-paste curl line for `model`, using its first committed fixture when it has one."""
    fixtures = sorted((ROOT / "tests" / "fixtures" / model).glob("*.*"))
    path = fixtures[0].relative_to(ROOT) if fixtures else Path("<image-file>")
    media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return (f'curl -H "Authorization: Bearer $(make -s token)" -H "Content-Type: {media}" '
            f"--data-binary @{path} {server.inference_url}/predictions/{model}")


def _tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_start = sub.add_parser("start")
    p_start.add_argument("--models", nargs="+", required=True)
    p_start.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    p_start.add_argument("--inference-port", type=int, default=8080)
    p_start.add_argument("--management-port", type=int, default=8081)
    p_start.add_argument("--metrics-port", type=int, default=8082)
    p_start.add_argument("--grpc-ports", type=int, nargs=2, default=(7070, 7071), metavar=("INFERENCE", "MANAGEMENT"))
    p_start.add_argument("--timeout", type=float, default=180.0)
    p_token = sub.add_parser("token")
    p_token.add_argument("--kind", choices=("inference", "management", "api"), default="inference")
    sub.add_parser("stop")
    for p in (p_start, p_token, sub.choices["stop"]):
        p.add_argument("--run-dir", type=Path, default=ROOT / "run")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "start":
            ports = Ports(args.inference_port, args.management_port, args.metrics_port, *args.grpc_ports)
            server = start(args.run_dir, args.models, ports=ports, model_store=args.model_store, timeout=args.timeout)
            print(f"TorchServe is up (PID {server.pid()}), serving {', '.join(args.models)}\n"
                  f"  inference  {server.inference_url}\n  management {server.management_url}\n"
                  f"  metrics    {server.metrics_url}/metrics\n  logs       {server.run_dir / 'logs'}\n"
                  f"Try:\n  {curl_example(server, args.models[0])}")
        elif args.cmd == "token":
            print(read_keys(args.run_dir)[args.kind])
        else:
            print("stopped TorchServe" if stop(args.run_dir) else "no TorchServe was running from " + str(args.run_dir))
    except ServerError as err:
        print(f"ServerError: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
