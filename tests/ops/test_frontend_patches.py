"""The frontend agent fails closed (handlers/frontend/org/servemodels/oip/FrontendPatches.java): every class it
substitutes is in force on a running server, and a frontend that cannot substitute one does not start.

The agent's list of classes (REPLACES) is read from its source, the one list: the Makefile packs whatever the patch
folder holds, and the first test checks that the two agree."""

from __future__ import annotations

import re
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import requests

from loadtest.payloads import payloads
from serve_config import control as ts
from tests.conftest import ROOT, built
from tests.ops.servers import store_with

pytestmark = [pytest.mark.ops, pytest.mark.integration]

AGENT_SOURCE = ROOT / "handlers/frontend/org/servemodels/oip/FrontendPatches.java"
PATCHES = ROOT / "handlers/frontend/patch"


def replaced() -> dict[str, str]:
    """REPLACES of the agent's source: class (a/b/C) -> the sha256 of TorchServe 0.12.0's bytes of it."""
    text = AGENT_SOURCE.read_text()
    names = dict(re.findall(r'static final String (\w+) = "([\w/]+)";', text))
    block = text[text.index("REPLACES = Map.of("):]
    pins = re.findall(r"(\w+), \"([0-9a-f]{64})\"", block[:block.index(");")])
    return {names[constant]: digest for constant, digest in pins}


def torchserve_jar() -> Path:
    import ts as torchserve

    return Path(torchserve.__file__).parent / "frontend" / "model-server.jar"


def agent_jar() -> Path:
    return built(ts.PLUGINS_DIR / ts.PLUGIN_JAR)


def test_the_agent_lists_exactly_the_classes_of_the_patch_folder():
    in_folder = {str(p.relative_to(PATCHES).with_suffix("")) for p in PATCHES.rglob("*.java")}
    assert set(replaced()) == in_folder and len(in_folder) == 6


def test_make_builds_the_agent_from_the_frontend_sources():
    """The jar's rule is there (a built tree says "nothing to be done" without one, a fresh clone cannot build):
    a dry run that must remake it compiles both folders and packs every class of the patch folder."""
    proc = subprocess.run(["make", "-n", "-B", f"{ts.PLUGINS_DIR.relative_to(ROOT)}/{ts.PLUGIN_JAR}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("javac --release 17") == 2 and "jar --create" in proc.stdout, proc.stdout[-2000:]


def test_every_patch_announces_itself_on_a_running_server(private_server, tmp_path):
    """Each replacement says it is in force when its class initializes, and the server reports ready only once all
    have (the readiness route would answer 503 naming the rest)."""
    server = private_server(["digits"], model_store=store_with(tmp_path, "digits"))
    ready = requests.get(f"{server.inference_url}/v2/health/ready", headers=server.headers(), timeout=10)
    assert ready.status_code == 200 and "unpatched" not in ready.json(), ready.text
    said = re.findall(r"frontend agent: our ([\w/]+) is in force", (server.run_dir / ts.OUT_FILE).read_text())
    assert sorted(said) == sorted(replaced()), said
    # the edited GRPCJob loads with the first gRPC prediction, and says so then
    from loadtest.grpc_client import Client

    client = Client("127.0.0.1", server.ports.grpc_inference, server.keys()["inference"])
    try:
        client.predict("digits", payloads("digits", 1)[0].body)
    finally:
        client.close()
    for _ in range(50):
        edits = re.findall(r"frontend agent: our edit of ([\w/]+) is in force",
                           (server.run_dir / ts.OUT_FILE).read_text())
        if edits:
            break
        time.sleep(0.1)
    assert edits == ["org/pytorch/serve/job/GRPCJob"], edits


def start_jvm(agent: Path, classpath: list[Path]) -> subprocess.CompletedProcess:
    """A JVM with `agent` on TorchServe's classes, asked to run a class with no main: the agent's premain runs
    first, and either stops the JVM or lets it reach the (expected) missing-main error."""
    return subprocess.run(["java", f"-javaagent:{agent}", "-cp", ":".join(map(str, classpath)),
                           "org.pytorch.serve.util.ConnectorType"], capture_output=True, text=True, timeout=60)


def test_the_agent_lets_a_pinned_torchserve_start():
    ran = start_jvm(agent_jar(), [torchserve_jar()])
    assert "cannot substitute" not in ran.stderr and "main method" in ran.stderr.lower(), ran.stderr


def test_a_replacement_missing_from_the_agent_stops_the_frontend(tmp_path):
    tampered = tmp_path / "agent.jar"
    with zipfile.ZipFile(agent_jar()) as source, zipfile.ZipFile(tampered, "w") as target:
        for item in source.infolist():
            if not item.filename.endswith("ServerInitializer.class.bin"):
                target.writestr(item, source.read(item.filename))
    ran = start_jvm(tampered, [torchserve_jar()])
    assert ran.returncode != 0
    assert "cannot substitute org/pytorch/serve/ServerInitializer" in ran.stderr and "make plugin" in ran.stderr, ran.stderr


def test_a_grpc_job_class_other_than_the_pinned_one_stops_the_frontend(tmp_path):
    """The edited class is pinned like the substituted ones: another GRPCJob stops the JVM at start-up, named."""
    other = tmp_path / "other-torchserve.jar"
    with zipfile.ZipFile(torchserve_jar()) as source, zipfile.ZipFile(other, "w") as target:
        target.writestr("org/pytorch/serve/job/GRPCJob.class", source.read("org/pytorch/serve/util/ConnectorType.class"))
    ran = start_jvm(agent_jar(), [other, torchserve_jar()])
    assert ran.returncode != 0 and "cannot substitute org/pytorch/serve/job/GRPCJob" in ran.stderr, ran.stderr


def test_a_torchserve_class_other_than_the_pinned_one_stops_the_frontend(tmp_path):
    """Another TorchServe's TokenAuthorization first on the class path (here: some other class's bytes under its
    name): the agent names the class and its sha256, and the JVM does not start."""
    other = tmp_path / "other-torchserve.jar"
    with zipfile.ZipFile(torchserve_jar()) as source, zipfile.ZipFile(other, "w") as target:
        target.writestr("org/pytorch/serve/util/TokenAuthorization.class",
                        source.read("org/pytorch/serve/util/ConnectorType.class"))
    ran = start_jvm(agent_jar(), [other, torchserve_jar()])
    assert ran.returncode != 0
    assert "cannot substitute org/pytorch/serve/util/TokenAuthorization" in ran.stderr, ran.stderr
    assert "not 0.12.0's" in ran.stderr and "docs/protocols.md" in ran.stderr, ran.stderr
