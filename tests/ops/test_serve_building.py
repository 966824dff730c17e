"""`make serve` serves each model as soon as it is built (serve_config/control/building.py): the server answers once
the first is ready, the readiness route and `make ready` name the models still building, each further model joins
the running server (and the supervisor's list, so a restart serves it), and one that fails to build is named at the
end while the others are served. A real TorchServe on free loopback ports; the stand-in build waits for the test's
word, then puts the archive make built for the test tree in place."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import requests

from loadtest.payloads import payloads
from serve_config import control as ts
from serve_config.control import building, supervisor
from tests.conftest import ROOT, TREE, built
from tests.ops.servers import store_with


def wait_for(what, predicate, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_make_serve_answers_with_the_first_model_and_adds_each_other_as_it_is_built(tmp_path):
    store = store_with(tmp_path, "digits")
    go = tmp_path / "go"
    source = built(TREE.model_store / "cancer.mar")
    # cancer "builds" once the test says go; "nope" fails to build; digits is up to date from the start
    build = (f"sh -c 'case \"$1\" in *cancer.mar) while [ ! -f {go} ]; do sleep 0.2; done; "
             f"cp {source} {source}.sha256 \"$(dirname \"$1\")\";; *) echo no recipe >&2; exit 2;; esac' _ {{archive}}")
    ports, run_dir = ts.Ports.free(), tmp_path / "run"
    command = [sys.executable, "-m", "serve_config.control", "serve", "--run-dir", str(run_dir), "--models", "digits",
               "cancer", "nope", "--model-store", str(store), "--build", build, "--check", "test -f {archive}",
               "--inference-port", str(ports.inference), "--management-port", str(ports.management),
               "--metrics-port", str(ports.metrics), "--grpc-ports", str(ports.grpc_inference),
               str(ports.grpc_management), "--timeout", "120"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("the server's keys", lambda: (run_dir / ts.KEY_FILE).exists())
        server = ts.Server.from_run_dir(run_dir)
        wait_for("digits served", lambda: ts.ready(server, ["digits"])[0])
        record = wait_for("cancer building", lambda: (building.read(run_dir) or {}).get("current") == "cancer"
                          and building.read(run_dir))
        assert record["building"] == ["cancer", "nope"]
        sample = payloads("digits", 1)[0]
        answer = requests.post(f"{server.inference_url}/predictions/digits", data=sample.body, timeout=30,
                               headers={**server.headers(), "Content-Type": sample.content_type})
        assert answer.status_code == 200, answer.text
        health = requests.get(f"{server.inference_url}/v2/health/ready", headers=server.headers(), timeout=10)
        assert health.status_code == 503 and health.json()["building"] == ["cancer", "nope"], health.text
        probe = subprocess.run([sys.executable, "-m", "serve_config.control", "ready", "--run-dir", str(run_dir)],
                               cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert probe.returncode == 1 and "still building cancer, nope (cancer for" in probe.stdout, probe.stdout
        again = subprocess.run([*command[:command.index("--build")], "--build", "false", "--check", "false"], cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "already running" in again.stderr, again.stderr
        assert building.read(run_dir)["building"] == ["cancer", "nope"]  # the running one's record is untouched
        go.touch()
        out, err = process.communicate(timeout=300)
        assert process.returncode == 1, out + err
        assert "nope: its build failed" in err and "cancer is served too" in out, out + err
        assert ts.ready(server, ["digits", "cancer"])[0] and building.read(run_dir) is None
        health = requests.get(f"{server.inference_url}/v2/health/ready", headers=server.headers(), timeout=10)
        assert health.status_code == 200 and "building" not in health.json(), health.text
        spec = json.loads((run_dir / supervisor.SPEC_FILE).read_text())
        assert spec["models"] == ["digits", "cancer"], spec  # what a restart by the supervisor serves
        probe = subprocess.run([sys.executable, "-m", "serve_config.control", "ready", "--run-dir", str(run_dir)],
                               cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert probe.returncode == 0, probe.stdout
    finally:
        go.touch()
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        ts.stop(run_dir)
