"""A real TorchServe (token auth on, free loopback ports) answering real HTTP requests."""

from __future__ import annotations

import base64
import json
import time

import pytest
import requests

from handlers.batch_metrics import BATCHES, EXPIRED, REQUESTS
from loadtest.bench.prometheus import scrape
from loadtest.payloads import payloads
from models.paths import model_config_values
from tests.conftest import CLASSIFIERS, EMBEDDERS, SERVED, TENSORS, ClassifierReference, post_together, worker_pids
from tests.kinds import checks

pytestmark = pytest.mark.integration


def predict_url(server, model: str) -> str:
    return f"{server.inference_url}/predictions/{model}"


def batch_counters(server, model: str) -> tuple[float, float]:
    """(batches, requests) the handler has processed, from its counters on the Prometheus endpoint."""
    counters = scrape(server.metrics_url, model, server.headers("management"))
    return counters.get(BATCHES, 0.0), counters.get(REQUESTS, 0.0)


@pytest.mark.parametrize("spec", CLASSIFIERS, ids=lambda s: s.name)
def test_all_three_input_forms_equal_offline_predictions(server, spec):
    reference = ClassifierReference(spec.name)
    auth = server.headers()
    url = predict_url(server, spec.name)
    for sample in payloads(spec.name, 7):
        raw = requests.post(url, data=sample.body, headers={**auth, "Content-Type": sample.content_type}, timeout=30)
        multipart = requests.post(url, files={"data": (sample.name, sample.body, sample.content_type)}, headers=auth,
                                  timeout=30)
        as_json = requests.post(url, json={"image": base64.b64encode(sample.body).decode()}, headers=auth, timeout=30)
        put = requests.put(url, data=sample.body, headers=auth, timeout=30)  # curl -T: no Content-Type at all
        for answer in (raw, multipart, as_json, put):
            assert answer.status_code == 200, answer.text
            assert answer.headers["content-type"].startswith("application/json")
            reference.assert_matches(answer.json(), sample.body)


BAD = [
    (b"", {"Content-Type": "image/png"}, 400, "EmptyRequest"),
    (b"GIF89a truncated", {"Content-Type": "image/gif"}, 400, "InvalidImage"),
    (b"%PDF-1.4 not an image", {"Content-Type": "application/octet-stream"}, 400, "InvalidImage"),
    (b'{"image": "@@@"}', {"Content-Type": "application/json"}, 400, "InvalidBase64"),
    (b'{"image": ', {"Content-Type": "application/json"}, 400, "InvalidJSON"),
    (b'["not", "an", "object"]', {"Content-Type": "application/json"}, 400, "InvalidJSON"),
    (b"\x89PNG\r\n\x1a\nxx", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "UnsupportedMediaType"),
]


def bad_requests(spec) -> list[tuple[bytes, dict, int, str]]:
    """BAD, plus a body one byte over this model's own max_image_bytes (serve_config/<model>.yaml)."""
    config = model_config_values(spec.name)
    limit = config["handler"]["max_image_bytes"]
    return BAD + [(b"x" * (limit + 1), {"Content-Type": "image/png"}, 413, "PayloadTooLarge")]


@pytest.mark.parametrize("spec", CLASSIFIERS, ids=lambda s: s.name)
def test_concurrent_mix_of_good_and_bad_requests_each_get_their_own_answer(server, spec):
    reference = ClassifierReference(spec.name)
    samples = payloads(spec.name, 24)
    jobs = [("good", s.body, {"Content-Type": s.content_type}, s) for s in samples]
    jobs += [("bad", body, headers, (status, kind)) for body, headers, status, kind in bad_requests(spec)]
    jobs = [jobs[i] for i in sorted(range(len(jobs)), key=lambda i: (i * 7) % len(jobs))]  # interleave
    pids_before = worker_pids(server, spec.name)
    batches_before, requests_before = batch_counters(server, spec.name)
    answers = post_together(server, [(spec.name, body, headers) for _, body, headers, _ in jobs])
    for (kind, body, _, expected), answer in zip(jobs, answers):
        if kind == "good":
            assert answer.status_code == 200, answer.text
            reference.assert_matches(answer.json(), body)
        else:
            status, error_type = expected
            assert answer.status_code == status, answer.text
            assert answer.json() == {"code": status, "type": error_type, "message": answer.json()["message"]}
    assert worker_pids(server, spec.name) == pids_before, "a bad request restarted the worker"
    batches_after, requests_after = batch_counters(server, spec.name)
    handled = requests_after - requests_before  # every request, good or bad, reaches the handler
    assert handled >= len(samples), "the handler saw fewer requests than were sent"
    assert batches_after - batches_before < handled, "concurrent requests were never batched together"


