"""The README's commands, run as written against a real TorchServe: `make -s token` prints the key the
server wrote, and every curl line of the README answers 200 with JSON of the shape the README shows."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from tests.conftest import ROOT, SERVED

pytestmark = pytest.mark.integration
README_URL = "http://127.0.0.1:8080"


def readme_commands(start: str) -> list[str]:
    """Every command of the README's bash blocks that starts with `start` (continuation lines joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line.startswith(start)]


CURLS = readme_commands("curl ")
CLIENTS = [re.sub(r"\s+#.*$", "", c) for c in readme_commands(".venv/bin/python ")]  # trailing comments off


def test_the_readme_shows_a_call_of_every_served_model():
    for spec in SERVED:
        assert any(f"{README_URL}/predictions/{spec.name}" in line for line in CURLS), spec.name


def test_make_token_prints_the_running_servers_key(server):
    proc = subprocess.run(["make", "-s", "token", f"RUN_DIR={server.run_dir}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == server.keys()["inference"], proc.stdout + proc.stderr


@pytest.mark.parametrize("command", CURLS, ids=[f"curl{i}" for i in range(len(CURLS))])
def test_each_curl_line_of_the_readme_answers_as_shown(server, command):
    assert README_URL in command, "a README example that does not call the server `make serve` starts"
    command = command.replace(README_URL, server.inference_url).replace("curl ", "curl -sS -w '\\n%{http_code}' ", 1)
    proc = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TOKEN": server.keys()["inference"]})
    assert proc.returncode == 0, proc.stderr
    body, status = proc.stdout.rsplit("\n", 1)
    assert status == "200", body
    answer = json.loads(body)
    if isinstance(answer, dict) and "platform" in answer:  # OIP model metadata
        assert answer["name"] in command and answer["versions"] and answer["inputs"] and answer["outputs"]
        assert all({"name", "datatype", "shape"} <= set(t) for t in answer["inputs"] + answer["outputs"])
    elif isinstance(answer, dict) and "outputs" in answer:  # an Open Inference Protocol answer
        assert answer["model_name"] in command and answer["outputs"]
        assert all(len(o["data"]) == __import__("math").prod(o["shape"]) for o in answer["outputs"])
    elif isinstance(answer, list):  # an image model: top-k, best first
        assert answer and {"label", "index", "score"} <= set(answer[0])
        assert [p["score"] for p in answer] == sorted((p["score"] for p in answer), reverse=True)
    else:  # the text model: one embedding, or a list of them
        items = answer.get("embeddings", [answer])
        assert items and all(len(i["embedding"]) == 384 and i["tokens"] >= 3 for i in items)


def test_the_readme_shows_the_protocol_clients():
    assert any("oip_client.py" in c for c in CLIENTS) and any("loadtest.grpc_client" in c for c in CLIENTS)
    assert any("/v2/models/" in c for c in CURLS)


@pytest.mark.parametrize("command", CLIENTS, ids=[c.split()[1] for c in CLIENTS])
def test_each_python_client_line_of_the_readme_runs(server, command):
    """The README's Python client lines, pointed at the test server (its port, its run directory)."""
    extra = {"oip_client.py": f" --url 127.0.0.1:{server.ports.inference}",
             "loadtest.grpc_client": f" --port {server.ports.grpc_inference} --run-dir {server.run_dir}"}
    command += next(args for name, args in extra.items() if name in command)
    proc = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TOKEN": server.keys()["inference"]})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "digits" in proc.stdout or '"label"' in proc.stdout, proc.stdout
