"""Access control and supply chain on a real TorchServe: tokens everywhere they apply, a readiness probe
that works with them, key rotation, and no archive from a URL or from outside the model store."""

from __future__ import annotations

import http.server
import ipaddress
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
import requests

from loadtest.grpc_client import stubs
from serve_config import control as ts
from tests.conftest import ROOT, SERVED
from tests.ops.servers import store_with, template_with

pytestmark = [pytest.mark.ops, pytest.mark.integration]


def test_every_api_refuses_a_missing_or_wrong_token(server):
    """Every route of the inference and management ports, the API description and OPTIONS included (TorchServe
    answers those before its own key check), is refused with 401 when its headers arrive, with the other port's
    key too (the frontend agent's BodyAdmission)."""
    model = SERVED[0].name
    calls = {
        "inference": ("POST", f"{server.inference_url}/predictions/{model}"),
        "ping": ("GET", f"{server.inference_url}/ping"),
        "api description": ("OPTIONS", f"{server.inference_url}/"),
        "api description (GET)": ("GET", f"{server.inference_url}/api-description"),
        "oip infer": ("POST", f"{server.inference_url}/v2/models/{model}/infer"),
        "management list": ("GET", f"{server.management_url}/models"),
        "management describe": ("GET", f"{server.management_url}/models/{model}"),
        "management scale": ("PUT", f"{server.management_url}/models/{model}?min_worker=1"),
        "management api description": ("OPTIONS", f"{server.management_url}/"),
    }
    for name, (method, url) in calls.items():
        other = server.headers("management" if url.startswith(server.inference_url) else "inference")
        for headers in ({}, {"Authorization": "Bearer wrong-key"}, other):
            answer = requests.request(method, url, headers=headers, data=b"x", timeout=10)
            assert answer.status_code == 401 and "Token Authorization failed" in answer.text, (name, headers, answer.text)
            assert answer.headers.get("WWW-Authenticate") == "Bearer" and answer.json()["type"] == "Unauthorized"
    described = requests.options(f"{server.inference_url}/", headers=server.headers(), timeout=10)
    assert described.status_code == 200 and "openapi" in described.text


def test_metrics_endpoint_is_loopback_only_as_configured(server):
    """TorchServe 0.12 does not put the metrics API behind a token; this config binds it to loopback instead
    (a Prometheus scraper on the host reads it), like the management API."""
    assert server.metrics_url.startswith("http://127.0.0.1:")
    answer = requests.get(f"{server.metrics_url}/metrics", timeout=10)
    assert answer.status_code == 200 and "ts_inference_requests_total" in answer.text


