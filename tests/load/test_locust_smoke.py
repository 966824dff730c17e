"""A short real Locust run against the real server: requests flow for the whole run and none fails."""

from __future__ import annotations

import pytest

from loadtest.run import run
from tests.conftest import SERVED

pytestmark = [pytest.mark.load, pytest.mark.integration]


@pytest.mark.parametrize("spec", SERVED, ids=lambda s: s.name)
def test_locust_smoke_has_no_failures(server, spec, tmp_path):
    summary, report_dir = run(spec.name, server.inference_url, server.keys()["inference"], users=4, duration="8s",
                              out=tmp_path)
    assert summary.requests > 20 and summary.failures == 0, summary.line()
    assert (report_dir / "report.html").exists() and summary.p99_ms > 0
    # The run lasts its 8 s: building the payloads at Locust's start must not eat into it (loadtest/locustfile.py).
    assert summary.seconds >= 7, summary.line()
