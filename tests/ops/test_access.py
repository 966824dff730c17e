"""Access control and supply chain on a real TorchServe: tokens everywhere they apply, a readiness probe
that works with them, key rotation, and no archive from a URL or from outside the model store."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading

import pytest
import requests

from serve_config import control as ts
from tests.conftest import ROOT, SERVED
from tests.ops.servers import store_with, template_with

pytestmark = [pytest.mark.ops, pytest.mark.integration]


def test_every_api_refuses_a_missing_or_wrong_token(server):
    model = SERVED[0].name
    calls = {
        "inference": ("POST", f"{server.inference_url}/predictions/{model}"),
        "ping": ("GET", f"{server.inference_url}/ping"),
        "management list": ("GET", f"{server.management_url}/models"),
        "management describe": ("GET", f"{server.management_url}/models/{model}"),
        "management scale": ("PUT", f"{server.management_url}/models/{model}?min_worker=1"),
    }
    for name, (method, url) in calls.items():
        for headers in ({}, {"Authorization": "Bearer wrong-key"}):
            answer = requests.request(method, url, headers=headers, data=b"x", timeout=10)
            assert answer.status_code == 400 and "Token Authorization failed" in answer.text, (name, headers, answer.text)
    # each key opens only its own API
    assert requests.get(f"{server.management_url}/models", headers=server.headers("inference"), timeout=10).status_code == 400
    assert requests.get(f"{server.inference_url}/ping", headers=server.headers("management"), timeout=10).status_code == 400


def test_metrics_endpoint_is_loopback_only_as_configured(server):
    """TorchServe 0.12 does not put the metrics API behind a token; this config binds it to loopback instead
    (a Prometheus scraper on the host reads it), like the management API."""
    assert server.metrics_url.startswith("http://127.0.0.1:")
    answer = requests.get(f"{server.metrics_url}/metrics", timeout=10)
    assert answer.status_code == 200 and "ts_inference_requests_total" in answer.text


def test_readiness_probe_works_with_token_auth(server):
    ok, why = ts.ready(server)
    assert ok and all(s.name in why for s in SERVED), why
    probe = subprocess.run([sys.executable, "-m", "serve_config.control", "ready", "--run-dir", str(server.run_dir)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0 and probe.stdout.startswith("ready:"), probe.stdout + probe.stderr
    missing = subprocess.run([sys.executable, "-m", "serve_config.control", "ready", "--run-dir", str(server.run_dir),
                              "--models", "no-such-model"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no-such-model" in missing.stdout


def test_keys_do_not_expire_under_a_running_service(server):
    import datetime as dt
    import json

    keys = json.loads((server.run_dir / ts.KEY_FILE).read_text())
    for kind in ("inference", "management"):
        expires = dt.datetime.fromisoformat(keys[kind]["expiration time"].replace("Z", "+00:00"))
        assert expires - dt.datetime.now(dt.timezone.utc) > dt.timedelta(days=365), (kind, expires)


def test_rotate_token_replaces_the_key_and_the_old_one_stops_working(private_server, tmp_path):
    server = private_server(["digits"], model_store=store_with(tmp_path, "digits"))
    old = server.keys()["inference"]
    proc = subprocess.run([sys.executable, "-m", "serve_config.control", "rotate-token", "--run-dir", str(server.run_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    new = server.keys()["inference"]
    assert new != old
    ping = lambda key: requests.get(f"{server.inference_url}/ping", headers={"Authorization": f"Bearer {key}"}, timeout=10)  # noqa: E731
    assert ping(old).status_code == 400 and ping(new).status_code == 200
    management = server.keys()["management"]
    ts.rotate_token(server, "management")
    assert requests.get(f"{server.management_url}/models", timeout=10,
                        headers={"Authorization": f"Bearer {management}"}).status_code == 400
    assert requests.get(f"{server.management_url}/models", headers=server.headers("management"), timeout=10).ok


def test_no_archive_is_fetched_from_a_url_even_with_registration_on(private_server, tmp_path):
    """Registration is on (make deploy); a server still refuses an archive from a URL or from a folder beside
    the store, because allowed_urls names only the local store, and never fetches it."""
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        server = private_server(["digits"], model_store=store_with(tmp_path, "digits"),
                                template=template_with(tmp_path, enable_model_api="true"))
        for url in (f"http://127.0.0.1:{httpd.server_port}/evil.mar", "file:///etc/passwd",
                    f"file://{tmp_path}/elsewhere/evil.mar"):
            answer = requests.post(f"{server.management_url}/models", params={"url": url}, timeout=30,
                                   headers=server.headers("management"))
            assert 400 <= answer.status_code < 500, (url, answer.status_code, answer.text)
            assert "allowed" in answer.text.lower() or "not found" in answer.text.lower(), answer.text
        assert hits == [], "TorchServe fetched from the URL"
        listed = requests.get(f"{server.management_url}/models", headers=server.headers("management"), timeout=10)
        assert [m["modelName"] for m in listed.json()["models"]] == ["digits"]
    finally:
        httpd.shutdown()
