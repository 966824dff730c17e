"""Locust load test: real sample inputs for MODEL, sent with the inference bearer token.

Run through `make loadtest` (loadtest/run.py), which sets MODEL, TS_TOKEN and the host. Each user
posts raw image bytes with their media type; any non-200 answer counts as a failure.
"""

from __future__ import annotations

import os
import random

from locust import FastHttpUser, constant, events, task

from loadtest.payloads import payloads

MODEL = os.environ.get("MODEL", "digits")
SAMPLE_COUNT = int(os.environ.get("LOADTEST_SAMPLES", "64"))
_PAYLOADS: list = []


@events.init.add_listener
def _load_payloads(**_kwargs) -> None:
    _PAYLOADS.extend(payloads(MODEL, SAMPLE_COUNT))


class InferenceUser(FastHttpUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        self.auth = f"Bearer {os.environ['TS_TOKEN']}"
        self.rng = random.Random(id(self))

    @task
    def predict(self) -> None:
        payload = self.rng.choice(_PAYLOADS)
        with self.client.post(
            f"/predictions/{MODEL}", data=payload.body, name=f"/predictions/{MODEL}", catch_response=True,
            headers={"Authorization": self.auth, "Content-Type": payload.content_type},
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            elif not response.text.startswith("["):
                response.failure(f"unexpected body: {response.text[:200]}")
