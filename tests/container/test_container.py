"""The serving image, built by `make image`, run for real with podman: `make image-test` (not part of `make test`:
the build takes minutes and needs podman; .ci/run runs both).

Containers run the way the Kubernetes manifests run them: read-only root file system with tmpfs at the two
writable paths, all capabilities dropped, no privilege escalation, the image's non-root user; host network
with free ports set through TS_* variables (enable_envvars_config). Each is removed by its own name at the end.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
import uuid

import pytest
import requests

from serve_config.control import Ports
from serve_config.cluster import bundle as bd
from serve_config.cluster import image as im
from tests.conftest import SERVED, TREE, Traffic, assert_serves_every_model, built
from tests.deploy import runtime as rt

pytestmark = [pytest.mark.container, pytest.mark.integration, pytest.mark.slow]
IMAGE = os.environ.get("IMAGE", "localhost/torchserve-models:latest")
VARIANT = os.environ.get("VARIANT", "cpu")  # the variant make built (serve_config/cluster/image.py VARIANTS)
PODMAN = shlex.split(os.environ.get("PODMAN", im.PODMAN))
LOCKED_DOWN = ["--read-only", "--tmpfs", "/tmp:rw,mode=1777", "--tmpfs", "/home/model-server/run:rw,mode=1777",
               "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--network", "host"]


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=check,
                          env=im.podman_env())


class Container:
    def __init__(self, *run_args: str, env: dict[str, str] | None = None) -> None:
        self.name, self.ports = f"ts-test-{uuid.uuid4().hex[:8]}", Ports.free()
        env = {"TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{self.ports.inference}",
               "TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{self.ports.management}",
               "TS_METRICS_ADDRESS": f"http://127.0.0.1:{self.ports.metrics}",
               "TS_GRPC_INFERENCE_PORT": str(self.ports.grpc_inference),
               "TS_GRPC_MANAGEMENT_PORT": str(self.ports.grpc_management), **(env or {})}
        flags = [flag for key, value in env.items() for flag in ("--env", f"{key}={value}")]
        if podman("image", "exists", IMAGE, check=False).returncode != 0:
            pytest.fail(f"image {IMAGE} not found: run `make image` first (make image-test does)")
        podman("run", "--detach", "--name", self.name, *LOCKED_DOWN, *flags, *run_args)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports.inference}"

    def exec(self, command: list[str]) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *command, check=False, timeout=60)

    def wait_healthy(self, command: list[str], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while (answer := self.exec(command)).returncode != 0:
            state = podman("inspect", "--format", "{{.State.Running}}", self.name).stdout.strip()
            assert state == "true" and time.monotonic() < deadline, f"{answer.stdout}\n{self.logs()[-3000:]}"
            time.sleep(2)

    def logs(self) -> str:
        answer = podman("logs", self.name, check=False)
        return answer.stdout + answer.stderr

    def remove(self) -> None:
        podman("rm", "--force", "--time", "5", self.name, check=False)


@pytest.fixture(scope="module")
def image_config() -> dict:
    """The image's Config, with podman's top-level Healthcheck (the HEALTHCHECK of a docker-format image)."""
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        pytest.fail(f"image {IMAGE} not found: run `make image` first (make image-test does)")
    inspected = json.loads(podman("image", "inspect", IMAGE).stdout)[0]
    return {**inspected["Config"], "Healthcheck": inspected.get("Healthcheck") or inspected["Config"].get("Healthcheck")}


def test_the_image_is_the_runtime_only_and_runs_as_a_user(image_config):
    assert image_config["User"] == "1000:1000"
    assert image_config["Entrypoint"][:1] == ["/usr/bin/tini"]
    healthcheck = image_config["Healthcheck"]["Test"]
    assert healthcheck[0] == "CMD" and healthcheck[1:] == ["/opt/venv/bin/python", "/opt/serve/probe.py", "ready"]
    left_out = ["sklearn", "locust", "pytest", "transformers", "matplotlib"]
    if VARIANT == "cpu":  # ONNX Runtime's models alone: no torch, none of the CUDA libraries it brings
        left_out += ["torch", "torchvision", "triton", "nvidia"]
    answer = podman("run", "--rm", "--network", "host", "--entrypoint", "/opt/venv/bin/python", IMAGE, "-c",
                    "import importlib.util as u, sys; print(sys.version_info[:2], [m for m in sys.argv[1:] "
                    "if u.find_spec(m)], u.find_spec('ts') is not None)", *left_out)
    assert answer.stdout.strip() == "(3, 11) [] True", answer.stdout + answer.stderr
    size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    print(f"\n{IMAGE} ({VARIANT}): {size / 1e9:.2f} GB")


def test_the_package_indexes_reach_the_build_as_a_secret_and_stay_out_of_the_image():
    """The indexes the build installed from (this machine's pip configuration; a mirror's URL may hold
    credentials) are in no layer's history, no build argument, no environment variable and no file of the image."""
    indexes = im.pip_setting("global.extra-index-url") + im.pip_setting("global.find-links")
    if not indexes:
        pytest.skip("this machine's pip names no extra index: the build had nothing to keep secret")
    history = podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", IMAGE).stdout
    inspected = podman("image", "inspect", IMAGE).stdout
    for index in indexes:
        assert index not in history and index not in inspected, index
    found = podman("run", "--rm", "--network", "host", "--entrypoint", "/bin/sh", IMAGE, "-c",
                   "ls /run/secrets 2>/dev/null; grep -rlsF -e " + " -e ".join(shlex.quote(i) for i in indexes)
                   + " /etc /opt /home /root /tmp 2>/dev/null | head -5", check=False)
    assert found.stdout.strip() == "", found.stdout


