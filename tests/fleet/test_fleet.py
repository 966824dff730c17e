"""The fleet tier: real TorchServe replicas behind a real HAProxy, driven by real (distributed) Locust.

Everything is started and stopped here, by PID; durations are shortened by parameter, nothing is skipped.
Failover and rolling-update figures are printed (pytest -s, or the captured output of a failure)."""

from __future__ import annotations

import csv
import os
import signal
import time
from pathlib import Path

import grpc
import pytest
import requests

from loadtest.grpc_client import Client
from loadtest.payloads import payloads
from loadtest.run import Run, by_name
from models.paths import model_config_values
from serve_config import fleet as fleets
from serve_config.rollout import Rollout, rolling_update
from tests.ops.servers import frontend_pid, store_with

pytestmark = [pytest.mark.fleet, pytest.mark.integration, pytest.mark.slow]
MODEL = "digits"
RESPONSE_TIMEOUT_S = model_config_values(MODEL)["responseTimeout"]
# Generous bounds on waits, not targets (the figures are printed): the balancer checks every second and acts on
# two results (serve_config/fleet/haproxy.cfg), so a change of state shows in about 2 s; a loaded host is allowed
# many times that. A restarted replica is UP two passed checks after READY, and leastconn sends to it at once.
DOWN_WITHIN, UP_WITHIN, SERVES_WITHIN = 30, 60, 60


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Two replicas of digits behind HAProxy, from a model store of this module's own."""
    root = tmp_path_factory.mktemp("fleet")
    store = store_with(root, MODEL)
    started = fleets.launch(root / "fleet", 2, [MODEL], model_store=store)
    try:
        yield started
    finally:
        fleets.shutdown(root / "fleet")
    for replica in started.replicas:
        assert replica.server.pid() is None, f"{replica.name} was not stopped"


def sample():
    p = payloads(MODEL, 1)[0]
    return p.body, {"Content-Type": p.content_type}


def test_the_balancer_authenticates_and_its_errors_are_json(fleet):
    body, headers = sample()
    url = f"{fleet.url}/predictions/{MODEL}"
    for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {fleet.token()}x"}):
        answer = requests.post(url, data=body, headers={**headers, **auth}, timeout=30)
        assert answer.status_code == 401 and answer.json()["code"] == 401, answer.text
        assert answer.headers["WWW-Authenticate"] == "Bearer"
    too_big = requests.post(url, data=b"\0" * (8 * 1024 * 1024 + 1), timeout=30,
                            headers={**headers, **fleet.headers()})
    assert too_big.status_code == 413 and too_big.json()["type"] == "PayloadTooLarge"
    answer = requests.post(url, data=body, headers={**headers, **fleet.headers()}, timeout=30)
    assert answer.status_code == 200 and answer.json()[0]["label"], answer.text
    assert answer.headers["X-Model-Version"] == "1.0"
    # Behind the balancer TorchServe still checks its keys: the fleet's replica keys, which the balancer sends on.
    assert all(r.server.token_auth() for r in fleet.replicas)


def test_request_ids_cross_the_balancer_both_ways_and_its_own_answers_carry_them(fleet):
    """A valid client X-Request-ID goes through to the replica and back; without one (or with an invalid one) the
    balancer makes one, which the replica keeps, logs and answers with; the balancer's refusals carry the ID too."""
    body, headers = sample()
    url = f"{fleet.url}/predictions/{MODEL}"
    mine = requests.post(url, data=body, headers={**headers, **fleet.headers(), "X-Request-ID": "through-1"},
                         timeout=30)
    assert mine.status_code == 200 and mine.headers["X-Request-ID"] == "through-1"
    made = [requests.post(url, data=body, headers={**headers, **fleet.headers(), **extra}, timeout=30)
            for extra in ({}, {}, {"X-Request-ID": "x" * 200})]
    ids = [a.headers["X-Request-ID"] for a in made]
    assert all(a.status_code == 200 for a in made) and len(set(ids)) == 3 and "x" * 200 not in ids, ids
    logs = [(r.server.run_dir / "logs" / "access_log.log") for r in fleet.replicas]
    for _ in range(50):  # the replica's access log names the balancer's ID: it kept it
        if all(any(f"id={i}" in log.read_text(errors="replace") for log in logs if log.exists()) for i in ids):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the replicas' access logs do not name {ids}")
    refused = requests.post(url, data=body, headers={**headers, "X-Request-ID": "refused-1"}, timeout=30)
    assert refused.status_code == 401 and refused.headers["X-Request-ID"] == "refused-1"


def test_the_open_inference_protocol_metadata_and_readiness_answer_through_the_balancer(fleet):
    """Every replica runs the frontend plugin: through HAProxy, with the fleet's token, a real client gets the
    model's metadata and readiness as from one server."""
    from tests.conftest import assert_oip_metadata

    assert_oip_metadata(fleet.url, {"Authorization": f"Bearer {fleet.token()}"}, [MODEL])


