"""The one TorchServe handler of every model of ours, whatever its kind: a worker's set-up, and one batch
through the kind's pipeline.

A pipeline (handlers.kinds.*) is pure (handlers.requests.Pipeline). `PipelineHandler` reads the export
manifest packed in the archive, which names the model's kind (models.kinds), reads the model config's
`handler:` section into that kind's `Settings`, fixes the worker's threads and device, loads the archive's
model with the runtime backend, has the kind build its pipeline, warms it up (stand-in input, then the archive's
sample request through the whole pipeline), and per batch reads each
request's media type from TorchServe's context, times the three stages, sets each request's status,
publishes the stage times as metrics and, when the environment names a collector, each request's trace
(handlers/tracing.py). TorchServe loads it as the archive's handler (handlers/handler.py).

It is a plain class (TorchServe asks a handler for `initialize` and `handle` alone), not a subclass of TorchServe's
BaseHandler, which imports torch: a worker of an ONNX model imports no torch (the CPU image has none). A model that
needs torch (a generating kind, a TorchScript or AOTInductor artifact) says so when it loads where torch is missing.
"""

from __future__ import annotations

import http
import json
import logging
import time
from pathlib import Path
from typing import Sequence

from handlers import cache, oip, openai, tracing
from handlers.batch_metrics import StageClock, publish
from handlers.requests import Pipeline, RequestError, content_type_of, expired, request_id, with_query
from models import kinds
from models.runtime import ThreadBudget, as_torch_device, configure_cuda_math, load_runner, needs_torch, select_device

logger = logging.getLogger(__name__)


def content_types(context, count: int) -> list[str]:
    """Each request's body media type from a TorchServe context: kept per input part (the "body" entry)
    beside the request's HTTP headers."""
    types = []
    for idx in range(count):
        headers = context.get_all_request_header(idx) or {}
        part = headers.get("body")
        types.append(content_type_of(part if isinstance(part, dict) else headers))
    return types


def header_lengths(context, count: int) -> list[int | None]:
    """Each request's Inference-Header-Content-Length (the OIP binary tensor extension), None where it is not
    used. A value that is no integer is kept as -1, which the pipeline refuses for that request alone."""
    lengths: list[int | None] = []
    for idx in range(count):
        try:
            lengths.append(oip.header_length(context.get_all_request_header(idx)))
        except RequestError:
            lengths.append(-1)
    return lengths


VERSION_HEADER = "X-Model-Version"


def within(answer, limit: int):
    """`answer`, or a 413 in its protocol's form when its body passes `limit` bytes: TorchServe's frontend drops a
    worker whose answer passes max_response_size (the whole batch then fails with it), so the worker refuses it."""
    if isinstance(answer, RequestError):
        return answer
    binary = isinstance(answer, oip.BinaryAnswer)
    if not binary and len(answer) * 4 <= limit:  # UTF-8 takes at most 4 bytes a character
        return answer
    size = len(answer.body) if binary else len(answer.encode("utf-8"))
    if size <= limit:
        return answer
    infer = binary or answer.startswith(oip.ANSWER_HEAD)
    return RequestError(413, "AnswerTooLarge", f"the answer would be {size} bytes, over the {limit} this server "
                        "sends (handler.max_answer_bytes)" + ("; ask for binary outputs (the binary tensor extension), "
                                                              "fewer outputs or a smaller input" if infer else
                                                              "; send a smaller input"), oip=infer)
BATCH_MS_WEIGHT = 0.2  # the newest batch's share of the moving average a deadline is judged with


def answer_all(context, results: Sequence[str | oip.BinaryAnswer | RequestError], version: str | None = None,
               cached: Sequence[str | None] | None = None) -> list[str | bytes]:
    """Set each request's status, content type (JSON; raw bytes with Inference-Header-Content-Length for an OIP
    answer in the binary extension), (given `version`) the X-Model-Version header that says which version of
    the model answered it and (given `cached`) the X-Cache header that says whether the response cache answered
    it, on a TorchServe context; return the bodies."""
    answers: list[str | bytes] = []
    for idx, result in enumerate(results):
        binary = isinstance(result, oip.BinaryAnswer)
        context.set_response_content_type(idx, "application/octet-stream" if binary else "application/json")
        if version is not None:
            context.set_response_header(idx, VERSION_HEADER, version)
        if cached is not None and cached[idx] is not None:
            context.set_response_header(idx, cache.STATUS_HEADER, cached[idx])
        if isinstance(result, RequestError):
            context.set_response_status(result.status, result.phrase, idx)
            answers.append(result.body())
        else:
            context.set_response_status(200, "OK", idx)
            if binary:
                context.set_response_header(idx, oip.RESPONSE_HEADER_LENGTH, str(result.header_length))
            answers.append(result.body if binary else result)
    return answers


def request_ids(context, headers: Sequence[dict | None]) -> list[str]:
    """Each request's ID (handlers.requests.request_id), TorchServe's job ID where it has none."""
    return [request_id(h, context.get_request_id(idx)) for idx, h in enumerate(headers)]


