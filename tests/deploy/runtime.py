"""Start TorchServe the way the KServe runtime starts it in its pod, on this host, for the deploy tier.

A private mount namespace (unshare) gives the process the pod's file system where it matters:
- /mnt/models: the bundle, bind-mounted read-only, where KServe's storage initializer puts the storageUri;
- /opt/venv: this project's venv (the image installs the same runtime lock there);
- /opt/serve: the files the image copies there (serve_config/cluster/image.py's OPT_SERVE) and the
  built frontend plugin in plugins/, as the image lays them out;
- /tmp and /home/model-server/run: empty tmpfs, like the pod's emptyDirs, the only writable paths.
The command is the image's ENTRYPOINT (without tini, which only reaps and forwards) followed by the
ServingRuntime's args, unchanged; the environment is the Containerfile's ENV, then the runtime's env, then TS_*
address overrides so the ports are free ones on the host's loopback (the pod has a network namespace of its
own; enable_envvars_config takes them). Probes run with nsenter in the same mount namespace, in the working
directory, as a kubelet's exec probe does in the container. It runs as the invoking user (root in CI); the
container tier runs it as the image's non-root user.
"""

from __future__ import annotations

import copy
import functools
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from serve_config.control import PLUGIN_JAR, PLUGINS_DIR, Ports, end_group
from serve_config.cluster import bundle as bd
from serve_config.cluster import manifests as mf
from serve_config.cluster.image import OPT_SERVE, containerfile_env

VENV = Path(sys.prefix)  # the venv of the interpreter running the tests
WORKDIR = "/home/model-server/run"
ENTRYPOINT = ["/opt/venv/bin/python", "/opt/serve/entrypoint.py"]


PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


@functools.cache
def _rendered(source: str) -> tuple[dict, ...]:
    return tuple(mf.render(mf.SOURCES[source]))


def manifest(source: str, kind: str) -> dict:
    """The one `kind` among the rendered set `source` (cpu, gpu, kserve), rendered once per session; a copy."""
    found = [d for d in _rendered(source) if d["kind"] == kind]
    assert len(found) == 1, (source, kind, [d["kind"] for d in _rendered(source)])
    return copy.deepcopy(found[0])


def container(doc: dict) -> dict:
    """The serving container of a Deployment or a ServingRuntime."""
    spec = doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else doc["spec"]
    return spec["containers"][0]


def probes(doc: dict) -> dict[str, list[str]]:
    """{startupProbe|readinessProbe|livenessProbe: the exec command} of `doc`'s serving container."""
    return {name: container(doc)[name]["exec"]["command"] for name in PROBES}


@dataclass
class Runtime:
    process: subprocess.Popen
    ports: Ports
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.inference}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.management}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.metrics}"

    def exec(self, command: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        """`command` inside the pod's file system and working directory, with the container's environment."""
        inner = f"cd {WORKDIR} && exec {shlex.join(command)}"
        return subprocess.run(["nsenter", f"--target={self.process.pid}", "--mount", "--", "sh", "-c", inner],
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def wait_until(self, probe: list[str], timeout: float) -> subprocess.CompletedProcess:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"TorchServe exited ({self.process.returncode}):\n{self.tail()}")
            answer = self.exec(probe)
            if answer.returncode == 0 or time.monotonic() > deadline:
                return answer
            time.sleep(1)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        end_group(self.process.pid, timeout=40)


def start(runtime: dict, bundle: Path, log: Path, extra_env: dict[str, str] | None = None) -> Runtime:
    """Start the ServingRuntime's container `runtime` (its spec.containers[0]) on `bundle`."""
    ports = Ports.free()
    container = runtime["spec"]["containers"][0]
    opt_serve = log.parent / f"{log.stem}-opt-serve"  # the image's /opt/serve: its files and the plugin
    shutil.rmtree(opt_serve, ignore_errors=True)
    (opt_serve / "plugins").mkdir(parents=True)
    for name, source in OPT_SERVE.items():
        shutil.copy2(source, opt_serve / name)
    shutil.copy2(PLUGINS_DIR / PLUGIN_JAR, opt_serve / "plugins" / PLUGIN_JAR)
    env = containerfile_env()
    env.update({e["name"]: e["value"] for e in container.get("env", [])})
    env.update({"TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{ports.inference}",
                "TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{ports.management}",
                "TS_METRICS_ADDRESS": f"http://127.0.0.1:{ports.metrics}",
                "TS_GRPC_INFERENCE_PORT": str(ports.grpc_inference),
                "TS_GRPC_MANAGEMENT_PORT": str(ports.grpc_management), **(extra_env or {})})
    mounts = [
        "mount -t tmpfs tmpfs /mnt", f"mkdir -p {bd.MOUNT}",
        f"mount --bind {shlex.quote(str(bundle))} {bd.MOUNT}", f"mount -o remount,ro,bind {bd.MOUNT}",
        "mount -t tmpfs tmpfs /opt", "mkdir /opt/venv /opt/serve",
        f"mount --bind -o ro {shlex.quote(str(VENV))} /opt/venv",
        f"mount --bind -o ro {shlex.quote(str(opt_serve))} /opt/serve",
        "mount -t tmpfs tmpfs /tmp", "mount -t tmpfs tmpfs /home", f"mkdir -p {WORKDIR}",
        # The venv's scripts name its own path in their #! line: where the tmpfs hid it (a checkout under /tmp or
        # /home), it is put back, read-only, from /opt/venv.
        f"if [ ! -e {shlex.quote(str(VENV / 'bin' / 'python'))} ]; then mkdir -p {shlex.quote(str(VENV))} && "
        f"mount --bind -o ro /opt/venv {shlex.quote(str(VENV))}; fi",
        f"cd {WORKDIR}",
        f"exec {shlex.join([*ENTRYPOINT, *container['args']])}",
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-ec", " && ".join(mounts)],
                                   env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    return Runtime(process, ports, log, env)


def scale(runtime: Runtime, model: str, workers: int) -> None:
    answer = requests.put(f"{runtime.management_url}/models/{model}", timeout=120,
                          params={"min_worker": workers, "max_worker": workers, "synchronous": "true"})
    assert answer.status_code in (200, 202), answer.text