def test_a_rotated_token_file_is_taken_in_without_restarting_the_balancer(fleet):
    body, headers = sample()
    url = f"{fleet.url}/predictions/{MODEL}"
    old, pid = fleet.token(), (Path(fleet.root) / fleets.BALANCER_PID).read_text()
    new = old[::-1] + "-rotated"
    Path(fleet.token_file).write_text(new + "\n")  # as the kubelet updates a mounted Secret
    assert fleets.reload_token(fleet) and not fleets.reload_token(fleet)
    status = lambda token: requests.post(url, data=body, timeout=30,  # noqa: E731
                                         headers={**headers, "Authorization": f"Bearer {token}"}).status_code
    assert (status(old), status(new)) == (401, 200)
    assert (Path(fleet.root) / fleets.BALANCER_PID).read_text() == pid


def test_replicas_are_reachable_only_through_the_balancer(fleet):
    """Each replica is a host of its own (a network namespace; this tier runs as root, as CI does): from this
    host its port refuses the connection, inside its namespace TorchServe answers."""
    import socket

    for replica in fleet.replicas:
        assert replica.netns, "the fleet tier runs as root: replicas get namespaces of their own"
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex(("127.0.0.1", replica.ports["inference"])) != 0, f"{replica.name} reachable from the host"
        with replica.server.network():
            assert requests.get(f"{replica.server.inference_url}/ping", timeout=10,
                                headers=replica.server.headers()).json()["status"] == "Healthy"


@pytest.mark.proof
def test_a_loopback_fleets_replicas_refuse_anyone_without_their_key(tmp_path):
    """Without network namespaces (a user who is not root) a replica listens on host loopback ports any local
    user can reach. Its token authorization stays on with the fleet's replica keys: HTTP and gRPC refuse a
    caller without them, while the balancer, which sends them on, serves; a replica's JVM killed and restarted by
    its supervisor keeps the keys, so the balancer serves on."""
    store = store_with(tmp_path, MODEL)
    fleet = fleets.launch(tmp_path / "fleet", 1, [MODEL], model_store=store, isolation="loopback")
    try:
        replica = fleet.replicas[0]
        assert replica.netns is None
        body, headers = sample()
        direct = f"http://127.0.0.1:{replica.ports['inference']}/predictions/{MODEL}"
        for sent in ({}, {"Authorization": f"Bearer {fleet.token()}"}):
            answer = requests.post(direct, data=body, headers={**headers, **sent}, timeout=30)
            assert answer.status_code == 401 and "Token Authorization failed" in answer.text, answer.text
        management = f"http://127.0.0.1:{replica.ports['management']}/models"
        assert requests.get(management, timeout=10).status_code == 401
        client = Client("127.0.0.1", replica.ports["grpc_inference"], None)
        try:
            with pytest.raises(grpc.RpcError):
                client.ping()
        finally:
            client.close()
        through = requests.post(f"{fleet.url}/predictions/{MODEL}", data=body, timeout=30,
                                headers={**headers, **fleet.headers()})
        assert through.status_code == 200, through.text
        os.kill(frontend_pid(replica.server), signal.SIGKILL)
        fleets.wait_status(fleet, {replica.name: "DOWN"}, timeout=DOWN_WITHIN)
        fleets.wait_status(fleet, {replica.name: "UP"}, timeout=UP_WITHIN)
        again = requests.post(f"{fleet.url}/predictions/{MODEL}", data=body, timeout=30,
                              headers={**headers, **fleet.headers()})
        assert again.status_code == 200, again.text
    finally:
        fleets.shutdown(tmp_path / "fleet")


def test_no_ready_replica_is_a_json_503_and_a_replica_back_in_rotation_serves(fleet):
    body, headers = sample()
    url = f"{fleet.url}/predictions/{MODEL}"
    try:
        for replica in fleet.replicas:
            fleets.set_state(fleet, replica.name, "maint")
        answer = requests.post(url, data=body, headers={**headers, **fleet.headers()}, timeout=30)
        assert answer.status_code == 503 and answer.json()["type"] == "NoReadyReplica", answer.text
    finally:
        for replica in fleet.replicas:
            fleets.set_state(fleet, replica.name, "ready")
    fleets.wait_status(fleet, {r.name: "UP" for r in fleet.replicas}, timeout=UP_WITHIN)
    assert requests.post(url, data=body, headers={**headers, **fleet.headers()}, timeout=30).status_code == 200


def test_a_replica_whose_model_has_no_worker_leaves_the_rotation_and_comes_back(fleet):
    replica = fleet.replicas[1]
    scale = f"{replica.server.management_url}/models/{MODEL}"
    with replica.server.network():
        assert requests.put(scale, params={"min_worker": 0, "max_worker": 0, "synchronous": "true"}, timeout=60,
                            headers=replica.server.headers("management")).ok
    try:
        out = fleets.wait_status(fleet, {replica.name: "DOWN"}, timeout=DOWN_WITHIN)
        body, headers = sample()
        answers = [requests.post(f"{fleet.url}/predictions/{MODEL}", data=body, headers={**headers, **fleet.headers()},
                                 timeout=30).status_code for _ in range(10)]
        assert answers == [200] * 10
    finally:
        with replica.server.network():
            assert requests.put(scale, params={"min_worker": 1, "max_worker": 1, "synchronous": "true"}, timeout=120,
                                headers=replica.server.headers("management")).ok
    back = fleets.wait_status(fleet, {replica.name: "UP"}, timeout=UP_WITHIN)
    print(f"\nno worker: out of rotation in {out:.2f} s; back {back:.2f} s after its worker was READY")