@pytest.mark.parametrize("spec", EMBEDDERS, ids=lambda s: s.name)
def test_embedder_input_forms_equal_sentence_transformers(server, spec, sentence_reference):
    auth, url = server.headers(), predict_url(server, spec.name)
    texts = ["The quick brown fox jumps over the lazy dog.", "ünïcödé ✓ text", "token " * 300]
    plain = [requests.post(url, data=t.encode(), headers={**auth, "Content-Type": "text/plain; charset=utf-8"}, timeout=30)
             for t in texts]
    single = [requests.post(url, json={"text": t}, headers=auth, timeout=30) for t in texts]
    listed = requests.post(url, json={"texts": texts}, headers=auth, timeout=30)
    for answer in (*plain, *single, listed):
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/json"), answer.text
    for answers in (plain, single):
        sentence_reference.assert_matches([a.json()["embedding"] for a in answers], texts)
    items = listed.json()["embeddings"]
    sentence_reference.assert_matches([i["embedding"] for i in items], texts)
    assert [i["truncated"] for i in items] == [False, False, True] and items[2]["tokens"] == 256


TEXT_BAD = [
    (b"", {"Content-Type": "text/plain"}, 400, "EmptyRequest"),
    (b"   ", {"Content-Type": "text/plain"}, 400, "EmptyText"),
    (b"caf\xe9 latin-1", {"Content-Type": "text/plain"}, 400, "InvalidUTF8"),
    (b'{"text": ', {"Content-Type": "application/json"}, 400, "InvalidJSON"),
    (b'{"text": 12}', {"Content-Type": "application/json"}, 400, "InvalidText"),
    (b'{"texts": ["a", null]}', {"Content-Type": "application/json"}, 400, "InvalidText"),
    (json.dumps({"texts": ["t"] * 65}).encode(), {"Content-Type": "application/json"}, 413, "TooManyTexts"),
    (b"\x89PNG\r\n", {"Content-Type": "image/png"}, 415, "UnsupportedMediaType"),
]


@pytest.mark.parametrize("spec", EMBEDDERS, ids=lambda s: s.name)
def test_embedder_concurrent_mix_of_good_and_bad_requests(server, spec, sentence_reference):
    samples = payloads(spec.name, 16)
    jobs = [("good", s.body, {"Content-Type": s.content_type}, s) for s in samples]
    jobs += [("bad", body, headers, (status, kind)) for body, headers, status, kind in TEXT_BAD]
    jobs = [jobs[i] for i in sorted(range(len(jobs)), key=lambda i: (i * 7) % len(jobs))]
    pids_before = worker_pids(server, spec.name)
    answers = post_together(server, [(spec.name, body, headers) for _, body, headers, _ in jobs])
    good_texts, good_embeddings = [], []
    for (kind, body, headers, expected), answer in zip(jobs, answers):
        if kind == "good":
            assert answer.status_code == 200, answer.text
            good_embeddings.append(answer.json()["embedding"])
            good_texts.append(json.loads(body)["text"] if headers["Content-Type"] == "application/json" else body.decode())
        else:
            assert (answer.status_code, answer.json()["type"]) == expected, answer.text
    sentence_reference.assert_matches(good_embeddings, good_texts)
    assert worker_pids(server, spec.name) == pids_before, "a bad request restarted the worker"


@pytest.mark.parametrize("spec", TENSORS, ids=lambda s: s.name)
def test_tensor_model_answers_the_same_infer_request_at_both_routes_and_in_binary_as_eager(server, spec):
    """A tensor-kind model: the JSON infer request at /predictions and at /v2/models/<m>/infer, and the same
    tensors in the binary extension, all answered with the eager checkpoint's outputs for those rows."""
    from tests.kinds.tensor import binary

    samples = payloads(spec.name, 6)
    auth = server.headers()
    routes = {"native": predict_url(server, spec.name), "infer": f"{server.inference_url}/v2/models/{spec.name}/infer"}
    for route, url in routes.items():
        answers = [requests.post(url, data=s.body, headers={**auth, "Content-Type": "application/json"}, timeout=30)
                   for s in samples]
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        assert all(a.json()["model_name"] == spec.name for a in answers)
        checks(spec).assert_native(samples, [a.json() for a in answers])
    for sample in samples[:2]:
        raw, header_length = binary(json.loads(sample.body))
        answer = requests.post(routes["infer"], data=raw, timeout=30,
                               headers={**auth, "Content-Type": "application/octet-stream",
                                        "Inference-Header-Content-Length": str(header_length)})
        assert answer.status_code == 200, answer.text
        checks(spec).assert_native([sample], [answer.json()])


