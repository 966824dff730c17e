"""The OpenAI API's request and answer shapes, for any kind that speaks it: chat completions and completions (the
generate kind) and embeddings (the text-embedding kind). Nothing here knows about TorchServe.

The frontend (handlers/frontend: org.servemodels.oip.OpenAiRoutes) answers `GET /v1/models` itself and hands
`POST /v1/chat/completions`, `/v1/completions` and `/v1/embeddings` to the model the body names, as that model's
prediction, with the header ROUTE_HEADER naming the route; a kind reads the route from it and answers in the
shapes below. Errors are OpenAI's error object, `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from handlers.requests import RequestError, header

ROUTE_HEADER = "x-openai-route"
CHAT, COMPLETIONS, EMBEDDINGS = "chat.completions", "completions", "embeddings"
ROUTES = (CHAT, COMPLETIONS, EMBEDDINGS)
SSE_CONTENT_TYPE = "text/event-stream"
DONE = b"data: [DONE]\n\n"
# OpenAI's error types by status
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               408: "timeout_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error", 504: "timeout_error"}


def route_of(headers: Mapping[str, Any] | None) -> str | None:
    """The OpenAI route a request came in on (the frontend's header), or None for any other route."""
    route = header(headers, ROUTE_HEADER)
    return route if route in ROUTES else None


ROUTE_KEY = "openai-route"  # where the adapter puts a request's route beside its body (tag_routes)


def tag_routes(requests: list, headers: list) -> list:
    """The requests, each that came in on an OpenAI route with its route under ROUTE_KEY beside its body (a
    copy), for a pipeline that reads requests and not headers."""
    return [dict(request or {}, **{ROUTE_KEY: route}) if (route := route_of(header)) else request
            for request, header in zip(requests, headers, strict=True)]


class OpenAIError(RequestError):
    """A RequestError whose body is OpenAI's error object; `param` names the field at fault."""

    def __init__(self, status: int, kind: str, message: str, *, param: str | None = None) -> None:
        super().__init__(status, kind, message)
        self.param = param

    @classmethod
    def of(cls, err: RequestError, param: str | None = None) -> "OpenAIError":
        return err if isinstance(err, OpenAIError) else cls(err.status, err.kind, err.message,
                                                             param=param or getattr(err, "param", None))

    def body(self) -> str:
        return json.dumps({"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                                     "param": self.param, "code": self.kind}})


def sse(payload: Mapping[str, Any]) -> bytes:
    """One Server-Sent Event carrying a JSON object."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


@dataclass
class Completion:
    """The identity every chunk of one answer repeats."""

    route: str
    model: str
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if self.route == CHAT and not self.id.startswith("chatcmpl-"):
            self.id = "chat" + self.id

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, text: str | None, finish_reason: str | None = None, *, first: bool = False) -> bytes:
        """A streamed chunk: the new text (`first`: the chat delta also names the role)."""
        if self.route == CHAT:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return sse({**self._head("chat.completion.chunk"), "choices": [choice]})
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return sse({**self._head("text_completion"), "choices": [choice]})

    def usage_chunk(self, usage: dict[str, int]) -> bytes:
        obj = "chat.completion.chunk" if self.route == CHAT else "text_completion"
        return sse({**self._head(obj), "choices": [], "usage": usage})

    def whole(self, text: str, finish_reason: str, usage: dict[str, int]) -> str:
        """The answer of a request that did not stream."""
        if self.route == CHAT:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            return json.dumps({**self._head("chat.completion"), "choices": [choice], "usage": usage})
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return json.dumps({**self._head("text_completion"), "choices": [choice], "usage": usage})

    def error_event(self, err: RequestError) -> bytes:
        """An error inside a stream that already started: an event with OpenAI's error object, then [DONE]."""
        return b"data: " + OpenAIError.of(err).body().encode() + b"\n\n" + DONE


def embedding_inputs(body: Any, *, max_inputs: int) -> tuple[list[str], str]:
    """(texts, encoding format) of an embeddings request: `input` a string or a list of strings (token-id arrays are
    not taken: say so), `encoding_format` float (default) or base64."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "invalid_request", "the body must be a JSON object with `model` and `input`")
    value = body.get("input")
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        texts = value
    elif isinstance(value, list) and value and all(isinstance(v, (int, list)) for v in value):
        raise OpenAIError(400, "invalid_request", "`input` as token ids is not supported here: send strings",
                          param="input")
    else:
        raise OpenAIError(400, "invalid_request", "`input` must be a non-empty string or a non-empty list of strings",
                          param="input")
    if len(texts) > max_inputs:
        raise OpenAIError(400, "invalid_request", f"`input` has {len(texts)} strings; at most {max_inputs}",
                          param="input")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise OpenAIError(400, "invalid_request", "`encoding_format` must be 'float' or 'base64'",
                          param="encoding_format")
    if body.get("dimensions") is not None:
        raise OpenAIError(400, "invalid_request", "`dimensions` is not supported by this model", param="dimensions")
    return texts, fmt


def embeddings_answer(model: str, vectors: np.ndarray, tokens: list[int], encoding_format: str) -> str:
    """The answer of an embeddings request: one object per input, in order, and the tokens read."""
    data = []
    for index, row in enumerate(np.asarray(vectors, dtype=np.float32)):
        value: Any = (base64.b64encode(row.astype("<f4").tobytes()).decode() if encoding_format == "base64"
                      else [float(x) for x in row])
        data.append({"object": "embedding", "index": index, "embedding": value})
    total = int(sum(tokens))
    return json.dumps({"object": "list", "data": data, "model": model,
                       "usage": {"prompt_tokens": total, "total_tokens": total}})
