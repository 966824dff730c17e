"""The fleet's HAProxy configuration, rendered and checked by HAProxy itself (no server started)."""

from __future__ import annotations

import subprocess

import pytest

from serve_config import fleet as fleets

PORTS = dict(inference=18080, management=18081, metrics=18082, grpc_inference=18070, grpc_management=18071)


@pytest.mark.parametrize("namespaces", [False, True], ids=["loopback", "netns"])
def test_the_rendered_config_is_valid_and_authenticates_with_the_token_file(tmp_path, namespaces):
    fleet = fleets.Fleet(str(tmp_path), ["digits"], str(tmp_path), 18090, 18091, str(tmp_path / "secret" / "token"))
    fleet.replicas = [fleets.Replica(f"replica-{i}", str(tmp_path / f"r{i}"), PORTS, f"ns-{i}" if namespaces else None)
                      for i in range(2)]
    config = tmp_path / "haproxy.cfg"
    config.write_text(fleets.render_haproxy(fleet))
    token = (tmp_path / "secret" / "token").read_text().strip()
    assert len(token) >= 32 and (tmp_path / "secret" / "token").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "bearers.lst").read_text() == f"Bearer {token}\n"
    text = config.read_text()
    assert text.count("    server replica-") == 2 and ("namespace ns-1" in text) == namespaces
    # the replicas' own keys: made once (mode 600), sent on to them and with every health check, which asks the
    # readiness route (serve_config/control/probe.py) on the port requests go to
    keys = fleets.replica_keys(fleet)
    assert (tmp_path / fleets.REPLICA_KEYS).stat().st_mode & 0o777 == 0o600 and len(set(keys.values())) == 3
    assert f'http-request set-header Authorization "Bearer {keys["inference"]}"' in text
    assert f'http-check send meth GET uri /v2/health/ready hdr Authorization "Bearer {keys["inference"]}"' in text
    assert keys["management"] not in text and token not in text and f"check port {PORTS['management']}" not in text
    for status in (502, 503, 504):
        page = (tmp_path / "errors" / f"{status}.http").read_text()
        assert page.startswith(f"HTTP/1.1 {status}") and "application/json" in page
    if not namespaces:  # HAProxy opens each server's namespace when it checks; the fleet tier runs that case
        checked = subprocess.run([fleets.haproxy_binary(), "-c", "-f", str(config)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_token_file_must_hold_one_long_word(tmp_path):
    (tmp_path / "token").write_text("short\n")
    with pytest.raises(fleets.ServerError, match="16 characters"):
        fleets.ensure_token(tmp_path / "token")
