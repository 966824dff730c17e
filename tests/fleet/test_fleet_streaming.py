"""Streamed answers through the fleet's HAProxy: a generator's chunks cross the balancer as the worker makes them
(nothing buffers them to the end), on the native route (JSON lines) and on the OpenAI routes (Server-Sent Events,
through the official client), with the balancer's token. chat-tiny (random weights) keeps the replica's start short;
`ignore_eos` makes every answer as long as asked."""

from __future__ import annotations

import json
import time

import pytest
import requests

from serve_config import fleet as fleets
from tests.ops.servers import store_with

pytestmark = [pytest.mark.fleet, pytest.mark.integration, pytest.mark.slow]
MODEL = "chat-tiny"
TOKENS = 600  # under serve_config/chat.yaml's max_new_tokens: long enough that the stream takes a while
PROMPT = "Tell me a story about a lighthouse."


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet-streaming")
    started = fleets.launch(root / "fleet", 1, [MODEL], model_store=store_with(root, MODEL))
    try:
        yield started
    finally:
        fleets.shutdown(root / "fleet")
    assert started.replicas[0].server.pid() is None, "the replica was not stopped"


def test_native_chunks_cross_the_balancer_as_they_are_made(fleet):
    started = time.perf_counter()
    lines, times = [], []
    with requests.post(f"{fleet.url}/predictions/{MODEL}", headers=fleet.headers(), stream=True, timeout=120,
                       json={"prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}) as answer:
        assert answer.status_code == 200, answer.text
        assert answer.headers["Content-Type"] == "application/jsonl"
        for line in answer.iter_lines():
            if line:
                lines.append(json.loads(line))
                times.append(time.perf_counter() - started)
    assert lines[-1]["usage"]["completion_tokens"] == TOKENS and lines[-1]["finish_reason"] == "length"
    assert len(lines) > TOKENS // 4, len(lines)  # many chunks, not one body
    # Buffered by the balancer, every chunk would arrive at the end; here the first comes long before the last.
    assert times[0] < 0.25 * times[-1], (times[0], times[-1])


def test_the_openai_client_streams_through_the_balancer_the_same_text(fleet):
    import openai

    client = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key=fleet.token(), max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [MODEL]
    started = time.perf_counter()
    pieces, times = [], []
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=TOKENS, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    usage = None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            times.append(time.perf_counter() - started)
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None and usage.completion_tokens == TOKENS
    assert times[0] < 0.25 * times[-1], (times[0], times[-1])
    # The same greedy answer as the native route's: the balancer passes SSE bodies through whole.
    native = requests.post(f"{fleet.url}/predictions/{MODEL}", headers=fleet.headers(), timeout=120,
                           json={"prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True})
    assert native.status_code == 200, native.text
    text = "".join(json.loads(line)["text"] for line in native.text.splitlines() if line.strip())
    assert "".join(pieces) == text
    with pytest.raises(openai.AuthenticationError):  # the balancer's token check holds on the OpenAI routes too
        openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="wrong", max_retries=0).models.list()
