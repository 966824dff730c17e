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


def readme_commands() -> list[str]:
    """Every command of the README's bash blocks that starts with curl (continuation lines joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line.startswith("curl ")]


CURLS = readme_commands()


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
    if isinstance(answer, list):  # an image model: top-k, best first
        assert answer and {"label", "index", "score"} <= set(answer[0])
        assert [p["score"] for p in answer] == sorted((p["score"] for p in answer), reverse=True)
    else:  # the text model: one embedding, or a list of them
        items = answer.get("embeddings", [answer])
        assert items and all(len(i["embedding"]) == 384 and i["tokens"] >= 3 for i in items)
