"""Locust load test: real sample inputs for MODEL, sent with the inference bearer token.

Run through `make loadtest` (loadtest/run.py), which sets MODEL, TS_TOKEN and the host. ENDPOINT
(default MODEL) names the served model to call, when it is registered under another name.
"""

from __future__ import annotations

import os

import gevent
from locust import events

from loadtest.payloads import payloads
from loadtest.users import InferenceUser


class ModelUser(InferenceUser):
    endpoint = os.environ.get("ENDPOINT") or os.environ.get("MODEL", "digits")
    token = os.environ.get("TS_TOKEN", "")
    by_version = os.environ.get("LOADTEST_BY_VERSION") == "1"


@events.init.add_listener
def _load_payloads(**_kwargs) -> None:
    ModelUser.payloads = payloads(os.environ.get("MODEL", "digits"), int(os.environ.get("LOADTEST_SAMPLES", "64")))
    # Building the payloads blocks the event loop for seconds (it imports the model's sample code), and gevent's
    # timers count from the loop's cached clock, which went stale meanwhile: Locust would arm --run-time from
    # before this listener, and a loaded host could spend the whole run here. Refresh the clock first.
    gevent.get_hub().loop.update_now()
