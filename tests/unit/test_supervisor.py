"""The supervisor's liveness check (serve_config/control/supervisor.py) against real sockets: a frontend that takes
the connection and says nothing is hung from its first second on; one that refuses it is not listening (still
starting, or gone). No TorchServe is started here: the ops tier's proofs stop a real JVM."""

from __future__ import annotations

import http.server
import json
import socket
import threading

from serve_config.control import supervisor
from serve_config.control.instance import CONFIG_FILE, KEY_FILE


def run_dir_for(tmp_path, port: int):
    (tmp_path / CONFIG_FILE).write_text(
        f"inference_address=http://127.0.0.1:{port}\nmanagement_address=http://127.0.0.1:1\n"
        "metrics_address=http://127.0.0.1:2\ngrpc_inference_port=3\ngrpc_management_port=4\n")
    (tmp_path / KEY_FILE).write_text(json.dumps({name: {"key": "k"} for name in ("inference", "management", "API")}))
    return tmp_path


def test_a_listener_that_never_answers_is_silent(tmp_path, monkeypatch):
    monkeypatch.setattr(supervisor, "LIVENESS_TIMEOUT_S", 0.5)
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)  # the kernel takes connections for a stopped process too
        assert supervisor.liveness(run_dir_for(tmp_path, hung.getsockname()[1])) == supervisor.SILENT


def test_a_port_nobody_listens_on_is_absent(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert supervisor.liveness(run_dir_for(tmp_path, port)) == supervisor.ABSENT


def test_any_http_answer_is_alive_and_carries_the_key(tmp_path):
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(self.headers.get("Authorization"))
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert supervisor.liveness(run_dir_for(tmp_path, server.server_address[1])) == supervisor.ANSWERED
    finally:
        server.shutdown()
    assert seen == ["Bearer k"]
