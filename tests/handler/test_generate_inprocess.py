"""The generate kind's scheduler in process, on chat-tiny (SmolLM2's tokenizer and architecture, random weights):
continuous batching, sampling, stop strings, limits and hostile bodies, one call per decode step as TorchServe's
ContinuousBatching aggregator makes them. The server-side behaviour is tests/integration/test_chat.py's."""

from __future__ import annotations

import json

import pytest
import torch

from handlers import openai
from handlers.kinds import generate
from models import chat
from tests.conftest import TREE, built

JSON = {"Content-Type": "application/json"}
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea and the wind over it.", "Hi",
           "List three prime numbers, and say why each one is prime, in one sentence.", "2+2=?",
           "Name a color.", "Why is the sky blue? Explain it to a child of five.", "Tell me a story."]


@pytest.fixture(scope="module")
def decoder():
    directory = built(TREE.checkpoint("chat-tiny") / "model.pt").parent
    torch.set_num_threads(1)
    model, _ = chat.load(directory)
    return directory, model


def scheduler(decoder, slots: int = 8, **settings) -> generate.Scheduler:
    directory, model = decoder
    return generate.Scheduler(model, model.config, generate.ChatFormat(directory), generate.Settings(**settings),
                              slots=slots, model_name="chat-tiny")


def body(**fields) -> dict:
    return {"body": json.dumps(fields).encode()}


def drive(sched: generate.Scheduler, arrivals: dict[int, list[tuple[str, dict, dict]]], steps: int = 10_000
          ) -> dict[str, list[generate.Chunk]]:
    """Call the scheduler as the aggregator does: running requests come back with no parameters; `arrivals` maps a
    step to the new requests that join at it. Each request's chunks, in order."""
    chunks: dict[str, list[generate.Chunk]] = {}
    running: list[tuple[str, dict, dict]] = []
    for step in range(steps):
        batch = running + arrivals.get(step, [])
        if not batch and step > max(arrivals, default=0):
            break
        if not batch:
            continue
        answers = sched.serve(batch)
        running = []
        for (rid, _params, headers), chunk in zip(batch, answers, strict=True):
            chunks.setdefault(rid, []).append(chunk)
            if chunk.more:
                running.append((rid, {}, headers))
    return chunks


def native_text(chunks: list[generate.Chunk]) -> dict:
    """The native stream's lines joined: the text, and the last line's finish reason and usage."""
    lines = [json.loads(line) for c in chunks for line in c.body.decode().splitlines()]
    return {"text": "".join(line["text"] for line in lines), **{k: lines[-1][k] for k in ("finish_reason", "usage")}}


def greedy(prompt: str, max_tokens: int = 24, **extra) -> dict:
    return body(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0, **extra)


def test_greedy_answers_are_the_same_alone_and_in_a_batch_of_8_that_joins_and_leaves_at_different_steps(decoder):
    sched = scheduler(decoder)
    alone = {p: native_text(drive(sched, {0: [("a", greedy(p, 8 + 3 * i), JSON)]})["a"])
             for i, p in enumerate(PROMPTS)}
    # arrivals spread over the first steps: each joins a batch already decoding, and they finish at different steps
    arrivals: dict[int, list] = {}
    for i, p in enumerate(PROMPTS):
        arrivals.setdefault(i % 4 * 3, []).append((f"r{i}", greedy(p, 8 + 3 * i), JSON))
    steps_before = sched.stats["decode_steps"]
    together = drive(sched, arrivals)
    for i, p in enumerate(PROMPTS):
        assert native_text(together[f"r{i}"]) == alone[p], p
    # the batch shared its decode steps: far fewer steps than tokens
    tokens = sum(native_text(together[f"r{i}"])["usage"]["completion_tokens"] for i in range(len(PROMPTS)))
    assert sched.stats["decode_steps"] - steps_before < tokens / 3
    assert sorted(sched.free) == list(range(8)) and not sched.running


@pytest.mark.parametrize("backend", ["program", "aoti"])
def test_an_exported_decoder_answers_as_the_eager_one_alone_and_in_a_batch_that_joins_and_leaves(decoder, backend):
    """The scheduler over the verified export of chat-tiny (what its archive serves): the same greedy answers as
    the eager decoder's, for prompts arriving at different steps."""
    artifacts = built(TREE.artifacts("chat-tiny") / "verified.json").parent
    exported = generate.build(artifacts, generate.Settings(backend=backend), served_as=("chat-tiny", "1"),
                              max_batch=8)
    arrivals: dict[int, list] = {}
    for i, p in enumerate(PROMPTS):
        arrivals.setdefault(i % 4 * 3, []).append((f"r{i}", greedy(p, 8 + 3 * i), JSON))
    want, got = drive(scheduler(decoder), arrivals), drive(exported, arrivals)
    for i, p in enumerate(PROMPTS):
        assert native_text(got[f"r{i}"]) == native_text(want[f"r{i}"]), p
    assert sorted(exported.free) == list(range(8)) and not exported.running


