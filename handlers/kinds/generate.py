"""The generate kind: a decoder (models.llama) answering prompts token by token, sequences of concurrent requests
sharing each decode step. Nothing here knows about TorchServe (handlers.adapter.GenerationHandler wires it in).

Request forms:
- native (`/predictions/<m>`): JSON `{"messages": [{"role", "content"}, ...]}` (the chat template applies) or
  `{"prompt": "..."}` (raw text), with the sampling fields below; or a text/plain body: one user message.
  Answers stream by default (`"stream": false` for one JSON answer) as JSON lines: `{"text": "..."}` per new
  piece of text and a last line `{"text": "", "finish_reason", "usage"}`;
- the OpenAI API (handlers.openai): `/v1/chat/completions` (messages) and `/v1/completions` (prompt), streamed as
  Server-Sent Events when `stream` is true.
Sampling fields: max_tokens (max_completion_tokens), temperature (0: greedy), top_p, seed, stop (a string or a list),
n (1 only), stream, stream_options.include_usage, and vLLM's ignore_eos.

How a batch is served (`Scheduler.serve`, one call per decode step): TorchServe's ContinuousBatching aggregator
hands the worker every running request each call, plus new ones up to the model's batchSize (its sequences per
worker). A new request is parsed, its prompt run (prefill) into a free cache slot, and its first token sampled; every
running one takes one decode step together, one forward pass for all. A request the frontend no longer sends (its
client went away) is evicted at once and its slot reused. Each request gets one chunk per call, and the header
that says whether more follow.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from handlers import openai
from handlers.requests import (RequestError, content_type_of, decode_utf8, expired, parse_json_body, request_body,
                               request_id)
from handlers.settings import HandlerSettings
from models.llama import KVCache, LlamaConfig, step_inputs

logger = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant", "developer", "tool")
NATIVE = "native"
BACKENDS = ("eager", "program", "aoti")  # models.llama in PyTorch, its torch.export program, its AOTInductor package


@dataclass(frozen=True)
class Settings(HandlerSettings):
    """A generator's limits (the `handler:` section of its model-config YAML). Its sequences per worker are the
    model's batchSize: the frontend never sends more at once."""

    max_prompt_tokens: int = 2048
    max_new_tokens: int = 1024  # the most max_tokens may ask for
    default_max_tokens: int = 256  # when the request does not say
    max_messages: int = 256
    max_stop: int = 4  # stop strings per request (OpenAI's limit)
    max_stop_chars: int = 64  # per stop string
    max_body_chars: int = 1_000_000
    deadline_s: int = 300  # a sequence running longer ends with an error (OpenAI: a timeout event)
    backend: str = "eager"  # what runs the decoder: one of BACKENDS (export/decoder.py makes and verifies the others)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.response_cache_mb:
            raise ValueError("handler.response_cache_mb: a generator's answers are sampled, not a function of the "
                             "request alone; it keeps no response cache (remove the setting)")
        if self.backend not in BACKENDS:
            raise ValueError(f"handler.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.default_max_tokens > self.max_new_tokens:
            raise ValueError(f"handler.default_max_tokens ({self.default_max_tokens}) must be at most "
                             f"handler.max_new_tokens ({self.max_new_tokens})")

    @property
    def rows_per_pass(self) -> int:
        return 1


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Ask:
    """One parsed request: its prompt's token ids, how to sample, and how to answer."""

    route: str  # NATIVE or an openai route
    prompt_ids: list[int]
    sampling: Sampling
    stream: bool
    include_usage: bool = False
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (benches)


class ChatFormat:
    """The model's tokenizer and chat template (chat.json beside the weights), rendered in a sandbox."""

    def __init__(self, directory: Path) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        settings = json.loads((directory / "chat.json").read_text())
        self.template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
            settings["template"])
        self.bos_token, self.eos_token = settings["bos_token"], settings["eos_token"]
        self.stop_token_ids = frozenset(settings["stop_token_ids"])
        self.vocab_size = self.tokenizer.get_vocab_size()

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                    eos_token=self.eos_token)
        return self.encode(text)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _number(body: Mapping[str, Any], key: str, low: float, high: float, default: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise openai.OpenAIError(400, "invalid_value", f"`{key}` must be a number in [{low}, {high}]", param=key)
    return float(value)


def _messages(value: Any, settings: Settings) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise openai.OpenAIError(400, "invalid_messages", "`messages` must be a non-empty list", param="messages")
    if len(value) > settings.max_messages:
        raise openai.OpenAIError(400, "too_many_messages", f"`messages` has {len(value)} entries; at most "
                                 f"{settings.max_messages} (handler.max_messages)", param="messages")
    out = []
    for idx, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise openai.OpenAIError(400, "invalid_role", f"messages[{idx}] needs a role among {list(ROLES)}",
                                     param=f"messages[{idx}].role")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI's content parts: text parts only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise openai.OpenAIError(400, "invalid_content", f"messages[{idx}].content: only text parts are "
                                         "supported", param=f"messages[{idx}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise openai.OpenAIError(400, "invalid_content", f"messages[{idx}].content must be a string",
                                     param=f"messages[{idx}].content")
        role = "system" if message["role"] == "developer" else message["role"]
        out.append({"role": role, "content": content})
    return out