def test_the_image_serves_every_baked_model_and_drains_on_stop():
    for spec in SERVED:
        built(TREE.archive(spec.name))
    container = Container(IMAGE)
    try:
        container.wait_healthy(["/opt/venv/bin/python", "/opt/serve/probe.py", "ready"])
        health = podman("healthcheck", "run", container.name, check=False)  # the image's own HEALTHCHECK
        assert health.returncode == 0, health.stdout + health.stderr
        assert container.exec(["id", "-u"]).stdout.strip() == "1000"
        assert container.exec(["touch", "/opt/serve/x"]).returncode != 0  # read-only root
        assert_serves_every_model(container.url)

        with Traffic(container.url, SERVED[0].name) as traffic:
            time.sleep(1)
            started = time.monotonic()
            podman("stop", "--time", "60", container.name, timeout=90)  # SIGTERM to tini, then the drain
            took = time.monotonic() - started
        state = json.loads(podman("inspect", container.name).stdout)[0]["State"]
        logs = container.logs()
        assert state["ExitCode"] == 0, logs[-3000:]
        assert took >= 5 - 0.5  # TS_DRAIN_SECONDS of the image
        answered = traffic.answered
        assert answered and set(answered) == {200}, sorted(set(map(str, traffic.statuses)))
        # Logs go to stdout: the frontend's, the workers' (MODEL_LOG), the access log, and the entrypoint's.
        for line in ("[entrypoint] stop requested: draining", "MODEL_LOG", "ACCESS_LOG", "org.pytorch.serve"):
            assert line in logs, line
        print(f"\nstop drained for {took:.1f}s; {len(answered)} requests answered during the test, all 200")
    finally:
        container.remove()


def test_the_kserve_runtime_serves_the_bundle_in_the_image(tmp_path):
    """The ServingRuntime's container as KServe would run it: the bundle read-only at /mnt/models, its args and
    env; its probes executed in the container pass, and readiness fails when a model has no worker."""
    runtime = rt.container(rt.manifest("kserve", "ServingRuntime"))
    bundle = bd.write_bundle(tmp_path / "bundle", [s.name for s in SERVED], TREE.model_store)
    env = {e["name"]: e["value"] for e in runtime["env"]}
    container = Container("--volume", f"{bundle}:{bd.MOUNT}:ro", IMAGE, *runtime["args"], env=env)
    probes = rt.probes(rt.manifest("kserve", "ServingRuntime"))
    try:
        container.wait_healthy(probes["startupProbe"])
        assert container.exec(probes["readinessProbe"]).returncode == 0
        assert container.exec(probes["livenessProbe"]).returncode == 0
        assert_serves_every_model(container.url)
        model = SERVED[0].name
        management = f"http://127.0.0.1:{container.ports.management}/models/{model}"
        requests.put(management, params={"min_worker": 0, "max_worker": 0, "synchronous": "true"}, timeout=120)
        answer = container.exec(probes["readinessProbe"])
        assert answer.returncode == 1 and f"no loaded worker for {model}" in answer.stdout, answer.stdout
        assert container.exec(probes["livenessProbe"]).returncode == 0
        requests.put(management, params={"min_worker": 1, "max_worker": 1, "synchronous": "true"}, timeout=120)
        container.wait_healthy(probes["readinessProbe"], timeout=300)
    finally:
        container.remove()
