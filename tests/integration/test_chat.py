"""The generate kind through a real TorchServe: chat-tiny (random weights: serving behaviour) and chat (SmolLM2's
weights: real answers), over the native route, the OpenAI routes with the official `openai` client, and streaming.
Continuous batching is TorchServe's ContinuousBatching aggregator; what the scheduler did is read from /metrics."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from loadtest.bench.prometheus import delta, scrape
from models import registry
from tests.conftest import TREE, built, worker_pids
from tests.kinds import checks

pytestmark = pytest.mark.integration
TINY, REAL = "chat-tiny", "chat"
TINY_CHECKS = checks(registry.entry(TINY))  # the generate kind's test checks (tests/kinds/generate.py)
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea and the wind over it.", "Hi",
           "List three prime numbers, and say why each one is prime, in one sentence.", "2+2=?",
           "Name a color.", "Why is the sky blue? Explain it to a child of five.", "Tell me a story."]


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    from serve_config.control import Ports, start, stop

    for model in (TINY, REAL):
        built(TREE.archive(model))
    run_dir = tmp_path_factory.mktemp("chat")
    try:
        yield start(run_dir, [TINY, REAL], ports=Ports.free(), model_store=TREE.model_store)
    finally:
        stop(run_dir)


@pytest.fixture(scope="module")
def client(chat_server):
    import openai

    return openai.OpenAI(base_url=f"{chat_server.inference_url}/v1", api_key=chat_server.keys()["inference"],
                         max_retries=0, timeout=60)


def native_stream(server, body: dict, *, model: str = TINY, stop_after: int | None = None):
    """(lines, seconds at which each chunk arrived) of a native streamed answer; `stop_after`: close the connection
    after that many chunks."""
    start = time.perf_counter()
    lines, times = [], []
    with requests.post(f"{server.inference_url}/predictions/{model}", json=body, headers=server.headers(),
                       stream=True, timeout=60) as answer:
        assert answer.status_code == 200, answer.text
        assert answer.headers["Content-Type"] == "application/jsonl"
        for line in answer.iter_lines():
            if not line:
                continue
            lines.append(json.loads(line))
            times.append(time.perf_counter() - start)
            if stop_after is not None and len(lines) >= stop_after:
                break
    return lines, times


def text_of(lines) -> str:
    return "".join(line["text"] for line in lines)


def greedy(prompt: str, max_tokens: int) -> dict:
    return TINY_CHECKS.ask(prompt, max_tokens)


def test_the_openai_client_lists_chats_and_completes_whole_and_streamed(client):
    assert {TINY, REAL} <= {m.id for m in client.models.list()}
    whole = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                           temperature=0)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 8
    stream = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens and chunks[-1].choices == []
    text = client.completions.create(model=TINY, prompt="Once upon a time", max_tokens=5, temperature=0)
    streamed = client.completions.create(model=TINY, prompt="Once upon a time", max_tokens=5, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text and text.usage.completion_tokens == 5
    seeded = [client.completions.create(model=TINY, prompt="Once", max_tokens=12, temperature=1.0, seed=11)
              .choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_a_stream_answers_with_the_clients_request_id_on_both_routes(chat_server):
    """X-Request-ID (org.servemodels.oip.RequestIds) is on the head of a streamed answer, SSE and native alike."""
    body = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    for url, request_id in ((f"{chat_server.inference_url}/v1/chat/completions", "sse-1"),
                            (f"{chat_server.inference_url}/predictions/{TINY}", "lines-1")):
        with requests.post(url, json=body, stream=True, timeout=120,
                           headers={**chat_server.headers(), "X-Request-ID": request_id}) as stream:
            assert stream.status_code == 200 and stream.headers["X-Request-ID"] == request_id
            assert len(b"".join(stream.iter_content(None))) > 0


def test_errors_come_as_openai_error_objects_with_their_statuses(client, chat_server):
    import openai

    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "Hi"}])
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=TINY, messages=[{"role": "wizard", "content": "Hi"}])
    assert bad.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "Hi"}], max_tokens=10**6)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{chat_server.inference_url}/v1", api_key="wrong", max_retries=0).models.list()
    answer = requests.post(f"{chat_server.inference_url}/v1/chat/completions", data=b"{not json",
                           headers={**chat_server.headers(), "Content-Type": "application/json"}, timeout=10)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("model", [TINY, REAL])
def test_whole_greedy_answers_are_the_eager_decoders_own(chat_server, model):
    """Served greedy answers (the archive's exported decoder, in the server's batches) against the eager decoder's
    greedy tokens for the same prompts, each alone, computed in this process (tests/kinds/generate.py)."""
    kind = checks(registry.entry(model))
    asks = [{**kind.ask(prompt, 8 + 4 * i), "stream": False} for i, prompt in enumerate(PROMPTS[:4])]

    def send(ask):
        answer = requests.post(f"{chat_server.inference_url}/predictions/{model}", json=ask,
                               headers=chat_server.headers(), timeout=60)
        assert answer.status_code == 200, answer.text
        return answer.json()

    with ThreadPoolExecutor(len(asks)) as pool:
        kind.assert_native(asks, list(pool.map(send, asks)))


def test_hostile_bodies_get_their_own_4xx_while_their_neighbours_are_answered(chat_server):
    url, auth = f"{chat_server.inference_url}/v1/chat/completions", chat_server.headers()
    matrix = TINY_CHECKS.bad_matrix()
    good = json.dumps({"model": TINY, **greedy("Hi", 4)}).encode()
    jobs = [good, *(body for body, _ in matrix), good]
    barrier = threading.Barrier(len(jobs))

    def send(data: bytes):
        barrier.wait(timeout=30)
        return requests.post(url, data=data, headers={**auth, "Content-Type": "application/json"}, timeout=60)

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(send, jobs))
    assert [a.status_code for a in answers] == [200, *(status for _, status in matrix), 200]
    assert all("error" in a.json() for a in answers[1:-1])


def test_the_first_chunk_arrives_long_before_the_last_token_is_computed(chat_server):
    lines, times = native_stream(chat_server, {"prompt": "Write a long story about a dragon who learns to fly.",
                                               "max_tokens": 64, "temperature": 0}, model=REAL)
    assert lines[-1]["usage"]["completion_tokens"] == 64 and len(lines) > 20
    assert times[0] < 0.25 * times[-1], (times[0], times[-1])


def test_the_real_model_answers(client):
    answer = client.chat.completions.create(
        model=REAL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=32,
        temperature=0)
    assert "Paris" in answer.choices[0].message.content and answer.choices[0].finish_reason == "stop"


def test_eight_concurrent_streams_share_decode_steps_and_answer_as_they_do_alone(chat_server):
    asks = [greedy(p, 10 + 4 * i) for i, p in enumerate(PROMPTS)]
    alone = [text_of(native_stream(chat_server, ask)[0]) for ask in asks]
    before = scrape(chat_server.metrics_url, TINY)
    barrier = threading.Barrier(len(asks))

    def together(ask):
        barrier.wait(timeout=30)
        return text_of(native_stream(chat_server, ask)[0])

    with ThreadPoolExecutor(len(asks)) as pool:
        assert list(pool.map(together, asks)) == alone
    seen = delta(scrape(chat_server.metrics_url, TINY), before)
    # the server's own account: each decode step carried several sequences
    assert seen["GenerationDecodedTokens"] / seen["GenerationSteps"] > 2, seen


def leave_mid_stream(server, body: dict, *, after: int, model: str = TINY) -> int:
    """Stream a native answer over a bare socket, close it once `after` lines arrived, and return how many lines the
    server had sent by then: those read plus those already waiting in the socket (a client that is slow to close,
    say on a starved host, has been sent more than it read, and the server computed them before it could know)."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(server.inference_url)
    payload = json.dumps(body).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in server.headers().items())
    with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.sendall(f"POST /predictions/{model} HTTP/1.1\r\nHost: {url.netloc}\r\n{head}"
                     f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + payload)
        received = b""
        while received.count(b'"text":') < after:
            data = sock.recv(65536)
            assert data, received[-300:]
            received += data
        assert received.startswith(b"HTTP/1.1 200"), received[:300]
        sock.setblocking(False)
        while True:  # what had arrived when the client left
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                break
            if not data:
                break
            received += data
    return received.count(b'"text":')