def listening_addresses(port: int) -> set[str]:
    """The local addresses a TCP socket listens on at `port`, from the kernel's tables (IPv4 and IPv6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                words = [raw[i:i + 4][::-1] for i in range(0, len(raw), 4)]  # each 32-bit word is host-endian
                ip = ipaddress.ip_address(b"".join(words))
                found.add(str(getattr(ip, "ipv4_mapped", None) or ip))  # Java listens on ::ffff:127.0.0.1
    return found


def test_every_port_of_the_server_listens_on_loopback_only(server):
    """CVE-2024-35199: TorchServe before 0.11 bound its gRPC ports to every interface. Here all five ports,
    gRPC included, listen on 127.0.0.1 alone (the container and the fleet put their own fence in front)."""
    ports = server.ports
    for name, port in (("inference", ports.inference), ("management", ports.management), ("metrics", ports.metrics),
                       ("grpc inference", ports.grpc_inference), ("grpc management", ports.grpc_management)):
        assert listening_addresses(port) == {"127.0.0.1"}, (name, port, listening_addresses(port))


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
    assert ping(old).status_code == 401 and ping(new).status_code == 200
    management = server.keys()["management"]
    ts.rotate_token(server, "management")
    assert requests.get(f"{server.management_url}/models", timeout=10,
                        headers={"Authorization": f"Bearer {management}"}).status_code == 401
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
        store = tmp_path / "store"
        (tmp_path / "elsewhere").mkdir()
        shutil.copy2(store / "digits.mar", tmp_path / "elsewhere" / "evil.mar")
        # the last: an allowed prefix climbing out of the store (CVE-2024-35198: copied into the store before 0.11)
        for url in (f"http://127.0.0.1:{httpd.server_port}/evil.mar", "file:///etc/passwd",
                    f"file://{tmp_path}/elsewhere/evil.mar", f"file://{store}/../elsewhere/evil.mar"):
            answer = requests.post(f"{server.management_url}/models", params={"url": url}, timeout=30,
                                   headers=server.headers("management"))
            assert 400 <= answer.status_code < 500, (url, answer.status_code, answer.text)
            assert "allowed" in answer.text.lower() or "not found" in answer.text.lower(), answer.text
        assert hits == [], "TorchServe fetched from the URL"
        assert not (store / "evil.mar").exists(), "an archive from outside landed in the store"
        listed = requests.get(f"{server.management_url}/models", headers=server.headers("management"), timeout=10)
        assert [m["modelName"] for m in listed.json()["models"]] == ["digits"]
    finally:
        httpd.shutdown()


def planted_model(folder: Path, marker: Path) -> Path:
    """An unpacked model folder outside the store whose handler, when imported, writes `marker`."""
    (folder / "MAR-INF").mkdir(parents=True)
    (folder / "MAR-INF" / "MANIFEST.json").write_text(json.dumps({
        "runtime": "python", "archiverVersion": "0.12.0",
        "model": {"modelName": "planted", "handler": "planted.py", "modelVersion": "1.0"}}))
    (folder / "planted.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n\n"
                                       "def handle(data, context):\n    return ['ran'] * len(data or [])\n")
    return folder


def test_no_management_call_loads_a_model_from_outside_the_store(private_server, tmp_path):
    """TorchServe 0.12 applies allowed_urls to URLs only: a management caller (the key holder, over REST or
    gRPC) could register any directory of the host as a model and run its handler. The frontend agent's
    ArchiveUtils admits a plain name of the store's entries only; the planted handler must never run."""
    marker = tmp_path / "planted-ran"
    planted = planted_model(tmp_path / "elsewhere" / "planted", marker)
    server = private_server(["digits"], model_store=store_with(tmp_path, "digits"))
    # the same folder in the server's working directory, named as if it were in the store
    shutil.copytree(planted, server.run_dir / "planted")
    management = server.headers("management")
    for url in (str(planted), str(planted.parent), f"{planted}/", "planted", "./planted", str(tmp_path / "store"),
                str(server.run_dir / "planted")):
        answer = requests.post(f"{server.management_url}/models", timeout=60, headers=management,
                               params={"url": url, "model_name": "planted", "initial_workers": 1, "synchronous": "true"})
        assert 400 <= answer.status_code < 500, (url, answer.status_code, answer.text)
        assert answer.json()["message"], answer.text

    pb2, pb2_grpc = stubs(proto="management")
    with grpc.insecure_channel(f"127.0.0.1:{server.ports.grpc_management}") as channel:
        stub = pb2_grpc.ManagementAPIsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.RegisterModel(pb2.RegisterModelRequest(url=str(planted), model_name="planted", initial_workers=1,
                                                        synchronous=True),
                               metadata=[("authorization", f"Bearer {server.keys()['management']}")], timeout=60)
        assert refused.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), refused.value

    assert not marker.exists(), "a handler from outside the model store ran"
    listed = requests.get(f"{server.management_url}/models", headers=management, timeout=10).json()["models"]
    assert [m["modelName"] for m in listed] == ["digits"]
    # what the store holds still registers by its name (make deploy's path), beside the running version
    copy = tmp_path / "store" / "digits-copy.mar"
    shutil.copy2(tmp_path / "store" / "digits.mar", copy)
    answer = requests.post(f"{server.management_url}/models", timeout=120, headers=management,
                           params={"url": copy.name, "model_name": "digits2", "initial_workers": 1,
                                   "synchronous": "true"})
    assert answer.status_code == 200, answer.text


def test_workflow_registration_obeys_enable_model_api(private_server, tmp_path):
    """TorchServe 0.12's workflow API registers and unregisters whatever enable_model_api says; with the model
    API off, workflows are refused as models are (405)."""
    server = private_server(["digits"], model_store=store_with(tmp_path, "digits"),
                            template=template_with(tmp_path, enable_model_api="false"))
    management = server.headers("management")
    for method, path, params in (("POST", "/models", {"url": "digits.mar", "model_name": "again"}),
                                 ("POST", "/workflows", {"url": "any.war"}),
                                 ("DELETE", "/workflows/any", {})):
        answer = requests.request(method, f"{server.management_url}{path}", params=params, headers=management,
                                  timeout=30)
        assert answer.status_code == 405, (method, path, answer.status_code, answer.text)
    assert requests.get(f"{server.management_url}/workflows", headers=management, timeout=10).status_code == 200
