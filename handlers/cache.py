"""The response cache: a worker's answers to requests it has already answered, for models whose answer is a function
of the request alone (a classifier, an embedder, a tensor model that says so). Nothing here knows about TorchServe.

A model turns it on with `response_cache_mb` in the `handler:` section of its model-config YAML (0, the default,
is off; as in Triton, where a model opts in). Each worker keeps its own cache, an LRU bounded in bytes (the answers'
and the keys'), so a model with two workers may compute a request once per worker. The key is a digest of
everything the pipeline reads of a request: the model's name and version, the body's media type and
Inference-Header-Content-Length, and every request field (the body, query parameters, the OpenAI route), so a new
version, which runs in workers of its own, never answers from an old version's entries, and two requests share an
entry only when the pipeline could not tell them apart. Only successful answers are kept.

A client says how to use it with Cache-Control (or HTTP/1.0's `Pragma: no-cache`): `no-cache` computes the answer
again and keeps it, `no-store` computes it and keeps nothing. Each answer of such a model says X-Cache: HIT, MISS
or BYPASS.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Mapping

from handlers.requests import header

if TYPE_CHECKING:
    from handlers.oip import BinaryAnswer

STATUS_HEADER = "X-Cache"
ENTRY_OVERHEAD = 128  # bytes an entry costs beside its key and answer (the dict's slot, the objects' headers)


class Use(Enum):
    """What a request lets the cache do, by its Cache-Control."""

    READ = "read"  # answer from the cache when it can; keep a computed answer
    REFRESH = "refresh"  # compute, and keep the answer (no-cache)
    NONE = "none"  # compute, keep nothing (no-store)


def use_of(headers: Mapping[str, Any] | None) -> Use:
    """What a request's Cache-Control (or Pragma) lets the cache do."""
    directives = {token.split("=", 1)[0].strip().lower()
                  for token in (header(headers, "cache-control") or "").split(",")}
    if "no-store" in directives:
        return Use.NONE
    if "no-cache" in directives or "no-cache" in (header(headers, "pragma") or "").lower():
        return Use.REFRESH
    return Use.READ


def _feed(digest, tag: bytes, data: bytes) -> None:
    digest.update(tag + len(data).to_bytes(8, "little") + data)


def key_of(served_as: tuple[str, str], request: Mapping[str, Any] | None, content_type: str,
           header_length: int | None) -> bytes | None:
    """The cache key of a request as the pipeline reads it (a sha256 of each part, each with its length), or None
    when a field holds a value with no canonical form (the request is then computed and not kept)."""
    digest = hashlib.sha256()
    for part in (*served_as, content_type, str(header_length)):
        _feed(digest, b"p", part.encode())
    for name in sorted(request or {}):
        value = request[name]
        _feed(digest, b"n", str(name).encode())
        if isinstance(value, (bytes, bytearray)):
            _feed(digest, b"b", bytes(value))
        elif isinstance(value, str):
            _feed(digest, b"s", value.encode("utf-8", "surrogatepass"))
        else:  # a body TorchServe parsed as JSON: its canonical text (an object's key order says nothing)
            try:
                text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
            except (TypeError, ValueError, RecursionError):
                return None
            _feed(digest, b"j", text.encode())
    return digest.digest()


def answer_bytes(answer: "str | BinaryAnswer") -> int:
    """What an answer costs the cache: its body's bytes (a JSON answer of ours is ASCII: json.dumps escapes the
    rest)."""
    return len(answer) if isinstance(answer, str) else len(answer.body)


@dataclass
class Counts:
    """What one batch did with the cache, for the metrics (handlers.batch_metrics)."""

    hits: int = 0
    misses: int = 0
    bypassed: int = 0
    evicted: int = 0


class ResponseCache:
    """An LRU of answers by key, at most `max_bytes` in all (an answer bigger than a quarter of it is not kept)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("a response cache needs a positive size")
        self.max_bytes, self.bytes = max_bytes, 0
        self._entries: OrderedDict[bytes, "str | BinaryAnswer"] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _cost(key: bytes, answer: "str | BinaryAnswer") -> int:
        return len(key) + answer_bytes(answer) + ENTRY_OVERHEAD

    def get(self, key: bytes) -> "str | BinaryAnswer | None":
        answer = self._entries.get(key)
        if answer is not None:
            self._entries.move_to_end(key)
        return answer

    def put(self, key: bytes, answer: "str | BinaryAnswer") -> int:
        """Keep an answer (replacing the key's older one); the number of entries evicted to make room."""
        cost = self._cost(key, answer)
        if cost > self.max_bytes // 4:
            return 0
        if (old := self._entries.pop(key, None)) is not None:
            self.bytes -= self._cost(key, old)
        self._entries[key] = answer
        self.bytes += cost
        evicted = 0
        while self.bytes > self.max_bytes:
            old_key, old_answer = self._entries.popitem(last=False)
            self.bytes -= self._cost(old_key, old_answer)
            evicted += 1
        return evicted
