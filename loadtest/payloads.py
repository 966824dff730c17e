"""Real request payloads for a registered model, shared by `make predict`, Locust and the tests."""

from __future__ import annotations

import mimetypes
from dataclasses import dataclass

from models import registry


@dataclass(frozen=True)
class Payload:
    body: bytes
    content_type: str
    label: int
    name: str


def payloads(model: str, count: int) -> list[Payload]:
    """`count` real inputs for `model` from its registry `samples` function, each with its media type."""
    spec = registry.get(model)
    if spec.samples is None:
        raise SystemExit(f"{model}: the registry entry names no `samples` function to build request payloads from")
    return [
        Payload(body, mimetypes.guess_type(name)[0] or "application/octet-stream", label, name)
        for body, label, name in registry.resolve(spec.samples)(count)
    ]