def test_a_seed_reproduces_a_sampled_answer_temperature_0_is_greedy_and_a_tiny_top_p_keeps_the_top_token(decoder):
    sched = scheduler(decoder)
    ask = dict(prompt="Once upon a time", max_tokens=16, stream=True)
    run = lambda **kw: native_text(drive(sched, {0: [("s", body(**ask, **kw), JSON)]})["s"])["text"]  # noqa: E731
    assert run(temperature=1.0, seed=7) == run(temperature=1.0, seed=7)
    assert len({run(temperature=1.5, seed=s) for s in range(4)}) > 1
    assert run(temperature=0) == run(temperature=0) == run(temperature=1.0, top_p=1e-6, seed=3)


def test_sample_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    seen = {generate.sample(logits, generate.Sampling(max_tokens=1, temperature=1.0, top_p=0.7),
                            torch.Generator().manual_seed(s)) for s in range(200)}
    assert seen == {0, 1}


def test_a_stop_string_across_a_token_boundary_cuts_the_answer_there_and_is_never_streamed(decoder):
    directory, _ = decoder
    sched = scheduler(decoder)
    fmt = generate.ChatFormat(directory)
    free = native_text(drive(sched, {0: [("f", greedy(PROMPTS[1], 40), JSON)]})["f"])
    ids = fmt.chat_ids([{"role": "user", "content": PROMPTS[1]}])
    assert free["usage"]["prompt_tokens"] == len(ids)
    # a stop string made of the end of one generated token and the start of the next
    tokens = [fmt.decode([t]) for t in fmt.encode(free["text"])]
    k = next(i for i in range(5, len(tokens) - 1) if len(tokens[i]) >= 2 and len(tokens[i + 1]) >= 2)
    stop = tokens[k][-2:] + tokens[k + 1][:2]
    expected = free["text"][:free["text"].find(stop)]
    chunks = drive(sched, {0: [("s", greedy(PROMPTS[1], 40, stop=["never-there", stop]), JSON)]})["s"]
    answer = native_text(chunks)
    assert answer["text"] == expected and answer["finish_reason"] == "stop"
    assert all(stop not in c.body.decode() for c in chunks)