def test_a_client_that_goes_away_mid_stream_frees_its_sequence_and_the_others_finish_unchanged(chat_server):
    asks = [greedy(p, 300) for p in PROMPTS[:4]]
    alone = [text_of(native_stream(chat_server, ask)[0]) for ask in asks[1:]]
    before = scrape(chat_server.metrics_url, TINY)
    with ThreadPoolExecutor(4) as pool:
        gone = pool.submit(leave_mid_stream, chat_server, asks[0], after=3)
        rest = [pool.submit(native_stream, chat_server, ask) for ask in asks[1:]]
        answers = [f.result()[0] for f in rest]
        assert [text_of(lines) for lines in answers] == alone
        sent = gone.result()
    # the scheduler evicts the gone one at its next step; the metrics reach /metrics after it, on the frontend's
    # own time: read them once two scrapes in a row agree and no sequence is active
    last = None
    for _ in range(60):
        now = scrape(chat_server.metrics_url, TINY)
        if now == last and now.get("GenerationActiveSequences") == 0:
            break
        last = now
        time.sleep(0.25)
    seen = delta(now, before)
    finished = sum(lines[-1]["usage"]["completion_tokens"] for lines in answers)
    # the one that left made what it had been sent when it closed and at most a few steps more (asked for 300)
    assert sent < 300 and finished + sent <= seen["GenerationTokens"] < finished + sent + 40, (sent, seen)
    assert scrape(chat_server.metrics_url, TINY)["GenerationActiveSequences"] == 0


