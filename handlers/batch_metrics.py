"""Per-batch handler metrics, published through TorchServe's metrics API (so they reach /metrics).

Counters only, so a reader takes differences between two scrapes: batches, requests, and the
milliseconds spent in each stage. Mean batch size = requests / batches; mean stage time per batch =
stage ms / batches. `HandlerBatchesBySize` splits batches by size (dimension BatchSize) to show the
batch sizes the server really formed. The bench (loadtest/bench/drive.py) reads these names.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

BATCHES = "HandlerBatches"
REQUESTS = "HandlerBatchedRequests"
BATCHES_BY_SIZE = "HandlerBatchesBySize"
EXPIRED = "HandlerRequestsExpired"  # requests answered 504: their deadline passed while they queued (never computed)
# the response cache (handlers.cache): answers given from it, computed and kept, computed at the client's word
# (Cache-Control), and entries dropped to make room
CACHE = {"hits": "HandlerCacheHits", "misses": "HandlerCacheMisses", "bypassed": "HandlerCacheBypassed",
         "evicted": "HandlerCacheEvictions"}
STAGES = ("preprocess", "inference", "postprocess")
STAGE_MS = {stage: f"Handler{stage.capitalize()}Ms" for stage in STAGES}


class StageClock:
    """Wall-clock milliseconds per stage of one batch, `with clock.stage("inference"): ...`, and for its trace
    (handlers/tracing.py) when each stage began and ended, and when the worker took the batch, in nanoseconds since
    the epoch."""

    def __init__(self) -> None:
        self.ms = dict.fromkeys(STAGES, 0.0)
        self.taken_ns = time.time_ns()
        self.spans: dict[str, tuple[int, int]] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start, began = time.perf_counter(), time.time_ns()
        try:
            yield
        finally:
            self.ms[name] += (time.perf_counter() - start) * 1000.0
            self.spans[name] = (began, time.time_ns())


def publish(metrics, batch_size: int, clock: StageClock, expired: int = 0, cache=None) -> None:
    """Add one batch to the counters (`expired`: its requests answered 504 unrun, not counted in its size; `cache`:
    a handlers.cache.Counts, its hits not counted in the size either); `metrics` is TorchServe's context.metrics
    (None outside a worker)."""
    if metrics is None:
        return
    from ts.metrics.dimension import Dimension

    if expired:
        metrics.add_counter(EXPIRED, expired)
    for field, name in CACHE.items():
        if cache is not None and (count := getattr(cache, field)):
            metrics.add_counter(name, count)
    if not batch_size:
        return

    metrics.add_counter(BATCHES, 1)
    metrics.add_counter(REQUESTS, batch_size)
    metrics.add_counter(BATCHES_BY_SIZE, 1, dimensions=[Dimension("BatchSize", str(batch_size))])
    for stage, name in STAGE_MS.items():
        metrics.add_counter(name, round(clock.ms[stage], 3))
