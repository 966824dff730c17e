"""Start, wait for, query and stop a TorchServe instance: used by `make serve/stop/token` and the tests.

    python -m serve_config.server start --run-dir run --models digits [--inference-port 8080 ...]
    python -m serve_config.server token --run-dir run [--kind inference|management]
    python -m serve_config.server stop --run-dir run
    python -m serve_config.server ready --run-dir run [--models digits ...]   # readiness probe, exit 0/1
    python -m serve_config.server rotate-token --run-dir run [--kind inference|management]

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


class ArchiveError(ServerError):
    """An archive in the model store is not the one the build produced (tampered, truncated or unchecked)."""


class ModelLoadError(ServerError):
    """Some models could not be loaded; the server keeps serving the others."""

    def __init__(self, server: "Server", failed: dict[str, str]) -> None:
        self.server, self.failed = server, failed
        super().__init__("; ".join(f"{name}: {why}" for name, why in failed.items()))


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

    @classmethod
    def from_run_dir(cls, run_dir: Path) -> "Server":
        """The instance started from `run_dir`, its addresses read from the config.properties rendered there."""
        config = run_dir / "config.properties"
        if not config.exists():
            raise ServerError(f"{config} does not exist: no TorchServe was started from {run_dir} (make serve)")
        props = read_properties(config)
        port = lambda key: int(props[key].rsplit(":", 1)[1])  # noqa: E731
        return cls(run_dir.resolve(), Ports(port("inference_address"), port("management_address"), port("metrics_address"),
                                            int(props["grpc_inference_port"]), int(props["grpc_management_port"])))


def read_properties(path: Path) -> dict[str, str]:
    """A config.properties file as {key: value}, comments and blank lines left out."""
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))


def render_config(template: Path, ports: Ports, model_store: Path, host: str = "127.0.0.1") -> str:
    """The checked-in config.properties with this instance's addresses, gRPC ports and model store."""
    settings = {
        "inference_address": f"http://{host}:{ports.inference}",
        "management_address": f"http://{host}:{ports.management}",
        "metrics_address": f"http://{host}:{ports.metrics}",
        "grpc_inference_port": ports.grpc_inference,
        "grpc_management_port": ports.grpc_management,
        "model_store": model_store,
        "allowed_urls": "file://" + re.escape(str(model_store)) + "/.*",
    }
    text = template.read_text()
    for key, value in settings.items():
        text, count = re.subn(rf"^{key}=.*$", lambda _m, k=key, v=value: f"{k}={v}", text, flags=re.M)
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


