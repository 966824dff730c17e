"""The Locust user both `make loadtest` (locustfile.py) and the bench driver (drive.py) run.

Each user posts a real payload, picked at random, to its path (native or Open Inference Protocol) with its
media type, its own headers and the inference bearer token, and waits for the answer before the next (closed
loop: concurrency = users).
Any non-200 answer is a failure; a 503 (TorchServe's job queue is full: the server is shedding load, not
crashing) is recorded as "rejected", apart from other failures.
"""

from __future__ import annotations

import random
from typing import Sequence

from locust import FastHttpUser, constant, task

from loadtest.payloads import Payload


REJECTED = "rejected"


def rejected_count(errors) -> int:
    """How many of a Locust run's failures were load shedding (503), from its error table."""
    return sum(e.occurrences for e in errors.values() if str(e.error).startswith(REJECTED))


class InferenceUser(FastHttpUser):
    abstract = True  # concrete subclasses set endpoint, payloads and token
    wait_time = constant(0)
    endpoint: str = ""
    payloads: Sequence[Payload] = ()
    token: str = ""
    by_version: bool = False  # name each answered request by the model version that answered it (X-Model-Version)

    def on_start(self) -> None:
        self.rng = random.Random(id(self))
        self.auth = f"Bearer {self.token}"

    @task
    def predict(self) -> None:
        payload = self.rng.choice(self.payloads)
        path = payload.path.format(endpoint=self.endpoint)
        with self.client.post(
            path, data=payload.body, name=path, catch_response=True,
            headers={"Authorization": self.auth, "Content-Type": payload.content_type, **payload.headers},
        ) as response:
            text = response.text or ""  # None where no answer came (the connection was refused or reset)
            if response.status_code == 503:
                response.failure(f"{REJECTED} (HTTP 503): {text[:120]}")
            elif response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {text[:200] or response.error}")
            elif self.by_version:
                response.request_meta["name"] = f"{path} version={response.headers.get('X-Model-Version', 'none')}"
