"""A replica whose frontend hangs without dying (its JVM stopped with SIGSTOP: a deadlock or a GC spiral looks the
same from outside) is treated like a dead one: the balancer's health checks take it out of the rotation while the
other replica answers every request, and its supervisor kills the hung JVM and starts a new one, which the
balancer takes back. A slow proof: `make proofs`."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import requests

from loadtest.payloads import payloads
from serve_config import fleet as fleets
from serve_config.control import supervisor
from tests.ops.servers import frontend_pid, store_with

pytestmark = [pytest.mark.fleet, pytest.mark.integration, pytest.mark.slow, pytest.mark.proof]
MODEL = "digits"


def test_a_hung_replica_leaves_the_rotation_and_comes_back_replaced(tmp_path):
    store = store_with(tmp_path, MODEL)
    fleet = fleets.launch(tmp_path / "fleet", 2, [MODEL], model_store=store)
    victim = fleet.replicas[0]
    sample = payloads(MODEL, 1)[0]
    headers = {"Authorization": f"Bearer {fleet.token()}", "Content-Type": sample.content_type}
    hung = frontend_pid(victim.server)
    try:
        os.kill(hung, signal.SIGSTOP)
        stopped_at = time.monotonic()
        fleets.wait_status(fleet, {victim.name: "DOWN"}, timeout=30)
        marked_down = time.monotonic() - stopped_at
        for _ in range(20):  # the other replica answers everything meanwhile
            answer = requests.post(f"{fleet.url}/predictions/{MODEL}", data=sample.body, headers=headers, timeout=30)
            assert answer.status_code == 200, answer.text
        fleets.wait_status(fleet, {victim.name: "UP"}, timeout=120)
        back_up = time.monotonic() - stopped_at
        replaced = frontend_pid(victim.server)
    finally:
        if psutil.pid_exists(hung):
            os.kill(hung, signal.SIGCONT)
        fleets.shutdown(tmp_path / "fleet")
    assert replaced != hung
    out = (victim.server.run_dir / "torchserve.out").read_text()
    assert supervisor.HUNG in out, out[-2000:]
    print(f"\nhung replica: DOWN at the balancer {marked_down:.1f} s after SIGSTOP, replaced and UP again "
          f"{back_up:.1f} s after it")
