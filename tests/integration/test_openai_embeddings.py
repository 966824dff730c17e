"""`POST /v1/embeddings` for every served text embedder, with the official `openai` client: the same vectors as the
native route, float and base64, token usage, and OpenAI's error object for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import requests

from tests.conftest import EMBEDDERS

pytestmark = pytest.mark.integration
TEXTS = ["A sentence to embed.", "Another, longer sentence that has a few more words in it."]


@pytest.mark.parametrize("spec", EMBEDDERS, ids=lambda s: s.name)
def test_embeddings_equal_the_native_answer_in_both_encodings(server, spec):
    import openai

    client = openai.OpenAI(base_url=f"{server.inference_url}/v1", api_key=server.keys()["inference"], max_retries=0)
    assert spec.name in {m.id for m in client.models.list()}
    native = requests.post(f"{server.inference_url}/predictions/{spec.name}", json={"texts": TEXTS},
                           headers=server.headers(), timeout=30).json()["embeddings"]
    for fmt in ("float", "base64"):
        answer = client.embeddings.create(model=spec.name, input=TEXTS, encoding_format=fmt)
        assert [d.index for d in answer.data] == [0, 1]
        got = np.array([d.embedding for d in answer.data], dtype=np.float64) if fmt == "float" else None
        if fmt == "base64":  # the client hands base64 back as the string the server sent
            got = np.stack([np.frombuffer(__import__("base64").b64decode(d.embedding), "<f4") for d in answer.data])
        np.testing.assert_allclose(got, np.array([n["embedding"] for n in native]), atol=1e-6)
        assert answer.usage.prompt_tokens == sum(n["tokens"] for n in native) == answer.usage.total_tokens
    one = client.embeddings.create(model=spec.name, input=TEXTS[0])
    assert len(one.data) == 1


@pytest.mark.parametrize("spec", EMBEDDERS, ids=lambda s: s.name)
def test_bad_embedding_requests_get_openai_errors(server, spec):
    url = f"{server.inference_url}/v1/embeddings"
    for body in ({"input": 5}, {"input": []}, {"input": ["x"], "encoding_format": "hex"}, {"input": [[1, 2]]}):
        answer = requests.post(url, json={"model": spec.name, **body}, headers=server.headers(), timeout=30)
        assert answer.status_code == 400 and set(answer.json()["error"]) == {"message", "type", "param", "code"}
    answer = requests.post(url, json={"model": "digits", "input": "x"}, headers=server.headers(), timeout=30)
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"
