"""Goodput at three times a model's capacity, with and without client deadlines, side by side on one server
(loadtest.bench.deadlines, as `make deadline-bench` runs it, with shorter phases).

Without deadlines, an overloaded server computes every queued request however long it waited, so its answers come
later than any client would wait and goodput falls towards what it served before its queue filled. With
`X-Request-Timeout-Ms`, a request that waited past its deadline is answered 504 uncomputed, the queue drains at the
speed of refusals, and the requests still worth answering are computed in time. The figures are printed; the
assertion compares the two phases of this one run, never a fixed time."""

from __future__ import annotations

import pytest

from loadtest.bench.deadlines import compare
from loadtest.payloads import payloads
from tests.conftest import EMBEDDERS, TREE

pytestmark = [pytest.mark.ops, pytest.mark.integration, pytest.mark.slow, pytest.mark.proof]


def test_deadlines_keep_goodput_up_under_a_3x_overload(private_server):
    spec = EMBEDDERS[0]
    server = private_server([spec.name], model_store=TREE.model_store)
    sample = payloads(spec.name, 1)[0]
    rate, median, (without, with_deadline) = compare(
        f"{server.inference_url}/predictions/{spec.name}", sample.body,
        {**server.headers(), "Content-Type": sample.content_type},
        clients=8, seconds=8.0, overload=3.0, deadline_ms=1000)
    print(f"\ncapacity {rate:.1f}/s (median {median * 1000:.0f} ms); goodput within 1 s at 3x, once settled: "
          f"{without.steady_goodput:.1f}/s without deadlines, {with_deadline.steady_goodput:.1f}/s with")
    print(without.HEADER)
    for phase in (without, with_deadline):
        print(phase.line())
    assert with_deadline.count(504) > 0, "no request expired: the overload did not build a queue"
    assert without.count(504) == 0, "a request without a deadline was refused for one"
    # once the queue is full, a request without a deadline waits longer than any client would: few answers in time
    assert with_deadline.steady_goodput > 2 * without.steady_goodput
    failed = [status for _, status, _ in with_deadline.answers if status not in (200, 504, 503)]
    assert not failed, f"answers other than 200, 504 and a full queue's 503: {failed[:10]}"
