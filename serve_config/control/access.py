"""Keys and readiness of a running instance: which workers are READY, the readiness probe, key rotation."""

from __future__ import annotations

from typing import Sequence

import requests

from serve_config.control.instance import Server, ServerError


def model_workers(server: Server, model: str, headers: dict[str, str] | None = None, *,
                  timeout: float = 10.0) -> tuple[list[dict], int]:
    """`model`'s workers as the management API lists them ([] when it answers an error), and its status code."""
    with server.network():
        answer = requests.get(f"{server.management_url}/models/{model}",
                              headers=headers if headers is not None else server.headers("management"), timeout=timeout)
    return (answer.json()[0].get("workers", []) if answer.ok else []), answer.status_code


def has_ready_worker(server: Server, model: str, headers: dict[str, str]) -> tuple[bool, int]:
    """Whether the management API lists a READY worker for `model`, and the status code it answered."""
    workers, status = model_workers(server, model, headers, timeout=5)
    return any(w.get("status") == "READY" for w in workers), status


def ready(server: Server, models: Sequence[str] | None = None) -> tuple[bool, str]:
    """Readiness for probes: /ping (with the inference key, which TorchServe requires) is Healthy and each
    model (default: every registered one) has a READY worker. (ok, one line saying why)."""
    try:
        with server.network():
            ping = requests.get(f"{server.inference_url}/ping", headers=server.headers(), timeout=5)
        if not ping.ok or ping.json().get("status") != "Healthy":
            return False, f"/ping answered {ping.status_code} {ping.text.strip()[:100]}"
        mgmt = server.headers("management")
        if models is None:
            with server.network():
                listed = requests.get(f"{server.management_url}/models", headers=mgmt, timeout=5).json()["models"]
            models = [m["modelName"] for m in listed]
        for name in models:
            ok, status = has_ready_worker(server, name, mgmt)
            if not ok:
                return False, f"{name}: no READY worker ({status})"
        return True, f"ready: {', '.join(models)}"
    except (ServerError, requests.RequestException, ValueError, KeyError, IndexError) as err:
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
