"""Keys and readiness of a running instance: its workers, its readiness (probe.py's), key rotation."""

from __future__ import annotations

from typing import Sequence

import requests

from serve_config.control import probe
from serve_config.control.instance import Server, ServerError


def model_workers(server: Server, model: str, headers: dict[str, str] | None = None, *,
                  timeout: float = 10.0) -> tuple[list[dict], int]:
    """`model`'s workers as the management API lists them ([] when it answers an error), and its status code."""
    with server.network():
        answer = requests.get(f"{server.management_url}/models/{model}",
                              headers=headers if headers is not None else server.headers("management"), timeout=timeout)
    return (answer.json()[0].get("workers", []) if answer.ok else []), answer.status_code


def ready(server: Server, models: Sequence[str] | None = None, *, version: str | None = None,
          timeout: float = 5.0) -> tuple[bool, str]:
    """Whether `server` is ready (serve_config/control/probe.py: the one readiness), for `models` (default: every
    served one) or one model's `version`: (ok, one line saying why)."""
    try:
        with server.network():
            return True, probe.check(server.inference_url, server.keys()["inference"], models or (), version=version,
                                     timeout=timeout)
    except (probe.ProbeError, ServerError, OSError, ValueError, KeyError) as err:
        return False, f"not ready: {err}"


def rotate_token(server: Server, kind: str = "inference") -> str:
    """Replace the `kind` key through TorchServe's token API (authorised by the API key); the old key stops
    working at once and key_file.json holds the new one, which is returned."""
    if kind not in ("inference", "management"):
        raise ServerError(f"kind must be inference or management, got {kind!r}")
    old = server.keys()[kind]
    with server.network():
        answer = requests.get(f"{server.management_url}/token", params={"type": kind}, timeout=10,
                              headers={"Authorization": f"Bearer {server.keys()['api']}"})
    if not answer.ok:
        raise ServerError(f"token API answered {answer.status_code}: {answer.text.strip()[:200]}")
    new = server.keys()[kind]
    if new == old:
        raise ServerError(f"the {kind} key did not change")
    return new
