"""Process hygiene on a real TorchServe: a taken port is reported before anything starts, the caller's TS_*
variables cannot change what runs, and the logs roll over by size into a capped set of files."""

from __future__ import annotations

import gzip
import os
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import requests

from loadtest.payloads import payloads
from serve_config import control as ts
from tests.conftest import ROOT
from tests.ops.servers import store_with, template_with

pytestmark = [pytest.mark.ops, pytest.mark.integration]


def test_a_taken_port_is_reported_before_anything_starts(tmp_path):
    """Named with its role, its holder and the make variable that moves it; no TorchServe is started."""
    ports = ts.Ports.free()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports.management))
        holder.listen()
        with pytest.raises(ts.PortInUse) as info:
            ts.start(tmp_path / "run", ["digits"], ports=ports, model_store=tmp_path)
        (port, who), = info.value.taken.values()
        assert list(info.value.taken) == ["management"] and port == ports.management, info.value.taken
        assert who is not None and who.startswith(f"PID {os.getpid()} ("), who
        cli = subprocess.run([sys.executable, "-m", "serve_config.control", "start", "--run-dir", str(tmp_path / "cli"),
                              "--models", "digits", "--model-store", str(tmp_path),
                              "--inference-port", str(ports.inference), "--management-port", str(ports.management),
                              "--metrics-port", str(ports.metrics), "--grpc-ports", str(ports.grpc_inference),
                              str(ports.grpc_management)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert f"port {ports.management} (management) is taken by PID {os.getpid()}" in cli.stderr, cli.stderr
    assert "MANAGEMENT_PORT=" in cli.stderr and "INFERENCE_PORT" not in cli.stderr
    assert not (tmp_path / "run" / ts.PID_FILE).exists() and not (tmp_path / "cli" / ts.PID_FILE).exists()



def test_a_fleet_whose_balancer_port_is_taken_starts_nothing(tmp_path):
    from serve_config import fleet as fleets

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ts.ServerError, match=rf"port {port} \(FLEET_PORT\) is taken by PID {os.getpid()} "):
            fleets.launch(tmp_path / "fleet", 1, ["digits"], model_store=tmp_path, port=port, isolation="loopback")
    assert not list((tmp_path / "fleet").glob("replica-*"))


# What TorchServe's frontend logs for every request or batch, at its default levels.
PER_REQUEST = ("Flushing req.cmd PREDICT", "Looping backend response", "Backend response time", "Sending response for jobId",
               "Waiting time ns", "result=[METRICS]")


def small_logs(tmp_path: Path, size: str = "4 KB", keep: int = 2) -> Path:
    """The host log configuration with a tiny size limit, so a test sees it roll over."""
    tree = ET.parse(ts.LOG_CONFIG)
    for appender in tree.getroot().find("Appenders"):
        appender.find("SizeBasedTriggeringPolicy").set("size", size)
        appender.find("DefaultRolloverStrategy").set("max", str(keep))
    path = tmp_path / "log4j2.xml"
    tree.write(path)
    return path


def test_the_callers_ts_variables_change_nothing_and_logs_stay_bounded(private_server, tmp_path, monkeypatch):
    """A TS_CONFIG_FILE in the caller's environment (TorchServe prefers it to --ts-config) naming a config with
    token authorization off and other ports, and TS_* overrides, change nothing: the server runs our config.
    Its logs roll over by size: no log file grows past its limit, and the rolled ones are capped in number."""
    hostile = _hostile_config(tmp_path)
    monkeypatch.setenv("TS_CONFIG_FILE", str(hostile))
    monkeypatch.setenv("TS_DISABLE_TOKEN_AUTHORIZATION", "true")
    monkeypatch.setenv("TS_ENABLE_ENVVARS_CONFIG", "true")
    server = private_server(["digits"], model_store=store_with(tmp_path, "digits"), log_config=small_logs(tmp_path))
    assert server.token_auth()
    sample = payloads("digits", 1)[0]
    url = f"{server.inference_url}/predictions/digits"
    refused = requests.post(url, data=sample.body, headers={"Content-Type": sample.content_type}, timeout=30)
    assert refused.status_code == 401 and "Token Authorization failed" in refused.text, refused.text
    for _ in range(150):  # about 150 access-log lines and more in the others: several times the 4 KB limit
        answer = requests.post(url, data=sample.body, timeout=30,
                               headers={**server.headers(), "Content-Type": sample.content_type})
        assert answer.status_code == 200
    logs = server.run_dir / "logs"
    rolled = sorted(p.name for p in logs.glob("access_log.*.log.gz"))
    assert rolled and len(rolled) <= 2, sorted(p.name for p in logs.iterdir())
    assert all(p.stat().st_size <= 16 * 1024 for p in logs.glob("*.log")), {
        p.name: p.stat().st_size for p in logs.glob("*.log")}
    assert "org.pytorch.serve" not in (server.run_dir / ts.OUT_FILE).read_text(errors="replace")
    # No key reaches a log, current or rolled (the access log records requests, never their headers); the
    # frontend's log has no line per request or batch (serve_config/log4j2.xml drops them).
    keys = set(server.keys().values())
    for log in [*logs.iterdir(), server.run_dir / ts.OUT_FILE]:
        text = (gzip.decompress(log.read_bytes()) if log.suffix == ".gz" else log.read_bytes()).decode(errors="replace")
        assert not [key for key in keys if key in text], f"a key is written in {log.name}"
        if log.name.startswith("ts_log"):
            assert not [p for p in PER_REQUEST if p in text], (log.name, [p for p in PER_REQUEST if p in text])


def _hostile_config(tmp_path: Path) -> Path:
    """A config.properties as someone else would set TS_CONFIG_FILE to: no token, all interfaces, envvars on."""
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    path = template_with(hostile, disable_token_authorization="true", inference_address="http://0.0.0.0:18080")
    path.write_text(path.read_text() + "enable_envvars_config=true\n")
    return path