def log_batch(model: str, ids: Sequence[str], answers: Sequence, cached: Sequence[str | None],
              clock: StageClock) -> None:
    """One worker log line per batch: each request's ID with its status (and X-Cache), so a request found in the
    access log by its ID is found here too."""
    each = ", ".join(f"{request_id} {answer.status if isinstance(answer, RequestError) else 200}"
                     f"{'' if status is None else ' ' + status}"
                     for request_id, answer, status in zip(ids, answers, cached, strict=True))
    logger.info("%s: batch of %d in %.1f ms: %s", model, len(ids), sum(clock.ms.values()), each)


def warm_up_with_sample(pipeline: Pipeline, model_dir: Path) -> None:
    """Send the archive's example request (export.archive packs the registry entry's as sample.json and its body)
    through the whole pipeline, decoding, preset, model and answer, so that whatever a first request would pay
    once (a lazy import, a decoder's set-up, a first pass at a real size) is paid before the worker reports ready.
    A sample that fails fails the worker's load: a model that cannot answer its own example is not ready."""
    described = model_dir / "sample.json"
    if not described.exists():
        return
    sample = json.loads(described.read_text())
    body = bytearray((model_dir / sample["body"]).read_bytes())
    for _ in range(2):  # the second pass meets what the first left warm (allocator pools, caches)
        (answer,) = pipeline.process([{"body": body}], [sample["content_type"]])
        if isinstance(answer, RequestError):
            raise RuntimeError(f"the archive's sample request ({sample['content_type']}) was refused: {answer.body()}")


class PipelineHandler:
    """Builds the pipeline of the kind the export manifest names (handlers.kinds)."""

    initialized = False

    @staticmethod
    def served_as(context) -> tuple[str, str]:
        """(model name, version) as TorchServe serves the model: what an OIP answer names."""
        return context.model_name, str(context.manifest.get("model", {}).get("modelVersion", "1"))

    def initialize(self, context) -> None:
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        export_manifest = json.loads((model_dir / "manifest.json").read_text())
        if kinds.get(export_manifest["kind"]).generates:
            needs_torch(f"model {context.model_name} (the {export_manifest['kind']} kind)")
        kind = kinds.load(export_manifest["kind"])
        settings = kind.Settings.from_mapping((context.model_yaml_config or {}).get("handler"))
        threads = ThreadBudget(intra_op=settings.intra_op_threads)
        threads.apply_to_torch()
        self.device = select_device(properties.get("gpu_id"))
        configure_cuda_math(self.device, allow_tf32=settings.allow_tf32)
        if kinds.get(export_manifest["kind"]).generates:
            self.generation = GenerationSession(kind, model_dir, settings, self.device, context,
                                                served_as=self.served_as(context))
            logger.info("%s (%s, %s decoder) ready on %s (%d intra-op threads, %d sequences)", context.model_name,
                        export_manifest["kind"], settings.backend, self.generation.scheduler.device,
                        threads.intra_op, self.generation.slots)
            self.initialized = True
            return
        runner = load_runner(model_dir / context.manifest["model"]["serializedFile"], self.device, threads,
                             half=settings.precision == "fp16")
        self.pipeline: Pipeline = kind.build(model_dir, export_manifest, runner, settings,
                                             served_as=self.served_as(context),
                                             max_batch=int(properties.get("batch_size") or 1))
        self.pipeline.warm_up()
        warm_up_with_sample(self.pipeline, model_dir)
        self.cache = cache.ResponseCache(settings.response_cache_mb << 20) if settings.response_cache_mb else None
        self.tracing = tracing.Tracing.start()  # None unless the environment names an OTLP collector
        self.max_answer_bytes = settings.max_answer_bytes
        logger.info("%s (%s) ready on %s with %s (%d intra-op threads)", context.model_name, export_manifest["kind"],
                    self.device, type(runner).__name__, threads.intra_op)
        self.initialized = True

    generation: "GenerationSession | None" = None
    cache: "cache.ResponseCache | None" = None
    tracing: "tracing.Tracing | None" = None
    max_answer_bytes = 8 << 20
    batch_ms = 0.0  # a moving average of a computed batch's milliseconds in this worker (BATCH_MS_WEIGHT per batch)

    def handle(self, data, context):
        if self.generation is not None:
            return self.generation.handle(data, context)
        clock = StageClock()
        headers = [context.get_all_request_header(idx) for idx in range(len(data))]
        types, lengths = content_types(context, len(data)), header_lengths(context, len(data))
        # each request's answer: a request whose deadline passed while it queued gets its 504 now and the batch goes
        # on without it; the others' are filled in below
        now_ms = time.time() * 1000.0
        outcome: list = [expired(h, now_ms, request, length, self.batch_ms)
                         for h, request, length in zip(headers, data, lengths, strict=True)]
        late = sum(1 for error in outcome if error is not None and error.status == 504)
        data = with_query(openai.tag_routes(data, headers), headers)
        keys, cached, counts = self.consult_cache(outcome, headers, data, types, lengths, self.served_as(context))
        live = [idx for idx, answer in enumerate(outcome) if answer is None]
        data, types, lengths = ([values[idx] for idx in live] for values in (data, types, lengths))
        with clock.stage("preprocess"):
            batch = self.pipeline.preprocess(data, types, lengths) if data else None
        with clock.stage("inference"):
            try:
                outputs = self.pipeline.run(batch) if data else None
            except Exception:  # noqa: BLE001 - one bad input must not cost its neighbours their answers
                logger.exception("a batch of %d failed in the model; answering its requests one by one", len(data))
                results = self.pipeline.isolate(data, types, lengths)
            else:
                results = None
        with clock.stage("postprocess"):
            if results is None:
                results = self.pipeline.postprocess(batch, outputs) if data else []
            for idx, result in zip(live, results, strict=True):
                outcome[idx] = result = within(result, self.max_answer_bytes)
                if keys[idx] is not None and not isinstance(result, RequestError):
                    counts.evicted += self.cache.put(keys[idx], result)
            ids = request_ids(context, headers)
            outcome = [oip.with_id(answer, request_id) for answer, request_id in zip(outcome, ids, strict=True)]
            answers = answer_all(context, outcome, self.served_as(context)[1], cached)
        publish(context.metrics, len(data), clock, expired=late, cache=counts)
        log_batch(context.model_name, ids, outcome, cached, clock)
        if self.tracing is not None:
            self.tracing.record(self.served_as(context), headers, ids, outcome, live, clock, cached)
        if data:  # what a computed batch takes now: a deadline shorter than the wait and this is refused unrun
            self.batch_ms += BATCH_MS_WEIGHT * (sum(clock.ms.values()) - self.batch_ms)
        return answers

    def consult_cache(self, outcome: list, headers: list, data: list, types: list, lengths: list,
                      served_as: tuple[str, str]) -> tuple[list, list, "cache.Counts"]:
        """Answer from the response cache, in `outcome`, each unanswered request it holds (and its Cache-Control
        allows); return each request's key to keep its computed answer under (None: keep nothing), its X-Cache
        status, and the counts."""
        keys: list[bytes | None] = [None] * len(outcome)
        cached: list[str | None] = [None] * len(outcome)
        counts = cache.Counts()
        if self.cache is None:
            return keys, cached, counts
        for idx, answer in enumerate(outcome):
            if answer is not None:
                continue
            use = cache.use_of(headers[idx])
            key = None if use is cache.Use.NONE else cache.key_of(served_as, data[idx], types[idx], lengths[idx])
            hit = self.cache.get(key) if key is not None and use is cache.Use.READ else None
            if hit is not None:
                outcome[idx], cached[idx] = hit, "HIT"
                counts.hits += 1
            elif use is cache.Use.READ:
                keys[idx], cached[idx] = key, "MISS"
                counts.misses += 1
            else:
                keys[idx], cached[idx] = key, "BYPASS"
                counts.bypassed += 1
        return keys, cached, counts


