"""Every served model against its kind's bad-request matrix, on a real TorchServe: each bad request, sent
inside a concurrent crowd of good ones, gets its own 4xx with a JSON body naming the problem; every good
request is answered 200; the worker processes are the same before and after."""

from __future__ import annotations

import pytest

from loadtest.payloads import payloads
from serve_config import control as ts
from tests.conftest import SERVED, post_together, worker_pids
from tests.kinds import checks, handler_settings, infer_samples

pytestmark = [pytest.mark.ops, pytest.mark.integration]


def server_limit(key: str) -> int:
    return int(ts.read_properties(ts.TEMPLATE)[key])


def matrix(spec) -> list[tuple[str, bytes, dict, int, str | None]]:
    """The model kind's matrix (tests/kinds), from its handler settings and the server's max_request_size."""
    return checks(spec).bad_matrix(handler_settings(spec), server_limit("max_request_size"))


@pytest.mark.parametrize("spec", SERVED, ids=lambda s: s.name)
def test_matrix_has_at_least_25_cases_per_kind(spec):
    cases = matrix(spec)
    assert len(cases) >= 25 and len({c[0] for c in cases}) == len(cases)


@pytest.mark.parametrize("spec", SERVED, ids=lambda s: s.name)
def test_each_bad_request_gets_its_own_4xx_inside_a_crowd_of_good_ones(server, spec):
    good = [("good", s.body, {"Content-Type": s.content_type}, 200, None) for s in payloads(spec.name, 12)]
    bad = [(name, body, headers, status, kind) for name, body, headers, status, kind in matrix(spec)]
    jobs = good + bad + [("unknown model name", good[0][1], good[0][2], 404, None)]
    jobs = [jobs[i] for i in sorted(range(len(jobs)), key=lambda i: (i * 7) % len(jobs))]  # interleaved
    pids = worker_pids(server, spec.name)
    # all at once, so bad and good requests share batches
    answers = post_together(server, [("no-such-model" if name == "unknown model name" else spec.name, body, headers)
                                     for name, body, headers, _, _ in jobs])
    errors = checks(spec).native_errors  # the form of the handler's errors at the native route: native or oip
    wrong = []
    for (name, _, _, status, kind), answer in zip(jobs, answers):
        try:
            body = answer.json()
        except ValueError:
            body = None
        if answer.status_code != status:
            wrong.append(f"{name}: HTTP {answer.status_code} (expected {status}): {answer.text[:120]}")
        elif name == "over the server's max_request_size" or status == 200:
            continue  # TorchServe's frontend (netty's aggregator) answers this 413 itself, with an empty body
        elif errors == "oip" and name != "unknown model name":  # TorchServe's own 404 is in its own form
            if not (isinstance(body, dict) and set(body) == {"error"} and body["error"]):
                wrong.append(f"{name}: the error body is not the OIP's {{\"error\": ...}}: {answer.text[:120]}")
        elif not (isinstance(body, dict) and body.get("code") == status and body.get("message")):
            wrong.append(f"{name}: the error body is not JSON naming the problem: {answer.text[:120]}")
        elif kind is not None and body.get("type") != kind:
            wrong.append(f"{name}: type {body.get('type')!r}, expected {kind!r}")
    assert not wrong, "\n".join(wrong)
    assert worker_pids(server, spec.name) == pids, "a bad request restarted a worker"


@pytest.mark.parametrize("spec", SERVED, ids=lambda s: s.name)
def test_each_bad_infer_request_gets_its_own_4xx_among_good_native_and_infer_requests(server, spec):
    """The OIP matrix at /v2/models/<model>/infer, all at once among good native requests and good infer requests
    to the same model (both forms in the same batches): each bad one its own status and `{"error": ...}` body,
    every good one 200, the workers the same before and after."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import requests

    samples = infer_samples(spec, 6)
    kind = checks(spec)
    good_infer = kind.good_infer(samples[0])
    native_url = f"{server.inference_url}/predictions/{spec.name}"
    infer_url = f"{server.inference_url}/v2/models/{spec.name}/infer"
    jobs = [("good native", native_url, s.body, {"Content-Type": s.content_type}, 200) for s in samples]
    jobs += [("good infer", infer_url, good_infer, {"Content-Type": "application/json"}, 200)] * 4
    jobs += [(name, infer_url, body, headers, status) for name, body, headers, status in kind.oip_matrix(handler_settings(spec))]
    jobs = [jobs[i] for i in sorted(range(len(jobs)), key=lambda i: (i * 7) % len(jobs))]
    pids = worker_pids(server, spec.name)
    barrier, auth = threading.Barrier(len(jobs)), server.headers()

    def send(job):
        _, url, body, headers, _ = job
        barrier.wait(timeout=60)
        return requests.post(url, data=body, headers={**auth, **headers}, timeout=60)

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        answers = list(pool.map(send, jobs))
    wrong = []
    for (name, url, _, _, status), answer in zip(jobs, answers):
        if answer.status_code != status:
            wrong.append(f"{name}: HTTP {answer.status_code} (expected {status}): {answer.text[:160]}")
        elif status != 200 and not (set(answer.json()) == {"error"} and answer.json()["error"]):
            wrong.append(f"{name}: not an OIP error body: {answer.text[:160]}")
        elif status == 200 and url == infer_url and answer.json()["outputs"][0]["shape"][0] != 2:
            wrong.append(f"{name}: {answer.text[:160]}")
    assert not wrong, "\n".join(wrong)
    assert worker_pids(server, spec.name) == pids, "a bad request restarted a worker"
