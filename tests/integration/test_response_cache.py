"""The response cache on a real TorchServe: the embedder served with `response_cache_mb` set (its archive with that
one setting changed, as an operator would build it), answered from each worker's cache on the native route and
the Open Inference Protocol's, counted in /metrics, bypassed by Cache-Control, and never shared with the next
version of the model."""

from __future__ import annotations

import time

import pytest
import requests

from loadtest.bench.prometheus import scrape
from loadtest.payloads import payloads
from serve_config import control as ts
from serve_config.rollout import versioned_copy
from tests.conftest import EMBEDDERS, TREE, built

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """The embedder with a 16 MiB cache per worker (version 1.0), and the same archive as version 2.0, registered
    beside it (not the default) from the same store, with the workers its config asks for."""
    spec = EMBEDDERS[0]
    root = tmp_path_factory.mktemp("cache")
    store = root / "store"
    store.mkdir()
    source = built(TREE.model_store / f"{spec.name}.mar")
    versioned_copy(source, store / f"{spec.name}.mar", "1.0", handler={"response_cache_mb": 16})
    versioned_copy(source, store / f"{spec.name}-v2.mar", "2.0", handler={"response_cache_mb": 16})
    server = ts.start(root / "run", [spec.name], ports=ts.Ports.free(), model_store=store)
    try:
        with server.network():
            answer = requests.post(f"{server.management_url}/models", timeout=240, headers=server.headers("management"),
                                   params={"url": f"{spec.name}-v2.mar", "synchronous": "true"})
        assert answer.status_code == 200, answer.text
        yield spec, server
    finally:
        ts.stop(root / "run")


def counters(server, model: str) -> dict[str, float]:
    return scrape(server.metrics_url, model, server.headers("management"))


def settled(server, model: str, before: dict[str, float], name: str, least: float) -> dict[str, float]:
    """The counters' growth since `before`, once `name` has grown by `least` (the worker's metric lines reach
    /metrics on the frontend's own time), or after ten seconds."""
    for _ in range(50):
        grown = {k: v - before.get(k, 0.0) for k, v in counters(server, model).items()}
        if grown.get(name, 0.0) >= least:
            return grown
        time.sleep(0.2)
    return grown


def test_a_repeated_request_is_answered_from_the_cache_with_the_same_bytes_and_not_computed(cached):
    spec, server = cached
    sample = payloads(spec.name, 1)[0]
    url = f"{server.inference_url}/predictions/{spec.name}"
    headers = {**server.headers(), "Content-Type": sample.content_type}
    before = counters(server, spec.name)
    answers = [requests.post(url, data=sample.body, headers=headers, timeout=60) for _ in range(10)]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert len({a.content for a in answers}) == 1
    statuses = [a.headers.get("X-Cache") for a in answers]
    misses = statuses.count("MISS")
    # each of the two workers computes it at most once; every other answer is a hit
    assert 1 <= misses <= 2 and statuses.count("HIT") == 10 - misses, statuses
    grown = settled(server, spec.name, before, "HandlerCacheHits", 10 - misses)
    assert grown.get("HandlerCacheHits") == 10 - misses and grown.get("HandlerCacheMisses") == misses, grown
    assert grown.get("HandlerBatchedRequests") == misses, f"only the misses reach the model: {grown}"

    refreshed = requests.post(url, data=sample.body, headers={**headers, "Cache-Control": "no-cache"}, timeout=60)
    assert refreshed.status_code == 200 and refreshed.headers.get("X-Cache") == "BYPASS"
    assert refreshed.content == answers[0].content


def test_an_infer_request_is_cached_by_its_content_and_a_different_one_is_computed(cached):
    spec, server = cached
    url = f"{server.inference_url}/v2/models/{spec.name}/infer"
    texts = [p.body.decode() for p in payloads(spec.name, 2)]

    def infer(text: str, request_id: str) -> requests.Response:
        body = {"id": request_id, "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}
        return requests.post(url, json=body, headers=server.headers(), timeout=60)

    first = [infer(texts[0], "one") for _ in range(6)]
    assert all(a.status_code == 200 for a in first), [a.text for a in first]
    assert [a.headers.get("X-Cache") for a in first].count("HIT") >= 4
    assert all(a.json() == first[0].json() and a.json()["id"] == "one" for a in first)
    other = infer(texts[1], "one")
    assert other.headers.get("X-Cache") == "MISS" and other.json()["outputs"] != first[0].json()["outputs"]
    renamed = infer(texts[0], "two")  # the answer echoes the id: another id is another answer
    assert renamed.headers.get("X-Cache") == "MISS" and renamed.json()["id"] == "two"


def test_the_next_version_never_answers_from_the_previous_versions_entries(cached):
    spec, server = cached
    sample = payloads(spec.name, 3)[2]
    headers = {**server.headers(), "Content-Type": sample.content_type}
    base = f"{server.inference_url}/predictions/{spec.name}"
    old = [requests.post(base, data=sample.body, headers=headers, timeout=60) for _ in range(4)]
    assert old[-1].headers.get("X-Cache") == "HIT" and old[-1].headers.get("X-Model-Version") == "1.0"
    new = requests.post(f"{base}/2.0", data=sample.body, headers=headers, timeout=60)
    assert new.status_code == 200 and new.headers.get("X-Model-Version") == "2.0"
    assert new.headers.get("X-Cache") == "MISS" and new.json() == old[0].json()
    again = [requests.post(f"{base}/2.0", data=sample.body, headers=headers, timeout=60) for _ in range(4)]
    assert all(a.headers.get("X-Model-Version") == "2.0" and a.json() == old[0].json() for a in again)
    # its workers keep entries of their own (each computes it once at most)
    assert [a.headers.get("X-Cache") for a in again].count("HIT") >= 3