class GenerationSession:
    """A generating kind's scheduler (handlers.kinds.generate) inside a worker that TorchServe's ContinuousBatching
    aggregator drives (the model-config YAML says `continuousBatching: true`): each call is one step for every
    running request. Each request's chunk goes back with its status, media type and TorchServe's `ts_stream_next`
    (set from `context.stopping_criteria`, which is how its response encoder reads it), and the step's figures go
    to the metrics."""

    def __init__(self, kind, model_dir: Path, settings, device, context, *, served_as: tuple[str, str]) -> None:
        self.slots = int(context.system_properties.get("batch_size") or 1)
        self.scheduler = kind.build(model_dir, settings, served_as=served_as, max_batch=self.slots,
                                    device=as_torch_device(device))
        self.scheduler.warm_up()
        self.served_as = served_as
        self.tracing = tracing.Tracing.start()  # None unless the environment names an OTLP collector

    def handle(self, data, context) -> list[bytes]:
        requests = [(context.get_request_id(idx), data[idx] or {}, context.get_all_request_header(idx) or {})
                    for idx in range(len(data))]
        chunks = self.scheduler.serve(requests)
        if (ended := self.scheduler.ended()) and self.tracing is not None:
            self.tracing.record_generation(self.served_as, ended)
        for idx, chunk in enumerate(chunks):
            context.set_response_status(chunk.status, http.HTTPStatus(chunk.status).phrase, idx)
            context.set_response_content_type(idx, chunk.content_type)
        # TorchServe's encoder sets ts_stream_next from these: False (more follow), True (the last of several) or
        # None (no header: a whole answer, which the frontend sends as one response; "false" on a first response
        # would end a stream whose head was never sent)
        context.stopping_criteria = [
            (lambda _answer, stop=None if (chunk.first and not chunk.more) else not chunk.more: stop)
            for chunk in chunks]
        self.scheduler.publish(context.metrics)
        return [chunk.body for chunk in chunks]
