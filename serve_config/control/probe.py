"""Readiness, defined once: every caller of "is this TorchServe ready?" asks it here, or asks the same route.

Ready means the server's own OIP readiness route answers 200. The route is the frontend plugin's
(handlers/frontend/org/servemodels/oip/OpenInferenceEndpoint.java), so the definition lives in the server:
    GET /v2/health/ready                     every served model's default version has a worker that loaded it,
                                             and at least one model is served
    GET /v2/models/<m>[/versions/<v>]/ready  that model (version) has such a worker
`/ping` alone is not readiness: TorchServe answers Healthy before any worker has loaded.

Who asks (`check`):
- `make ready`, and `start` while it waits for its models (serve_config.control.access.ready, wait_ready);
- rollout, before a new version becomes the default (serve_config.rollout);
- the container's HEALTHCHECK and the Kubernetes / KServe exec probes: this file run as a script, copied into the
  image as /opt/serve/probe.py (serve_config/cluster/image.py), so it needs the standard library only;
- HAProxy's health check of each fleet replica asks the same route itself (serve_config/fleet/haproxy.cfg).

As a script:
    probe.py live              exit 0 when the frontend answers HTTP on its inference address
    probe.py ready [MODEL ...] exit 0 when not draining and the readiness route answers 200 (for these models)

The script reads the server's own config.properties (TS_CONFIG_FILE), with TS_* environment variables taking
precedence where the config enables them (enable_envvars_config=true), so it follows whatever addresses the
server really uses. Addresses bound to 0.0.0.0 are probed on 127.0.0.1. Where token authorization is on, the key
comes from key_file.json in the working directory (TorchServe writes it to its own), or TS_KEY_FILE; where it is
off (the default of the image: clients authenticate at the gateway), no key is sent. One line of output: it runs
every few seconds in each pod.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

DRAIN_FILE = Path(os.environ.get("TS_DRAIN_FILE", "/tmp/torchserve.draining"))
DEFAULTS = {"inference_address": "http://127.0.0.1:8080", "management_address": "http://127.0.0.1:8081",
            "disable_token_authorization": "false", "enable_envvars_config": "false"}


class ProbeError(Exception):
    """Not ready (or not live), with the one line that says why; `silent` when the server took the connection and
    gave no answer in time (hung), rather than refusing it (not listening)."""

    def __init__(self, message: str, *, silent: bool = False) -> None:
        super().__init__(message)
        self.silent = silent


def settings(config: Path | None) -> dict[str, str]:
    """The config file's settings over TorchServe's defaults, then TS_<KEY> variables where enabled."""
    values = dict(DEFAULTS)
    if config is not None:
        for line in config.read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                key, value = line.split("=", 1)
                values[key.strip()] = value.strip()
    if values["enable_envvars_config"].lower() == "true":
        for key in list(values):
            values[key] = os.environ.get(f"TS_{key.upper()}", values[key])
    return values


def local(address: str) -> str:
    return address.rstrip("/").replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://[::1]:")


def key(values: dict[str, str], kind: str) -> str | None:
    if values["disable_token_authorization"].lower() == "true":
        return None
    path = Path(os.environ.get("TS_KEY_FILE", "key_file.json"))
    try:
        return json.loads(path.read_text())[kind]["key"]
    except (OSError, ValueError, KeyError) as err:
        raise ProbeError(f"token authorization is on and no {kind} key could be read from {path.resolve()}: {err}")


def get(url: str, token: str | None, timeout: float) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ProbeError(f"{url}: {reason}", silent=isinstance(reason, TimeoutError))


def live(values: dict[str, str], timeout: float) -> str:
    status, _ = get(local(values["inference_address"]) + "/ping", key(values, "inference"), timeout)
    return f"alive: /ping answered {status}"


def check(inference_url: str, token: str | None, models: Sequence[str] = (), *, version: str | None = None,
          timeout: float = 4.0) -> str:
    """The readiness of the server at `inference_url`: the line that says it is ready, or ProbeError with the one
    that says why not. `models` (default: every served model) and `version` (of the one model named) narrow it."""
    base = inference_url.rstrip("/")
    if version is not None and len(models) != 1:
        raise ValueError("a version is asked of exactly one model")
    if not models:
        status, body = get(f"{base}/v2/health/ready", token, timeout)
        detail = _json(body)
        served = detail.get("models", {}) if isinstance(detail, dict) else {}  # {model: ready}
        if status != 200:
            waiting = sorted(name for name, ok in served.items() if not ok)
            building = detail.get("building", []) if isinstance(detail, dict) else []
            why = (f"no loaded worker for {', '.join(waiting)}" if waiting else
                   f"still building {', '.join(building)}" if building else "no model is served" if status == 503
                   else body[:200].decode(errors="replace"))
            raise ProbeError(f"/v2/health/ready answered {status}: {why}")
        return f"ready: {', '.join(sorted(served))}"
    for name in models:
        route = f"/v2/models/{quote(name, safe='')}" + (f"/versions/{quote(version, safe='')}" if version else "")
        status, body = get(f"{base}{route}/ready", token, timeout)
        if status != 200:
            what = f"{name} version {version}" if version else name
            raise ProbeError(f"{what}: {route}/ready answered {status}"
                             + (" (no worker has loaded it)" if status == 503 else f" {body[:200]!r}"))
    return f"ready: {', '.join(models)}" + (f" version {version}" if version else "")


def _json(body: bytes) -> object:
    try:
        return json.loads(body)
    except ValueError:
        return None


def ready(values: dict[str, str], models: list[str], timeout: float) -> str:
    """The script's readiness: not draining, and `check` on the configured inference address."""
    if DRAIN_FILE.exists():
        raise ProbeError(f"draining since {DRAIN_FILE} was written (the container is stopping)")
    return check(local(values["inference_address"]), key(values, "inference"), models, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=("live", "ready"))
    parser.add_argument("models", nargs="*", help="ready: these models only (default: every served one)")
    parser.add_argument("--config", type=Path, default=os.environ.get("TS_CONFIG_FILE"),
                        help="the server's config.properties (default: $TS_CONFIG_FILE)")
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds per HTTP call")
    args = parser.parse_args(argv)
    try:
        values = settings(args.config)
        print(live(values, args.timeout) if args.check == "live" else ready(values, args.models, args.timeout))
        return 0
    except (ProbeError, OSError, ValueError, KeyError, IndexError) as err:
        print(f"not {args.check}: {err}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
