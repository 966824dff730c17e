"""Liveness and readiness probes of a TorchServe container, run as commands (Kubernetes exec probes, the
image's HEALTHCHECK, `make probe` against a local server).

    probe.py live              exit 0 when the frontend answers HTTP on its inference address
    probe.py ready [MODEL ...] exit 0 when not draining and each model (default: every registered one, and at
                               least one) has a READY worker, as the management API lists them

It reads the server's own config.properties (TS_CONFIG_FILE), with TS_* environment variables taking
precedence where the config enables them (enable_envvars_config=true), so the probe follows whatever
addresses the server really uses. Addresses bound to 0.0.0.0 are probed on 127.0.0.1. Where token
authorization is on, the keys come from key_file.json in the working directory (TorchServe writes it to its
own), or TS_KEY_FILE; where it is off (the default of this image: clients authenticate at the gateway), no key
is sent. `/ping` alone is not readiness: TorchServe answers Healthy before any worker has loaded.

Standard library only, one line of output: it runs every few seconds in each pod.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

DRAIN_FILE = Path(os.environ.get("TS_DRAIN_FILE", "/tmp/torchserve.draining"))
DEFAULTS = {"inference_address": "http://127.0.0.1:8080", "management_address": "http://127.0.0.1:8081",
            "disable_token_authorization": "false", "enable_envvars_config": "false"}


class ProbeError(Exception):
    pass


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
        raise ProbeError(f"{url}: {getattr(err, 'reason', err)}")


def live(values: dict[str, str], timeout: float) -> str:
    status, _ = get(local(values["inference_address"]) + "/ping", key(values, "inference"), timeout)
    return f"alive: /ping answered {status}"


def ready(values: dict[str, str], models: list[str], timeout: float) -> str:
    if DRAIN_FILE.exists():
        raise ProbeError(f"draining since {DRAIN_FILE} was written (the container is stopping)")
    base, token = local(values["management_address"]), key(values, "management")
    if not models:
        status, body = get(f"{base}/models?limit=1000", token, timeout)
        if status != 200:
            raise ProbeError(f"GET /models answered {status}: {body[:200]!r}")
        models = [m["modelName"] for m in json.loads(body)["models"]]
        if not models:
            raise ProbeError("no model is registered")
    for name in models:
        status, body = get(f"{base}/models/{quote(name)}", token, timeout)
        if status != 200:
            raise ProbeError(f"{name}: GET /models/{name} answered {status}")
        workers = json.loads(body)[0].get("workers", [])
        if not any(w.get("status") == "READY" for w in workers):
            raise ProbeError(f"{name}: no READY worker ({len(workers)} listed)")
    return f"ready: {', '.join(models)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=("live", "ready"))
    parser.add_argument("models", nargs="*", help="ready: these models only (default: every registered one)")
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