def test_a_worker_killed_mid_stream_ends_its_stream_with_an_error_line_and_the_model_recovers(chat_server):
    import os
    import signal

    (pid,) = worker_pids(chat_server, TINY)
    lines: list = []
    ended = threading.Event()

    def read():
        try:
            with requests.post(f"{chat_server.inference_url}/predictions/{TINY}", json=greedy("Tell me a story.", 1000),
                               headers=chat_server.headers(), stream=True, timeout=60) as answer:
                for line in answer.iter_lines():
                    if line:
                        lines.append(line)
        except requests.RequestException:
            pass
        ended.set()

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 30
    while len(lines) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    assert ended.wait(30), "the stream of a killed worker never ended"
    reader.join()
    # the stream ends with an error line in its own form (the frontend's StreamEnd), not TorchServe's error page
    assert len(lines) < 1000 and json.loads(lines[-1])["type"] == "StreamInterrupted", lines[-2:]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        answer = requests.post(f"{chat_server.inference_url}/predictions/{TINY}", json={**greedy("Hi", 4),
                               "stream": False}, headers=chat_server.headers(), timeout=30)
        if answer.status_code == 200:
            break
        time.sleep(1)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
    assert worker_pids(chat_server, TINY) != [pid]


def test_the_readmes_chat_calls_stream_as_shown(chat_server):
    import os
    import re
    import subprocess

    from tests.conftest import ROOT

    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    curls = [line for block in blocks for line in block.splitlines() if line.startswith("curl -N")]
    assert len(curls) == 2
    outputs = []
    for command in curls:
        proc = subprocess.run(["bash", "-c", command.replace("http://127.0.0.1:8080", chat_server.inference_url)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "TOKEN": chat_server.keys()["inference"]})
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    events = [e for e in outputs[0].split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and "Paris" in "".join(
        (json.loads(e[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or "" for e in events[:-1])
    lines = [json.loads(line) for line in outputs[1].splitlines()]
    assert lines[-1]["finish_reason"] in ("stop", "length") and text_of(lines)


def test_grpc_stream_predictions_carries_the_same_chunks_as_the_native_route(chat_server):
    """TorchServe 0.12's GRPCJob.isOpen() returns isCancelled(), so its ContinuousBatching would drop a gRPC stream
    after its first chunk as if its client had gone; the frontend agent edits that method (MethodEdits)."""
    from loadtest.grpc_client import Client

    ask = greedy("Tell me a story.", 24)
    client = Client("127.0.0.1", chat_server.ports.grpc_inference, chat_server.keys()["inference"])
    try:
        chunks = [c for c in client.stream(TINY, json.dumps(ask).encode(), timeout=15) if c]
    finally:
        client.close()
    lines = [json.loads(line) for chunk in chunks for line in chunk.decode().splitlines()]
    assert len(chunks) > 5 and lines[-1]["usage"]["completion_tokens"] == 24
    TINY_CHECKS.same(lines, native_stream(chat_server, ask)[0])