def test_a_request_whose_deadline_passed_in_the_queue_is_answered_504_uncomputed_beside_its_batch(server):
    """X-Request-Timeout-Ms counts from the request's arrival at the frontend. 1 ms passes before any worker sees a
    request (the batch aggregator alone waits maxBatchDelay for company), so that request gets 504 and is not
    computed, while the neighbours of its batch are answered as alone; a malformed deadline is a 400."""
    spec = CLASSIFIERS[0]
    payload = payloads(spec.name, 1)[0]
    header = {"Content-Type": payload.content_type}
    alone = requests.post(predict_url(server, spec.name), data=payload.body, timeout=60,
                          headers={**server.headers(), **header, "X-Request-Timeout-Ms": "60000"})
    assert alone.status_code == 200, alone.text
    before = scrape(server.metrics_url, spec.name, server.headers("management"))
    jobs = [(spec.name, payload.body, {**header, "X-Request-Timeout-Ms": timeout})
            for timeout in ("1", "60000", None, "1", "soon", "0")]
    jobs = [(model, body, {k: v for k, v in headers.items() if v is not None}) for model, body, headers in jobs]
    answers = post_together(server, jobs)
    assert [a.status_code for a in answers] == [504, 200, 200, 504, 400, 400], [a.text for a in answers]
    assert answers[0].json()["type"] == "DeadlineExceeded" and answers[4].json()["type"] == "InvalidTimeout"
    assert answers[1].json() == answers[2].json() == alone.json()
    for _ in range(50):  # the counters reach /metrics through the worker's metric log lines
        seen = {k: v - before.get(k, 0.0) for k, v in
                scrape(server.metrics_url, spec.name, server.headers("management")).items()}
        if seen.get(EXPIRED, 0.0) >= 2 and seen.get(REQUESTS, 0.0) >= 2:
            break
        time.sleep(0.2)
    # only the two with a live deadline or none were in a batch: the expired two and the malformed two never were
    assert seen.get(EXPIRED) == 2 and seen.get(REQUESTS) == 2, seen


def test_token_is_required(server):
    model = SERVED[0].name
    sample = payloads(model, 1)[0]
    headers = {"Content-Type": sample.content_type}
    missing = requests.post(predict_url(server, model), data=sample.body, headers=headers, timeout=30)
    wrong = requests.post(predict_url(server, model), data=sample.body, timeout=30,
                          headers={**headers, "Authorization": "Bearer wrong"})
    management_key_for_inference = requests.post(predict_url(server, model), data=sample.body, timeout=30,
                                                 headers={**headers, **server.headers("management")})
    for answer in (missing, wrong, management_key_for_inference):
        assert 400 <= answer.status_code < 500 and "Token Authorization failed" in answer.text
    assert requests.get(f"{server.management_url}/models", timeout=10).status_code >= 400
    assert requests.get(f"{server.inference_url}/ping", timeout=10).status_code >= 400
    ping = requests.get(f"{server.inference_url}/ping", headers=server.headers(), timeout=10)
    assert ping.status_code == 200 and ping.json()["status"] == "Healthy"


def test_registration_needs_the_management_key_and_takes_the_local_store_only(server):
    """Registration is on (make deploy): the inference key cannot register, and an archive from a URL or from
    outside the model store is refused with the management key too; nothing new is registered."""
    models = f"{server.management_url}/models"
    answer = requests.post(models, params={"url": "digits.mar"}, headers=server.headers("inference"), timeout=10)
    assert answer.status_code == 401 and "token" in answer.text.lower(), answer.text
    for url in ("https://example.com/evil.mar", "file:///etc/passwd"):
        answer = requests.post(models, params={"url": url}, headers=server.headers("management"), timeout=30)
        assert 400 <= answer.status_code < 500, (url, answer.status_code, answer.text)
    listed = requests.get(models, headers=server.headers("management"), timeout=10).json()
    assert sorted(m["modelName"] for m in listed["models"]) == sorted(s.name for s in SERVED)


def test_unknown_model_is_404_json(server):
    answer = requests.post(predict_url(server, "no-such-model"), data=b"x", timeout=10,
                           headers={**server.headers(), "Content-Type": "image/png"})
    assert answer.status_code == 404 and json.loads(answer.text)["code"] == 404


def test_prometheus_metrics_are_served(server):
    text = requests.get(f"{server.metrics_url}/metrics", headers=server.headers("management"), timeout=10).text
    assert "ts_inference_requests_total" in text