def _stop(value: Any, settings: Settings) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise openai.OpenAIError(400, "invalid_stop", "`stop` must be a non-empty string or a list of them",
                                 param="stop")
    if len(stops) > settings.max_stop or any(len(s) > settings.max_stop_chars for s in stops):
        raise openai.OpenAIError(400, "invalid_stop", f"`stop` takes at most {settings.max_stop} strings of at most "
                                 f"{settings.max_stop_chars} characters", param="stop")
    return tuple(stops)


def parse(route: str, body: Any, content_type: str, chat: ChatFormat, settings: Settings) -> Ask:
    """One request's Ask; OpenAIError (a RequestError) naming the field at fault otherwise."""
    if isinstance(body, (bytes, bytearray)) and len(body) > settings.max_body_chars * 4:
        raise openai.OpenAIError(413, "body_too_large", f"the body is over {settings.max_body_chars} characters")
    if route == NATIVE and content_type == "text/plain":
        text = body if isinstance(body, str) else decode_utf8(bytes(body or b""))
        value: Any = {"messages": [{"role": "user", "content": text}]}
    elif isinstance(body, (dict, list)):
        value = body
    else:
        value = parse_json_body(body if body is not None else b"")
    if not isinstance(value, dict):
        raise openai.OpenAIError(400, "invalid_body", "the body must be a JSON object")
    if value.get("n", 1) != 1:
        raise openai.OpenAIError(400, "invalid_value", "`n` must be 1 here", param="n")
    if route == openai.CHAT or (route == NATIVE and "messages" in value):
        ids = chat.chat_ids(_messages(value.get("messages"), settings))
    else:
        prompt = value.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise openai.OpenAIError(400, "invalid_prompt", "`prompt` must be a non-empty string", param="prompt")
        if len(prompt) > settings.max_body_chars:
            raise openai.OpenAIError(413, "prompt_too_long", f"`prompt` is over {settings.max_body_chars} characters",
                                     param="prompt")
        ids = chat.encode(prompt)
    if len(ids) > settings.max_prompt_tokens:
        raise openai.OpenAIError(400, "context_length_exceeded", f"the prompt is {len(ids)} tokens; this model takes "
                                 f"at most {settings.max_prompt_tokens} (handler.max_prompt_tokens)",
                                 param="messages" if route == openai.CHAT else "prompt")
    key = "max_completion_tokens" if value.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = value.get(key)
    if max_tokens is None:
        max_tokens = settings.default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= settings.max_new_tokens:
        raise openai.OpenAIError(400, "invalid_value", f"`{key}` must be an integer in [1, {settings.max_new_tokens}]",
                                 param=key)
    seed = value.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**64):
        raise openai.OpenAIError(400, "invalid_value", "`seed` must be an integer", param="seed")
    sampling = Sampling(max_tokens=max_tokens, temperature=_number(value, "temperature", 0.0, 2.0, 1.0),
                        top_p=_number(value, "top_p", 0.0, 1.0, 1.0), seed=seed,
                        stop=_stop(value.get("stop"), settings))
    if sampling.top_p == 0.0:
        raise openai.OpenAIError(400, "invalid_value", "`top_p` must be above 0", param="top_p")
    stream = value.get("stream", route == NATIVE)
    options = value.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise openai.OpenAIError(400, "invalid_value", "`stream` must be true or false, `stream_options` an object",
                                 param="stream")
    ignore_eos = value.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise openai.OpenAIError(400, "invalid_value", "`ignore_eos` must be true or false", param="ignore_eos")
    return Ask(route, ids, sampling, stream, include_usage=bool(options.get("include_usage", False)),
               ignore_eos=ignore_eos)


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """One token from one row of logits: the argmax at temperature 0, else from softmax(logits / temperature)
    cut to the smallest set of tokens whose probability reaches top_p."""
    if sampling.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(ordered, dim=-1) - ordered < sampling.top_p  # the first token is always kept
        probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class Timeline:
    """One request's way through the scheduler, for its trace (handlers/tracing.py reads it; times in ns since the
    epoch): when it was read (decoded, templated, tokenized), its prefill with the prompts prefilled beside it, its
    decode steps from the first to the last with the most sequences stepped together, and how it ended."""

    request_id: str
    headers: Mapping[str, Any]
    read: tuple[int, int]
    prefill: tuple[int, int] | None = None
    prefill_batch: int = 0
    decode: tuple[int, int] | None = None
    decode_batch: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    status: int = 200
    ended: int = 0


