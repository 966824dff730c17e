"""Locust load test: real sample inputs for MODEL, sent with the inference bearer token.

Run through `make loadtest` (loadtest/run.py), which sets MODEL, TS_TOKEN and the host. ENDPOINT
(default MODEL) names the served model to call, when it is registered under another name. When the file
LOADTEST_STOP_FILE names appears, the run ends as its run time would (loadtest.run.Run.stop).
"""

from __future__ import annotations

import os

import gevent
from locust import events
from locust.runners import WorkerRunner

from loadtest.payloads import payloads
from loadtest.users import InferenceUser


class ModelUser(InferenceUser):
    endpoint = os.environ.get("ENDPOINT") or os.environ.get("MODEL", "digits")
    token = os.environ.get("TS_TOKEN", "")
    by_version = os.environ.get("LOADTEST_BY_VERSION") == "1"
    # Built when Locust imports this file, which it does before `--processes` forks its workers: the workers
    # inherit them. A worker that built them after connecting would block its event loop for seconds (importing
    # the model's sample code), miss its heartbeats, and the master would stop the run as soon as it started,
    # with no request sent (seen on a loaded host).
    payloads = payloads(os.environ.get("MODEL", "digits"), int(os.environ.get("LOADTEST_SAMPLES", "64")))


@events.init.add_listener
def _refresh_clock(**_kwargs) -> None:
    # Building the payloads blocked the event loop for seconds, and gevent's timers count from the loop's cached
    # clock, which went stale meanwhile: Locust would arm --run-time from before it, and a loaded host could
    # spend the whole run there. Refresh the clock first.
    gevent.get_hub().loop.update_now()


@events.init.add_listener
def _watch_stop_file(environment, **_kwargs) -> None:
    path = os.environ.get("LOADTEST_STOP_FILE")
    if not path or isinstance(environment.runner, WorkerRunner):  # the master (or the only process) decides
        return

    def watch() -> None:
        while not os.path.exists(path):
            gevent.sleep(0.2)
        environment.runner.quit()  # what --run-time's end does: users stopped, then statistics and report written

    gevent.spawn(watch)