def test_max_tokens_holds_and_usage_counts_are_exact(decoder):
    sched = scheduler(decoder)
    for n in (1, 2, 17):
        answer = native_text(drive(sched, {0: [("m", body(prompt="The weather today", max_tokens=n, temperature=0,
                                                         stream=True), JSON)]})["m"])
        prompt = len(generate.ChatFormat(decoder[0]).encode("The weather today"))
        assert answer["usage"] == {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
        assert answer["finish_reason"] == "length"


def test_an_openai_stream_is_server_sent_events_ending_in_usage_and_done(decoder):
    sched = scheduler(decoder)
    headers = {**JSON, openai.ROUTE_HEADER: openai.CHAT}
    chunks = drive(sched, {0: [("o", greedy("Hi", 6, stream=True, stream_options={"include_usage": True}),
                                headers)]})["o"]
    assert all(c.content_type == openai.SSE_CONTENT_TYPE and c.status == 200 for c in chunks)
    events = b"".join(c.body for c in chunks).decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    assert payloads[-2]["choices"][0]["finish_reason"] == "length"
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 6
    assert {p["id"] for p in payloads} == {payloads[0]["id"]} and payloads[0]["object"] == "chat.completion.chunk"


def test_a_request_the_frontend_stops_sending_is_evicted_at_once_and_its_slot_reused(decoder):
    sched = scheduler(decoder, slots=2)
    a, b = ("a", greedy("Tell me a story.", 50), JSON), ("b", greedy("Hi", 50), JSON)
    assert all(c.more for c in sched.serve([a, b]))
    sched.serve([("a", {}, JSON), ("b", {}, JSON)])
    sched.serve([("a", {}, JSON)])  # b's client went away
    assert set(sched.running) == {"a"} and len(sched.free) == 1
    (c,) = sched.serve([("a", {}, JSON), ("c", greedy("Hi", 50), JSON)])[1:]
    assert c.status == 200 and set(sched.running) == {"a", "c"}


HOSTILE = {
    "10,000 messages": body(messages=[{"role": "user", "content": "x"}] * 10_000),
    "non-string content": body(messages=[{"role": "user", "content": {"a": 1}}]),
    "an unknown role": body(messages=[{"role": "wizard", "content": "hi"}]),
    "10,000 stop strings": body(prompt="hi", stop=["x"] * 10_000),
    "n=2": body(prompt="hi", n=2),
    "max_tokens past the cap": body(prompt="hi", max_tokens=10**9),
    "a negative temperature": body(prompt="hi", temperature=-1),
    "a prompt past max_prompt_tokens": body(prompt="word " * 5000),
    "an empty prompt": body(prompt=""),
    "not an object": {"body": b"[1, 2]"},
}


@pytest.mark.parametrize("route", [generate.NATIVE, openai.CHAT])
def test_hostile_bodies_get_their_own_4xx_and_their_neighbours_are_answered(decoder, route):
    sched = scheduler(decoder, slots=16)
    headers = JSON if route == generate.NATIVE else {**JSON, openai.ROUTE_HEADER: route}
    batch = [("good-0", greedy("Hi", 4), headers)]
    batch += [(name, params, headers) for name, params in HOSTILE.items()]
    batch += [("utf8", {"body": b'{"prompt": "\xff\xfe"}'}, headers), ("good-1", greedy("Hi", 4), headers)]
    answers = dict(zip([rid for rid, _, _ in batch], sched.serve(batch), strict=True))
    for rid, chunk in answers.items():
        if rid.startswith("good"):
            assert chunk.status == 200 and chunk.more, rid
        else:
            assert 400 <= chunk.status < 500 and not chunk.more, (rid, chunk.status)
            error = json.loads(chunk.body)
            assert ("error" in error and "message" in error["error"]) if route != generate.NATIVE else "message" in error
    assert set(sched.running) == {"good-0", "good-1"}


def test_the_deadline_ends_a_sequence_with_an_error_event(decoder):
    sched = scheduler(decoder, deadline_s=1)
    headers = {**JSON, openai.ROUTE_HEADER: openai.CHAT}
    first = sched.serve([("d", greedy("Tell me a story.", 100, stream=True), headers)])[0]
    sched.running["d"].deadline = 0.0  # as if deadline_s had passed
    last = sched.serve([("d", {}, headers)])[0]
    assert first.more and not last.more and b'"code": "DeadlineExceeded"' in last.body
    assert last.body.endswith(openai.DONE) and not sched.running


def test_a_request_whose_client_deadline_passed_in_the_queue_is_refused_504_without_a_slot(decoder):
    import time

    from handlers.requests import RECEIVED_HEADER, TIMEOUT_HEADER

    sched = scheduler(decoder, slots=2)
    now = int(time.time() * 1000)
    late = {**JSON, TIMEOUT_HEADER: "50", RECEIVED_HEADER: str(now - 1000)}
    fresh = {**JSON, TIMEOUT_HEADER: "60000", RECEIVED_HEADER: str(now)}
    answers = sched.serve([("late", greedy("Hi", 4), late), ("fresh", greedy("Hi", 4), fresh),
                           ("chat", greedy("Hi", 4), {**late, openai.ROUTE_HEADER: openai.CHAT})])
    assert [a.status for a in answers] == [504, 200, 504] and not answers[0].more and not answers[2].more
    assert json.loads(answers[0].body)["type"] == "DeadlineExceeded"
    assert json.loads(answers[2].body)["error"]["code"] == "DeadlineExceeded"
    assert list(sched.running) == ["fresh"] and len(sched.free) == 1


def test_each_request_leaves_a_timeline_once_answered_or_dropped_by_its_client(decoder):
    """What a trace of a generation is made of (handlers/tracing.py, record_generation): read, prefill and decode
    times in order, the prompts prefilled together and the sequences stepped together, the token counts, and how it
    ended; a request whose client stopped asking for it ends 499 when the scheduler sees it gone."""
    sched = scheduler(decoder)
    headers = {**JSON, "x-request-id": "mine"}
    chunks = drive(sched, {0: [("a", greedy(PROMPTS[0], max_tokens=6, ignore_eos=True), headers),
                               ("b", greedy(PROMPTS[1], max_tokens=3, ignore_eos=True), JSON)]})
    assert [c.more for c in chunks["a"]][-1] is False
    ended = {t.request_id: t for t in sched.ended()}
    assert set(ended) == {"mine", "b"} and sched.ended() == []
    a = ended["mine"]
    assert a.status == 200 and a.generated_tokens == 6 and a.prompt_tokens > 0
    assert a.prefill_batch == 2 and a.decode_batch == 2  # prefilled together, stepped together while both ran
    assert a.read[0] <= a.read[1] <= a.prefill[0] <= a.prefill[1] <= a.decode[0] <= a.decode[1] <= a.ended
    sched.serve([("c", greedy(PROMPTS[2], max_tokens=50, ignore_eos=True), JSON)])
    sched.serve([])  # its client went away: the aggregator no longer sends it
    (gone,) = sched.ended()
    assert gone.request_id == "c" and gone.status == generate.CLIENT_CLOSED and gone.generated_tokens == 1