@dataclass
class Sequence_:
    """A running request: its cache slot, tokens, text sent so far and how it answers."""

    ask: Ask
    slot: int
    completion: openai.Completion | None
    generator: torch.Generator | None
    deadline: float
    generated: list[int] = field(default_factory=list)
    admitted: float = field(default_factory=time.monotonic)
    sent_chars: int = 0
    started: bool = False  # a first chunk went out (the OpenAI chat stream's role delta)
    finish_reason: str | None = None
    text: str = ""  # the answer's text once finished
    timeline: Timeline | None = None

    @property
    def position(self) -> int:
        return len(self.ask.prompt_ids) + len(self.generated)

    def usage(self) -> dict[str, int]:
        prompt, completion = len(self.ask.prompt_ids), len(self.generated)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


ACTIVE_SEQUENCES = "GenerationActiveSequences"
CLIENT_CLOSED = 499  # a sequence dropped because its client went away (nginx's name for it), in its trace alone


@dataclass
class Figures:
    """What the scheduler did between two publishes: counters, so a reader takes differences between scrapes
    (time to first token = GenerationFirstTokenMs / GenerationFirstTokens; inter-token latency =
    GenerationInterTokenMs / GenerationDecodedTokens). The time a request waited in the frontend's queue before
    its prefill is TorchServe's own QueueTime."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    first_tokens: int = 0
    first_token_ms: float = 0.0
    decoded_tokens: int = 0
    inter_token_ms: float = 0.0
    steps: int = 0
    step_ms: float = 0.0

    def counters(self) -> dict[str, float]:
        return {"GenerationPromptTokens": self.prompt_tokens, "GenerationTokens": self.generated_tokens,
                "GenerationFirstTokens": self.first_tokens, "GenerationFirstTokenMs": round(self.first_token_ms, 3),
                "GenerationDecodedTokens": self.decoded_tokens,
                "GenerationInterTokenMs": round(self.inter_token_ms, 3), "GenerationSteps": self.steps,
                "GenerationStepMs": round(self.step_ms, 3)}


@dataclass
class Chunk:
    body: bytes
    more: bool  # whether more chunks follow
    status: int = 200
    content_type: str = "application/json"
    first: bool = False  # the request's first chunk (a first that is also the last is a whole answer)


class Scheduler:
    """The worker's running sequences over one KV cache of `slots` slots: continuous batching."""

    def __init__(self, decoder: Callable[..., torch.Tensor], config: LlamaConfig, chat: ChatFormat,
                 settings: Settings, *, slots: int, model_name: str, device: torch.device | str = "cpu") -> None:
        """`decoder`: models.llama's forward pass, eager, exported or compiled (models.chat.load_decoder)."""
        self.decoder, self.chat, self.settings, self.model_name = decoder, chat, settings, model_name
        self.device = torch.device(device)
        length = min(settings.max_prompt_tokens + settings.max_new_tokens, config.max_positions) + 1
        self.cache = KVCache(config, slots, length, device=self.device)
        self.free = list(range(slots))
        self.running: dict[str, Sequence_] = {}
        self.stats = {"prefill_tokens": 0, "decode_steps": 0, "evicted": 0}
        self.pending = Figures()  # since the last publish
        self.finished: list[Timeline] = []  # the requests answered in full since the last `ended()`

    def warm_up(self) -> None:
        """A short greedy answer through prefill and decode, so a first request pays no one-off costs."""
        ask = {"body": json.dumps({"prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": False}).encode()}
        headers = {"Content-Type": "application/json"}
        chunks = self.serve([("warm-up", ask, headers)])
        while chunks[0].more:
            chunks = self.serve([("warm-up", {}, headers)])
        if chunks[0].status != 200:
            raise RuntimeError(f"the warm-up prompt was refused: {chunks[0].body[:300]!r}")
        self.pending = Figures()
        self.ended()

    def ended(self) -> list[Timeline]:
        """The timelines of the requests answered in full (or dropped by their client) since the last call."""
        finished, self.finished = self.finished, []
        return finished

    def publish(self, metrics) -> None:
        """The figures since the last call into TorchServe's metrics (counters, and the running sequences as a
        gauge); `metrics` is context.metrics (None outside a worker)."""
        figures, self.pending = self.pending, Figures()
        if metrics is None:
            return
        from ts.metrics.metric_type_enum import MetricTypes

        for name, value in figures.counters().items():
            metrics.add_counter(name, value)
        metrics.add_metric(ACTIVE_SEQUENCES, len(self.running), "count", metric_type=MetricTypes.GAUGE)

    # ---- one call of the aggregator --------------------------------------------------------------------------
    def serve(self, requests: Sequence[tuple[str, Mapping[str, Any], Mapping[str, Any]]]) -> list[Chunk]:
        """One chunk per request, in order. `requests`: (request id, input parameters, headers); a request already
        running comes with no parameters."""
        present = {rid for rid, _, _ in requests}
        for rid in [r for r in self.running if r not in present]:
            self._end(self.running[rid], CLIENT_CLOSED)
            self.evict(rid)  # its client went away: the frontend stopped sending it
        answers: dict[str, Chunk] = {}
        stepping = [rid for rid in present if rid in self.running]
        admitted: list[tuple[str, Sequence_]] = []
        timelines = {rid: self.running[rid].timeline for rid in stepping}
        for rid, params, headers in requests:
            if rid in self.running or rid in answers:
                continue
            started = time.time_ns()
            outcome = self._admit(rid, params, headers)
            timelines[rid] = Timeline(request_id(headers, rid), headers, (started, time.time_ns()))
            if isinstance(outcome, Chunk):
                answers[rid] = outcome
            else:
                outcome.timeline = timelines[rid]
                admitted.append((rid, outcome))
        answers.update(self._prefill(admitted))
        for rid in answers:  # so far, only this call's new requests
            answers[rid].first = True
        if stepping:
            answers.update(self._decode(stepping))
        for rid, chunk in answers.items():
            if not chunk.more:
                timeline = timelines.get(rid)
                if timeline is not None:
                    timeline.status, timeline.ended = chunk.status, time.time_ns()
                    self.finished.append(timeline)
        return [answers[rid] for rid, _, _ in requests]

    def _end(self, seq: Sequence_, status: int) -> None:
        """A running sequence's timeline, ended without an answer of its own (its client went away)."""
        if seq.timeline is not None:
            seq.timeline.status, seq.timeline.ended = status, time.time_ns()
            self.finished.append(seq.timeline)

    def evict(self, rid: str) -> None:
        seq = self.running.pop(rid, None)
        if seq is not None:
            self.free.append(seq.slot)
            self.stats["evicted"] += 1

    # ---- admission and prefill --------------------------------------------------------------------------------
    def _admit(self, rid: str, params: Mapping[str, Any], headers: Mapping[str, Any]) -> "Sequence_ | Chunk":
        """A new request's running sequence in a free slot, or its refusal (a whole answer)."""
        route = openai.route_of(headers) or NATIVE
        if (late := expired(headers, time.time() * 1000.0)) is not None:  # its deadline passed in the queue
            return self._refuse(route, late)
        content_type = content_type_of(params.get("body") if isinstance(params.get("body"), dict) else headers)
        if not content_type:
            content_type = content_type_of(headers)
        try:
            ask = parse(route, request_body(params, content_type), content_type, self.chat, self.settings)
        except RequestError as err:
            return self._refuse(route, err)
        except Exception:  # noqa: BLE001 - a bug costs this request a 500, never its neighbours
            logger.exception("request %s could not be parsed", rid)
            return self._refuse(route, RequestError(500, "InternalError", "the request could not be processed"))
        if not self.free:  # the frontend sends at most batchSize at once; a slot is always free then
            return self._refuse(route, RequestError(503, "ServerBusy", "every sequence slot of this worker is in use"))
        generator = None
        if ask.sampling.temperature > 0:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(ask.sampling.seed % 2**64 if ask.sampling.seed is not None
                                  else int.from_bytes(os.urandom(8), "little"))
        completion = openai.Completion(route, self.model_name) if route != NATIVE else None
        seq = Sequence_(ask, self.free.pop(), completion, generator, time.monotonic() + self.settings.deadline_s)
        self.running[rid] = seq
        return seq

    def _prefill(self, new: list[tuple[str, "Sequence_"]]) -> dict[str, Chunk]:
        """The prompts of the sequences admitted in this call, in one forward pass (each row padded on the right to
        the longest; padded positions write nowhere that is read), and each one's first token."""
        if not new:
            return {}
        longest = max(len(seq.ask.prompt_ids) for _, seq in new)
        tokens = torch.zeros((len(new), longest), dtype=torch.long)
        positions = torch.full((len(new), longest), -1, dtype=torch.long)
        for row, (_, seq) in enumerate(new):
            count = len(seq.ask.prompt_ids)
            tokens[row, :count] = torch.tensor(seq.ask.prompt_ids)
            positions[row, :count] = torch.arange(count)
        last = torch.tensor([len(seq.ask.prompt_ids) - 1 for _, seq in new], device=self.device)
        slots = torch.tensor([seq.slot for _, seq in new], device=self.device)
        started = time.time_ns()
        try:
            with torch.inference_mode():
                logits = self.decoder(*step_inputs(tokens.to(self.device), positions.to(self.device), slots,
                                                   self.cache, last))
        except Exception as err:  # noqa: BLE001
            logger.exception("prefill of %d prompts failed", len(new))
            message = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            answers = {}
            for rid, seq in new:
                self.evict(rid)
                answers[rid] = self._refuse(seq.ask.route, RequestError(
                    422, "ModelRejectedInput", f"the model cannot run this prompt: {message}"))
            return answers
        answers = {}
        done = time.time_ns()
        for row, (rid, seq) in enumerate(new):
            if seq.timeline is not None:
                seq.timeline.prefill, seq.timeline.prefill_batch = (started, done), len(new)
                seq.timeline.prompt_tokens = len(seq.ask.prompt_ids)
            self.stats["prefill_tokens"] += len(seq.ask.prompt_ids)
            self.pending.prompt_tokens += len(seq.ask.prompt_ids)
            self.pending.first_tokens += 1
            self.pending.first_token_ms += (time.monotonic() - seq.admitted) * 1000.0
            answers[rid] = self._advance(rid, seq, logits[row])
        return answers

    def _refuse(self, route: str, err: RequestError) -> Chunk:
        """A whole answer with the error, in the route's form (OpenAI's error object, or this project's)."""
        err = openai.OpenAIError.of(err) if route != NATIVE else RequestError(err.status, err.kind, err.message)
        return Chunk(err.body().encode(), more=False, status=err.status)

    # ---- decoding ---------------------------------------------------------------------------------------------
    def _decode(self, rids: list[str]) -> dict[str, Chunk]:
        seqs = [self.running[r] for r in rids]
        start, started = time.monotonic(), time.time_ns()
        with torch.inference_mode():
            tokens = torch.tensor([[s.generated[-1]] for s in seqs], device=self.device)
            positions = torch.tensor([[s.position - 1] for s in seqs], device=self.device)
            slots = torch.tensor([s.slot for s in seqs], device=self.device)
            logits = self.decoder(*step_inputs(tokens, positions, slots, self.cache))
        self.stats["decode_steps"] += 1
        step_ms = (time.monotonic() - start) * 1000.0
        self.pending.steps += 1
        self.pending.step_ms += step_ms
        self.pending.inter_token_ms += step_ms * len(seqs)
        self.pending.decoded_tokens += len(seqs)
        done = time.time_ns()
        for seq in seqs:
            if seq.timeline is not None:
                seq.timeline.decode = (seq.timeline.decode or (started, done))[0], done
                seq.timeline.decode_batch = max(seq.timeline.decode_batch, len(seqs))
        return {rid: self._advance(rid, seq, logits[i]) for i, (rid, seq) in enumerate(zip(rids, seqs))}

    def _advance(self, rid: str, seq: Sequence_, logits: torch.Tensor) -> Chunk:
        """Sample the next token of `seq`, and the chunk of text it makes sendable."""
        token = sample(logits, seq.ask.sampling, seq.generator)
        seq.generated.append(token)
        if seq.timeline is not None:
            seq.timeline.generated_tokens = len(seq.generated)
        self.pending.generated_tokens += 1
        ended = token in self.chat.stop_token_ids and not seq.ask.ignore_eos
        ids = seq.generated[:-1] if ended else seq.generated
        text = self.chat.decode(ids)
        cut = _first_stop(text, seq.ask.sampling.stop)
        if cut is not None:
            text, seq.finish_reason = text[:cut], "stop"
        elif ended:
            seq.finish_reason = "stop"
        elif len(seq.generated) >= seq.ask.sampling.max_tokens or seq.position >= self.cache.length - 1:
            seq.finish_reason = "length"
        elif time.monotonic() > seq.deadline:
            self.evict(rid)
            err = RequestError(504, "DeadlineExceeded", f"the answer took over {self.settings.deadline_s} s "
                               "(handler.deadline_s)")
            return self._fail(seq, err)
        if seq.finish_reason is None:
            # hold back what a stop string could still begin with, and a character whose bytes are not all there
            hold = max((len(s) - 1 for s in seq.ask.sampling.stop), default=0)
            sendable = len(text) - hold
            while sendable > seq.sent_chars and text[sendable - 1] == "\ufffd":
                sendable -= 1
            piece = text[seq.sent_chars:max(sendable, seq.sent_chars)]
            seq.sent_chars += len(piece)
            return self._chunk(seq, piece, more=True)
        self.evict(rid)
        seq.text = text
        return self._chunk(seq, text[seq.sent_chars:], more=False)

    def _chunk(self, seq: Sequence_, piece: str, *, more: bool) -> Chunk:
        ask, completion = seq.ask, seq.completion
        if not ask.stream:
            if more:
                return Chunk(b"", more=True)
            if completion is None:
                return Chunk(json.dumps({"text": seq.text, "finish_reason": seq.finish_reason,
                                         "usage": seq.usage()}).encode(), more=False)
            return Chunk(completion.whole(seq.text, seq.finish_reason, seq.usage()).encode(), more=False)
        if completion is None:  # native: JSON lines
            line: dict[str, Any] = {"text": piece}
            if not more:
                line.update(finish_reason=seq.finish_reason, usage=seq.usage())
            elif not piece:
                return Chunk(b"", more=True, content_type="application/jsonl")
            return Chunk(json.dumps(line).encode() + b"\n", more=more, content_type="application/jsonl")
        body = b""
        first = not seq.started
        seq.started = True
        if first or piece:
            body += completion.chunk(piece, first=first)
        if not more:
            body += completion.chunk(None if completion.route == openai.CHAT else "", seq.finish_reason)
            if ask.include_usage:
                body += completion.usage_chunk(seq.usage())
            body += openai.DONE
        return Chunk(body, more=more, content_type=openai.SSE_CONTENT_TYPE)

    def _fail(self, seq: Sequence_, err: RequestError) -> Chunk:
        if seq.completion is not None and seq.ask.stream:
            return Chunk(seq.completion.error_event(err), more=False, content_type=openai.SSE_CONTENT_TYPE)
        if seq.ask.stream:
            return Chunk(json.dumps({"error": err.message, "type": err.kind}).encode() + b"\n", more=False,
                         content_type="application/jsonl")
        body = openai.OpenAIError.of(err).body() if seq.completion is not None else err.body()
        return Chunk(body.encode(), more=False)


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string begins in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def signature(export_manifest: dict, settings: Settings) -> dict:
    """What the model takes and gives: a prompt in, text out, and the OpenAI routes it speaks (the frontend's
    OpenAiRoutes reads "openai")."""
    return {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1]}],
            "outputs": [{"name": "text", "datatype": "BYTES", "shape": [1]}],
            "openai": [openai.CHAT, openai.COMPLETIONS]}


def build(model_dir: Path, settings: Settings, *, served_as: tuple[str, str], max_batch: int,
          device: torch.device | str = "cpu") -> Scheduler:
    """The kind's scheduler for a model folder's decoder (its settings' backend): `max_batch` sequences at once."""
    from models import chat

    decoder, config, runs_on = chat.load_decoder(Path(model_dir), settings.backend, device)
    return Scheduler(decoder, config, ChatFormat(Path(model_dir)), settings, slots=max_batch,
                     model_name=served_as[0], device=runs_on)