def test_per_replica_stats_show_both_replicas_serving(fleet):
    body, headers = sample()
    before = {name: int(row["stot"]) for name, row in fleets.stats(fleet).items()}
    for _ in range(20):
        requests.post(f"{fleet.url}/predictions/{MODEL}", data=body, headers={**headers, **fleet.headers()}, timeout=30)
    after = {name: int(row["stot"]) for name, row in fleets.stats(fleet).items()}
    assert set(after) == {r.name for r in fleet.replicas}
    assert all(after[name] > before[name] for name in after), (before, after)
    page = requests.get(f"http://{fleet.bind}:{fleet.stats_port}/stats;csv", timeout=10)
    assert page.ok and all(r.name in page.text for r in fleet.replicas)


def test_failover_when_a_replica_is_killed_under_distributed_load(fleet, tmp_path):
    """SIGKILL one replica's whole TorchServe under Locust load (one master, two workers) through the
    balancer: no request hangs, only requests in flight there may fail, the balancer takes it out of the
    rotation, and after a restart it serves again. The load lasts as long as all that takes (it is stopped
    afterwards, not timed beforehand); the durations are printed, and bounded only generously."""
    users, victim = 8, fleet.replicas[0]
    locust = Run(MODEL, fleet.url, fleet.token(), users=users, duration=None, out=tmp_path, workers=2)
    try:
        before_kill = locust.wait_flowing(100)
        killed_at = time.monotonic()
        fleets.kill_replica(fleet, victim.name)
        fleets.wait_status(fleet, {victim.name: "DOWN"}, timeout=DOWN_WITHIN)
        marked_down = time.monotonic() - killed_at
        t_restart = time.monotonic()
        fleets.start_replica(fleet, victim)
        ready = time.monotonic() - t_restart
        back_up = fleets.wait_status(fleet, {victim.name: "UP"}, timeout=UP_WITHIN)
        served0 = int(fleets.stats(fleet)[victim.name]["stot"])
        t_up = time.monotonic()
        while int(fleets.stats(fleet)[victim.name]["stot"]) <= served0 + 20:
            assert locust.process.poll() is None, f"the load ended by itself:\n{locust.tail()}"
            assert time.monotonic() - t_up < SERVES_WITHIN, (
                f"the restarted replica, UP at the balancer, took no 20 requests in {SERVES_WITHIN} s of load "
                f"(leastconn sends to an UP replica at once)")
            time.sleep(0.1)
        serving_again = back_up + (time.monotonic() - t_up)
        after_recovery = locust.wait_flowing(20)
    finally:
        summary = locust.stop()
    with locust.stats_csv.open() as handle:
        worst_ms = max(float(r["Max Response Time"]) for r in csv.DictReader(handle) if r["Name"] == "Aggregated")
    print(f"\nfailover: {summary.line()}; marked DOWN {marked_down:.2f} s after the kill; restart to READY "
          f"{ready:.1f} s; READY to UP {back_up:.2f} s; READY to serving {serving_again:.2f} s; slowest answer "
          f"{worst_ms:.0f} ms; since the kill {time.monotonic() - killed_at:.0f} s")
    assert summary.requests >= after_recovery > before_kill
    assert summary.failures <= users, f"more failures than requests in flight: {summary.line()}"
    # A request that hung would have waited for a timeout: the model's own, or the balancer's on a dead server.
    assert worst_ms < RESPONSE_TIMEOUT_S * 1000, f"a request hung for {worst_ms:.0f} ms"


def test_rolling_update_under_load_fails_no_request_and_each_answer_names_one_version(fleet, tmp_path):
    """The load runs from before the update until after it (stopped then, not timed beforehand): no request
    fails, both versions answered, and every replica serves only the new version at the end."""
    locust = Run(MODEL, fleet.url, fleet.token(), users=6, duration=None, out=tmp_path, by_version=True)
    try:
        locust.wait_flowing(50)
        results = rolling_update(fleet, MODEL)
        locust.wait_flowing(50)  # answers from the new version on every replica
    finally:
        summary = locust.stop()
    names = by_name(locust.stats_csv)
    print(f"\nrolling update: {summary.line()}; per version: {names}; steps: {results}")
    new = results[0]["version"]
    assert all(r["changed"] and r["version"] == new for r in results)
    assert summary.failures == 0, summary.line()
    versions = {name.rsplit("version=", 1)[1] for name in names}
    assert versions == {"1.0", new}, names
    for replica in fleet.replicas:
        assert Rollout(replica.server, MODEL, Path(fleet.model_store)).default_version() == new
        assert [str(v["modelVersion"]) for v in Rollout(replica.server, MODEL, Path(fleet.model_store)).versions()] == [new]
