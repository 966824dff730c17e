"""Start, wait for and stop a TorchServe instance.

The server runs in its own process group, led by a supervisor (serve_config/control/supervisor.py) that restarts
TorchServe when it dies, on the versions the run directory serves (serve_config/control/deploys.py). The leader's
PID is recorded in torchserve.pid with the boot and the start time it had (serve_config/control/records.py);
stopping signals that group by PID, never by name, and never a PID whose record is stale. Before anything
starts, each port is checked free (PortInUse names the holder). TorchServe sees only this module's settings:
the caller's TS_* variables (TS_CONFIG_FILE among them, which TorchServe would prefer to --ts-config) are left
out of its environment. Its logs are files bounded by size (serve_config/log4j2.xml). Every archive is checked
against the sha256 its build recorded before TorchServe sees it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from export.manifest import copy_archive
from models.durable import write_atomic
from models.paths import FULL, ROOT
from serve_config.control.access import ready
from serve_config.control.instance import (CONFIG_FILE, KEY_FILE, NETNS_FILE, OUT_FILE, PID_FILE, Ports, Server,
                                           ServerError, port_free, port_holder, read_properties, write_keys)
from serve_config.control.netns import exec_prefix
from serve_config.control import building, deploys, supervisor
from serve_config.control.records import owned_pid, record_pid

TEMPLATE = ROOT / "serve_config" / "config.properties"
LOG_CONFIG = ROOT / "serve_config" / "log4j2.xml"
# The frontend's endpoint plugins: the OIP's model metadata, readiness and infer routes (handlers/frontend),
# built by `make plugin` from source against the installed TorchServe's jar.
PLUGINS_DIR = ROOT / "build" / "plugins"
PLUGIN_JAR = "oip-endpoint.jar"


class PortInUse(ServerError):
    """Ports the instance needs are taken: {port's role in Ports: (port, who holds it or None)}."""

    def __init__(self, taken: dict[str, tuple[int, str | None]]) -> None:
        self.taken = taken
        super().__init__("; ".join(f"port {port} ({role.replace('_', ' ')}) is taken"
                                   + (f" by {who}" if who else "") for role, (port, who) in taken.items()))


class ModelLoadError(ServerError):
    """Some models could not be loaded; the server keeps serving the others."""

    def __init__(self, server: Server, failed: dict[str, str]) -> None:
        self.server, self.failed = server, failed
        super().__init__("; ".join(f"{name}: {why}" for name, why in failed.items()))


def render_config(template: Path, ports: Ports, model_store: Path, host: str = "127.0.0.1",
                  overrides: dict[str, str] | None = None, plugins: Path = PLUGINS_DIR) -> str:
    """The checked-in config.properties with this instance's addresses, gRPC ports, model store and endpoint
    plugins folder, and `overrides` of settings the template already has."""
    settings = {
        "plugins_path": plugins,
        "inference_address": f"http://{host}:{ports.inference}",
        "management_address": f"http://{host}:{ports.management}",
        "metrics_address": f"http://{host}:{ports.metrics}",
        "grpc_inference_port": ports.grpc_inference,
        "grpc_management_port": ports.grpc_management,
        "model_store": model_store,
        "allowed_urls": "file://" + re.escape(str(model_store)) + "/.*",
        **(overrides or {}),
    }
    # the plugin's agent: endpoint plugins read request bodies, registrations stay inside the model store
    # (handlers/frontend/.../FrontendPatches)
    vmargs = settings.get("vmargs", read_properties(template).get("vmargs", ""))
    settings["vmargs"] = f"{vmargs} -javaagent:{plugins / PLUGIN_JAR}"
    text = template.read_text()
    for key, value in settings.items():
        text, count = re.subn(rf"^{key}=.*$", lambda _m, k=key, v=value: f"{k}={v}", text, flags=re.M)
        if count != 1:
            raise ServerError(f"{template} must set {key} exactly once")
    return text


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


def refuse_if_running(run_dir: Path) -> None:
    """ServerError when a TorchServe started from `run_dir` is still running."""
    if (pid := owned_pid(run_dir / PID_FILE)) is not None and _alive(pid):
        raise ServerError(f"a TorchServe from {run_dir} is already running (PID {pid}); `make stop` first")


def start(run_dir: Path, models: Sequence[str], *, ports: Ports = Ports(), model_store: Path = FULL.model_store,
          template: Path = TEMPLATE, timeout: float = 180.0, extra_env: dict[str, str] | None = None,
          overrides: dict[str, str] | None = None, netns: str | None = None, log_config: Path = LOG_CONFIG,
          keys: dict[str, str] | None = None, python: Path | None = None) -> Server:
    """Start TorchServe serving `models` from `model_store` and wait until every model has a ready worker.
    `overrides` replace settings of the template (render_config); `netns` runs it inside that network namespace
    (serve_config/control/netns.py), where its loopback addresses are its own; `keys` (inference, management,
    api) are the keys it takes, instead of new random ones (a fleet's replicas share the keys their balancer
    sends). Either way a restart by the supervisor keeps the keys. `python`: the interpreter of the environment
    whose TorchServe runs, and so its workers (default: this one; the CPU image's torch-free runtime, `make cpu-venv`,
    in its test tier)."""
    run_dir = run_dir.resolve()
    server = Server(run_dir, ports, netns=netns)
    refuse_if_running(run_dir)
    with server.network():
        taken = [role for role, port in asdict(ports).items() if not port_free(server.host, port)]
    if taken:  # said now, by name, rather than as a bind error buried in TorchServe's log
        raise PortInUse({role: (getattr(ports, role), None if netns else port_holder(getattr(ports, role)))
                         for role in taken})
    if not (PLUGINS_DIR / PLUGIN_JAR).is_file():
        raise ServerError(f"{PLUGINS_DIR / PLUGIN_JAR} is missing: run `make plugin` (the OIP endpoints)")
    for name in models:
        if not (model_store / f"{name}.mar").exists():
            raise ServerError(f"{model_store}/{name}.mar is missing: run `make archive MODEL={name}`")
        # Checked, and kept as it is now: a later `make archive` rewrites the store's file, and `make rollback`
        # must still be able to go back to the version this instance serves (serve_config.rollout).
        deploys.started_copy(run_dir, name).parent.mkdir(parents=True, exist_ok=True)
        copy_archive(model_store / f"{name}.mar", deploys.started_copy(run_dir, name))
    (run_dir / "tmp").mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    if keys is not None:
        write_keys(run_dir, keys)
    else:
        (run_dir / KEY_FILE).unlink(missing_ok=True)
    config = run_dir / CONFIG_FILE
    overrides = {"building_file": run_dir / building.FILE, **(overrides or {})}
    write_atomic(config, render_config(template, ports, model_store.resolve(), overrides=overrides))
    # TorchServe reads TS_CONFIG_FILE before --ts-config, and TS_<KEY> over the config where a config enables it:
    # none of the caller's may change what runs here. extra_env is this module's callers' deliberate choice.
    env = {key: value for key, value in os.environ.items() if not key.startswith("TS_")}
    env.update({"TMPDIR": str(run_dir / "tmp"), "TEMP": str(run_dir / "tmp"), "LOG_LOCATION": str(run_dir / "logs"),
                "METRICS_LOCATION": str(run_dir / "logs"), **(extra_env or {})})
    torchserve = Path(python or sys.executable).parent / "torchserve"
    if netns:
        write_atomic(run_dir / NETNS_FILE, netns)
    else:
        (run_dir / NETNS_FILE).unlink(missing_ok=True)
    command = [*exec_prefix(netns), str(torchserve), "--start", "--foreground", "--ncs", "--ts-config", str(config),
               "--log-config", str(log_config), "--model-store", str(model_store.resolve())]
    # The supervisor leads the process group and starts TorchServe in it, each model on the version this run
    # directory serves (deploys), and again after a crash (serve_config/control/supervisor.py).
    write_atomic(run_dir / supervisor.SPEC_FILE, json.dumps({"command": command, "models": list(models),
                                                        "model_store": str(model_store.resolve())}, indent=2))
    with open(run_dir / OUT_FILE, "wb") as out:
        supervise = [sys.executable, "-m", "serve_config.control", "supervise", "--run-dir", str(run_dir)]
        process = subprocess.Popen(supervise, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    record_pid(run_dir / PID_FILE, process.pid)
    try:
        wait_ready(server, models, timeout=timeout)
    except ModelLoadError:
        raise  # the server keeps serving the models that loaded
    except ServerError:
        stop(run_dir)
        raise
    return server


def register(server: Server, archive: str, workers: int, *, timeout: float = 60.0) -> None:
    """Register `archive` (a file name in the instance's model store) with `workers` workers, not synchronously:
    TorchServe waits for a synchronous registration's workers on the Netty thread that took the request, and the
    inference connections sharing that event loop hang meanwhile (wrk measured requests with no answer for
    seconds). The caller polls readiness. ServerError when TorchServe refuses it."""
    import requests

    with server.network():
        answer = requests.post(f"{server.management_url}/models", headers=server.headers("management"),
                               timeout=timeout, params={"url": archive, "initial_workers": workers,
                                                        "synchronous": "false"})
    if not answer.ok:
        raise ServerError(f"POST /models answered {answer.status_code}: {answer.text.strip()[:300]}")


def add_model(server: Server, name: str, model_store: Path, *, timeout: float = 180.0) -> None:
    """Serve one more model from `model_store` on the running instance: its archive checked and kept as start()
    keeps each, added to what the supervisor serves after a restart, registered (register) with its model-config
    YAML's workers, and waited for (ModelLoadError names it when it does not load)."""
    from models.paths import model_config_values

    run_dir = server.run_dir
    if not (model_store / f"{name}.mar").exists():
        raise ServerError(f"{model_store}/{name}.mar is missing: run `make archive MODEL={name}`")
    deploys.started_copy(run_dir, name).parent.mkdir(parents=True, exist_ok=True)
    copy_archive(model_store / f"{name}.mar", deploys.started_copy(run_dir, name))
    spec = json.loads((run_dir / supervisor.SPEC_FILE).read_text())
    if name not in spec["models"]:
        spec["models"].append(name)
        write_atomic(run_dir / supervisor.SPEC_FILE, json.dumps(spec, indent=2))
    try:
        register(server, deploys.startup_archive(run_dir, name, model_store),
                 int(model_config_values(name).get("minWorkers", 1)))
    except ServerError as err:
        raise ModelLoadError(server, {name: str(err)}) from None
    wait_ready(server, [name], timeout=timeout)


def wait_ready(server: Server, models: Sequence[str], *, timeout: float) -> None:
    """Poll until each model reports a READY worker. A model that fails to load (TorchServe logs it and
    keeps the others) is recorded with the log line that says why; when every model is either ready or
    failed, ModelLoadError names the failed ones while the server keeps serving the rest. The server
    dying, or a model neither ready nor failed by `timeout`, is a ServerError."""
    deadline = time.monotonic() + timeout
    pending, failed = list(models), {}
    while time.monotonic() < deadline:
        pid = server.pid()
        out = server.run_dir / OUT_FILE
        if pid is None or not _alive(pid) or (out.exists() and supervisor.EXITED in out.read_text(errors="replace")):
            raise ServerError(f"TorchServe exited during start-up; see {server.run_dir / OUT_FILE} and "
                              f"{server.run_dir / 'logs'}:\n{_tail(server.run_dir / OUT_FILE)}\n"
                              f"{_tail(server.run_dir / 'logs' / 'ts_log.log')}")
        for name in list(pending):  # not up yet reads as not ready: no key file, no listener, not registered
            if ready(server, [name])[0]:
                pending.remove(name)
            elif (why := load_failure(server.run_dir, name)) is not None:
                pending.remove(name)
                failed[name] = why
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
    for log in (run_dir / "logs" / "ts_log.log", run_dir / "logs" / "model_log.log", run_dir / OUT_FILE):
        if not log.exists():
            continue
        for line in log.read_text(errors="replace").splitlines():
            if model in line and any(p.format(name=model) in line for p in _LOAD_FAILED):
                return line.strip()[-300:]
    return None


def stop(run_dir: Path, *, timeout: float = 30.0) -> bool:
    """Stop the instance of `run_dir` by its recorded PID (its process group). False if none was running, or the
    record was stale (removed, and nothing signalled: serve_config/control/records.py)."""
    pid_file = run_dir / PID_FILE
    if (pid := owned_pid(pid_file)) is None:
        return False
    stopped = end_group(pid, timeout=timeout)
    pid_file.unlink(missing_ok=True)
    return stopped


def end_group(pgid: int, *, timeout: float, sig: signal.Signals = signal.SIGTERM) -> bool:
    """Send `sig` to process group `pgid` and wait until it is gone, SIGKILLing what is left after `timeout`.
    False if there was no such group."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and group_alive(pgid):
        time.sleep(0.05)
    if group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
    return True


def group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` is left (its leader reaped first, if it is our child)."""
    _alive(pgid)
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