def check_archive(mar: Path) -> str:
    """The archive's sha256, once it matches the `<name>.mar.sha256` the build wrote beside it and the
    files inside match the sha256s of the export manifest packed with them; ArchiveError otherwise."""
    import hashlib
    import zipfile

    recorded = mar.with_name(mar.name + ".sha256")
    if not recorded.exists():
        raise ArchiveError(f"{mar} has no {recorded.name}: only archives built by `make archive` are served")
    with open(mar, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    expected = (recorded.read_text().split() or [""])[0]
    if digest != expected:
        raise ArchiveError(f"{mar} has sha256 {digest}, not the {expected} recorded when it was built: the archive "
                           f"was changed or damaged; refusing to serve it (rebuild with `make archive MODEL={mar.stem}`)")
    try:
        with zipfile.ZipFile(mar) as archive:
            names = set(archive.namelist())
            if "manifest.json" in names:
                manifest = json.loads(archive.read("manifest.json"))
                for entry in manifest.get("artifacts", {}).values():
                    if entry["file"] not in names:
                        continue
                    with archive.open(entry["file"]) as fh:
                        if hashlib.file_digest(fh, "sha256").hexdigest() != entry["sha256"]:
                            raise ArchiveError(f"{mar}: {entry['file']} inside does not match its export manifest")
    except zipfile.BadZipFile as err:
        raise ArchiveError(f"{mar} is not a readable archive: {err}") from None
    return digest


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
        check_archive(model_store / f"{name}.mar")
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
    except ModelLoadError:
        raise  # the server keeps serving the models that loaded
    except ServerError:
        stop(run_dir)
        raise
    return server


def model_workers(server: Server, model: str, headers: dict[str, str] | None = None, *,
                  timeout: float = 10.0) -> tuple[list[dict], int]:
    """`model`'s workers as the management API lists them ([] when it answers an error), and its status code."""
    answer = requests.get(f"{server.management_url}/models/{model}",
                          headers=headers if headers is not None else server.headers("management"), timeout=timeout)
    return (answer.json()[0].get("workers", []) if answer.ok else []), answer.status_code


def has_ready_worker(server: Server, model: str, headers: dict[str, str]) -> tuple[bool, int]:
    """Whether the management API lists a READY worker for `model`, and the status code it answered."""
    workers, status = model_workers(server, model, headers, timeout=5)
    return any(w.get("status") == "READY" for w in workers), status


def wait_ready(server: Server, models: Sequence[str], *, timeout: float) -> None:
    """Poll until each model reports a READY worker. A model that fails to load (TorchServe logs it and
    keeps the others) is recorded with the log line that says why; when every model is either ready or
    failed, ModelLoadError names the failed ones while the server keeps serving the rest. The server
    dying, or a model neither ready nor failed by `timeout`, is a ServerError."""
    deadline = time.monotonic() + timeout
    pending, failed = list(models), {}
    while time.monotonic() < deadline:
        pid = server.pid()
        if pid is None or not _alive(pid):
            raise ServerError(f"TorchServe exited during start-up; see {server.run_dir / OUT_FILE} and "
                              f"{server.run_dir / 'logs'}:\n{_tail(server.run_dir / OUT_FILE)}")
        try:
            headers = server.headers("management")
            for name in list(pending):
                if has_ready_worker(server, name, headers)[0]:
                    pending.remove(name)
                elif (why := load_failure(server.run_dir, name)) is not None:
                    pending.remove(name)
                    failed[name] = why
        except (ServerError, requests.RequestException, ValueError, KeyError, IndexError):
            pass  # not up yet: no key file, no listener, or a model not registered so far
        if not pending:
            if failed:
                raise ModelLoadError(server, failed)
            return
        time.sleep(0.5)
    raise ServerError(f"models {pending} not ready after {timeout:.0f}s; see {server.run_dir / 'logs'}:\n"
                      f"{_tail(server.run_dir / 'logs' / 'model_log.log')}")


# How TorchServe's frontend says a model did not load: registration failed (a corrupt or unreadable
# archive), or the worker's load step failed (a missing file, an exception in the handler's initialize).
_LOAD_FAILED = ("Failed to load model", "Load model failed", "Model {name} failed", "Failed to register model")


def load_failure(run_dir: Path, model: str) -> str | None:
    """The first log line saying `model` failed to load, or None."""
    for log in (run_dir / "logs" / "ts_log.log", run_dir / OUT_FILE):
        if not log.exists():
            continue
        for line in log.read_text(errors="replace").splitlines():
            if model in line and any(p.format(name=model) in line for p in _LOAD_FAILED):
                return line.strip()[-300:]
    return None


def ready(server: Server, models: Sequence[str] | None = None) -> tuple[bool, str]:
    """Readiness for probes: /ping (with the inference key, which TorchServe requires) is Healthy and each
    model (default: every registered one) has a READY worker. (ok, one line saying why)."""
    try:
        ping = requests.get(f"{server.inference_url}/ping", headers=server.headers(), timeout=5)
        if not ping.ok or ping.json().get("status") != "Healthy":
            return False, f"/ping answered {ping.status_code} {ping.text.strip()[:100]}"
        mgmt = server.headers("management")
        if models is None:
            listed = requests.get(f"{server.management_url}/models", headers=mgmt, timeout=5).json()["models"]
            models = [m["modelName"] for m in listed]
        for name in models:
            ok, status = has_ready_worker(server, name, mgmt)
            if not ok:
                return False, f"{name}: no READY worker ({status})"
        return True, f"ready: {', '.join(models)}"
    except (ServerError, requests.RequestException, ValueError, KeyError, IndexError) as err:
        return False, f"not ready: {err}"


def rotate_token(server: Server, kind: str = "inference") -> str:
    """Replace the `kind` key through TorchServe's token API (authorised by the API key); the old key stops
    working at once and key_file.json holds the new one, which is returned."""
    if kind not in ("inference", "management"):
        raise ServerError(f"kind must be inference or management, got {kind!r}")
    old = server.keys()[kind]
    answer = requests.get(f"{server.management_url}/token", params={"type": kind}, timeout=10,
                          headers={"Authorization": f"Bearer {server.keys()['api']}"})
    if not answer.ok:
        raise ServerError(f"token API answered {answer.status_code}: {answer.text.strip()[:200]}")
    new = server.keys()[kind]
    if new == old:
        raise ServerError(f"the {kind} key did not change")
    return new


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
    """A ready-to-paste curl line for `model`: a text for a text model, else its first committed fixture."""
    from models import registry

    url = f"{server.inference_url}/predictions/{model}"
    auth = '-H "Authorization: Bearer $(make -s token)"'
    if model in registry.REGISTRY and registry.get(model).kind == "text-embedding":
        return f'curl {auth} -H "Content-Type: text/plain" --data-binary "A sentence to embed." {url}'
    fixtures = sorted((ROOT / "tests" / "fixtures" / model).glob("*.*"))
    path = fixtures[0].relative_to(ROOT) if fixtures else Path("<image-file>")
    media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f'curl {auth} -H "Content-Type: {media}" --data-binary @{path} {url}'


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
    p_ready = sub.add_parser("ready", help="readiness probe: exit 0 when /ping is Healthy and every model has a "
                                           "READY worker (usable as a Kubernetes exec probe)")
    p_ready.add_argument("--models", nargs="*")
    p_rotate = sub.add_parser("rotate-token", help="replace the inference or management key of the running server")
    p_rotate.add_argument("--kind", choices=("inference", "management"), default="inference")
    for p in (p_start, p_token, sub.choices["stop"], p_ready, p_rotate):
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
        elif args.cmd in ("ready", "rotate-token"):
            server = Server.from_run_dir(args.run_dir)
            if args.cmd == "ready":
                ok, why = ready(server, args.models or None)
                print(why)
                return 0 if ok else 1
            rotate_token(server, args.kind)
            print(f"the {args.kind} key was replaced; the old one no longer works (`make -s token` prints the new one)")
        else:
            print("stopped TorchServe" if stop(args.run_dir) else "no TorchServe was running from " + str(args.run_dir))
    except ModelLoadError as err:
        served = [m for m in args.models if m not in err.failed]
        print(f"TorchServe is up (PID {err.server.pid()}) and serving {', '.join(served) or 'no model'}, but these "
              f"models failed to load and are not served:", file=sys.stderr)
        for name, why in err.failed.items():
            print(f"  {name}: {why}", file=sys.stderr)
        print(f"  logs: {err.server.run_dir / 'logs'}", file=sys.stderr)
        return 1
    except ServerError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
