"""Shared fixtures. Tiers live in folders: unit (pure functions), handler (in-process with TorchServe's
own context objects), export (parity), integration (real TorchServe over HTTP), load (real Locust),
ops (operations against real TorchServes, and fuzzing), fleet (replicas behind HAProxy, failover,
model updates under load), gpu (CUDA paths; skipped visibly without CUDA).
Model-specific tests are parametrized from the registry. $TEST_SERVED (model names) stands for the registry's
default models, to run the generic tiers as if those were the defaults (tests/integration/test_served_set.py).

The built models come from the build tree make names in $BUILD_TREE (`make test`: the quick tree).
Markers agree with what a test does: one that starts TorchServe is `integration` (a guard below fails a
test that starts one without the marker), so `pytest -m "not integration"` starts no server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from models import paths, registry
from models.paths import ROOT
from tests.kinds import model_store, models_of

TREE = paths.current()
# the models served by default, or those $TEST_SERVED names
SERVED = ([registry.get(name) for name in os.environ["TEST_SERVED"].split()] if os.environ.get("TEST_SERVED")
          else [spec for spec in registry.REGISTRY.values() if spec.serve_by_default])
TRAINED = [spec for spec in registry.REGISTRY.values() if spec.train is not None]
BUILT = [spec for spec in registry.REGISTRY.values() if registry.tested(spec)]  # what `make test` builds
# The served models of one kind, for the tests of what that kind does (tiers over every model use tests/kinds).
CLASSIFIERS, EMBEDDERS, TENSORS = (models_of(module, SERVED) for module in ("classify", "text", "tensor"))


def built(path: Path) -> Path:
    """A build artifact the tests need; `make test` builds them first, so absence is a failure, not a skip."""
    if not path.exists():
        pytest.fail(f"{path} is missing: run the tests through `make test`, which builds it")
    return path


def worker_pids(server, model: str, *, ready_only: bool = False) -> list[int]:
    """PIDs of `model`'s workers (only the READY ones with `ready_only`), from the management API."""
    import requests

    from serve_config.control import model_workers

    workers, status = model_workers(server, model)
    if status != 200:
        raise requests.HTTPError(f"describing {model} answered {status}")
    return sorted(w["pid"] for w in workers if not ready_only or w.get("status") == "READY")


def post_together(server, jobs) -> list:
    """POST every (model, body, headers) of `jobs` with the inference key, all released at once by one
    barrier so the server batches them together; the answers in the order of `jobs`."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import requests

    barrier, auth = threading.Barrier(len(jobs)), server.headers()

    def send(job):
        model, body, headers = job
        barrier.wait(timeout=60)
        return requests.post(f"{server.inference_url}/predictions/{model}", data=body, headers={**auth, **headers},
                             timeout=60)

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(send, jobs))


def logged(server, name: str, text: str, seconds: float = 10.0) -> bool:
    """Whether `text` appears in the server's log `name` within `seconds` (log lines are written asynchronously)."""
    import time

    path = server.run_dir / "logs" / name
    for _ in range(int(seconds / 0.2)):
        if path.exists() and text in path.read_text(errors="replace"):
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One real TorchServe serving every default model, on free loopback ports, with token auth on.
    Shared by the integration and load tiers; stopped by its PID at the end of the session."""
    from serve_config.control import Ports, start, stop

    for spec in SERVED:
        built(TREE.archive(spec.name))
    run_dir = tmp_path_factory.mktemp("torchserve")
    store = model_store(SERVED, tmp_path_factory.mktemp("store"), TREE)  # with the test tiers' handler settings
    try:  # a model that fails to load leaves the server up (ModelLoadError): stopped here all the same
        yield start(run_dir, [s.name for s in SERVED], ports=Ports.free(), model_store=store)
    finally:
        stop(run_dir)


class ClassifierReference:
    """What a classifier's served top-k must equal, computed offline through the same preset: the eager
    checkpoint when the archive serves an artifact held to the model's parity tolerance; the served artifact
    itself, run in-process, when it is a variant verified to a looser tolerance of its own (INT8 is held to
    top-1 agreement and held-out accuracy against eager, not to scores within 1e-4)."""

    def __init__(self, model_name: str) -> None:
        from models import checkpoint
        from models.preprocessing import build_preset

        spec = registry.get(model_name)
        self.model, self.meta = checkpoint.load(built(TREE.checkpoint(model_name)))
        self.preset = build_preset(self.meta["preset"])
        self.source = "eager"
        if spec.serve_artifact in spec.format_tolerance:
            import torch

            from export import manifest as mf
            from models.runtime import ThreadBudget, load_runner

            artifacts = built(TREE.artifacts(model_name))
            runner = load_runner(artifacts / mf.read(artifacts)["artifacts"][spec.serve_artifact]["file"],
                                 torch.device("cpu"), ThreadBudget())
            self.model, self.source = (lambda batch: torch.from_numpy(runner([batch])[0])), spec.serve_artifact

    def probs(self, body: bytes):
        import torch

        from models.preprocessing import decode_for

        with torch.inference_mode():
            row = torch.from_numpy(self.preset(decode_for(self.preset, body, max_pixels=10**8)))
            return torch.softmax(self.model(row[None]), dim=1)[0]

    def assert_matches(self, answer: list[dict], body: bytes, *, atol: float = 1e-4) -> None:
        """The served top-k equals the reference's: same classes in the same order, scores within atol."""
        probs = self.probs(body)
        scores, indices = probs.topk(len(answer))
        assert [p["index"] for p in answer] == indices.tolist(), self.source
        assert [p["label"] for p in answer] == [self.meta["labels"][i] for i in indices.tolist()]
        assert [p["score"] for p in answer] == pytest.approx(scores.tolist(), abs=atol), self.source


class SentenceReference:
    """sentence-transformers' own encode() of the pretrained source: what served embeddings must equal."""

    def __init__(self) -> None:
        from sentence_transformers import SentenceTransformer

        from models.minilm import checked_source

        self.model = SentenceTransformer(str(checked_source()), device="cpu")

    def encode(self, texts):
        return self.model.encode(list(texts), convert_to_numpy=True, normalize_embeddings=False)

    def assert_matches(self, embeddings, texts, *, atol: float = 1e-4, min_cosine: float = 0.9999) -> None:
        import numpy as np

        got, expected = np.asarray(embeddings, dtype=np.float64), self.encode(texts).astype(np.float64)
        assert got.shape == expected.shape
        cosine = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
        assert np.abs(got - expected).max() <= atol and cosine.min() >= min_cosine, (np.abs(got - expected).max(), cosine.min())


def assert_serves_every_model(inference_url: str, headers: dict[str, str] | None = None, *, samples: int = 3) -> None:
    """Each default model answers real samples at `inference_url` as it does offline, as its kind's checks say
    (tests/kinds: a classifier's top-k equals the eager checkpoint's, an embedder's vectors equal
    sentence-transformers'...). For servers started some other way than the `server` fixture (a container, a
    KServe bundle)."""
    import requests

    from loadtest.payloads import payloads
    from tests.kinds import checks

    headers = headers or {}
    for spec in SERVED:
        url = f"{inference_url}/predictions/{spec.name}"
        sent = payloads(spec.name, samples)
        answers = [requests.post(url, data=p.body, headers={**headers, "Content-Type": p.content_type}, timeout=60)
                   for p in sent]
        assert all(a.status_code == 200 for a in answers), (spec.name, [a.text for a in answers])
        checks(spec).assert_native(sent, [a.json() for a in answers])
    assert_oip_metadata(inference_url, headers, [spec.name for spec in SERVED])


def assert_oip_metadata(inference_url: str, headers: dict[str, str], models, archive_of=TREE.archive) -> None:
    """Triton's HTTP client at `inference_url` gets each model's metadata (what its archive's signature.json says,
    with its name and versions) and finds it ready: the frontend plugin runs there (handlers/frontend).
    `archive_of(name)`: the archive served as `name` (the build tree's by default)."""
    import json
    import zipfile

    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(inference_url.split("://", 1)[-1], network_timeout=60)
    for name in models:
        metadata = client.get_model_metadata(name, headers=headers)
        with zipfile.ZipFile(archive_of(name)) as archive:
            signature = json.loads(archive.read("signature.json"))
        assert metadata["name"] == name and metadata["versions"], metadata
        oip = {k: v for k, v in signature.items() if k != "openai"}  # "openai": the OpenAI routes it speaks
        assert {k: metadata[k] for k in oip} == oip, (metadata, signature)
        assert client.is_model_ready(name, headers=headers), name
    assert client.is_server_ready(headers=headers)


class Traffic:
    """Posts one real sample of `model` to `inference_url` in a loop on a thread, for as long as the `with` lasts,
    recording each status code, or "refused" where no connection could be made (a server that has stopped), and
    when each answer came (`times`, time.monotonic())."""

    def __init__(self, inference_url: str, model: str, *, pause: float = 0.02) -> None:
        import threading

        from loadtest.payloads import payloads

        self.url, self.sample, self.pause = f"{inference_url}/predictions/{model}", payloads(model, 1)[0], pause
        self.statuses: list = []
        self.times: list[float] = []
        self._done, self._thread = threading.Event(), threading.Thread(target=self._send)

    def _send(self) -> None:
        import time

        import requests

        while not self._done.is_set():
            try:
                status = requests.post(self.url, data=self.sample.body, timeout=30,
                                       headers={"Content-Type": self.sample.content_type}).status_code
            except requests.ConnectionError:
                status = "refused"
            self.times.append(time.monotonic())
            self.statuses.append(status)
            time.sleep(self.pause)

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._done.set()
        self._thread.join()

    @property
    def answered(self) -> list[int]:
        return [s for s in self.statuses if s != "refused"]

    def answered_after(self, moment: float) -> list[int]:
        """The statuses of the answers that came after `moment` (time.monotonic())."""
        return [s for s, t in zip(list(self.statuses), list(self.times)) if t > moment and s != "refused"]


@pytest.fixture(scope="session")
def sentence_reference():
    return SentenceReference()


@pytest.fixture(autouse=True)
def _servers_only_in_integration_tests(request, monkeypatch):
    """A test that is not marked `integration` may not start TorchServe: `-m "not integration"` must start none."""
    if request.node.get_closest_marker("integration") is not None:
        return
    if "server" in request.fixturenames or "private_server" in request.fixturenames:
        pytest.fail(f"{request.node.nodeid} uses a TorchServe fixture but is not marked integration")
    from serve_config import control
    from serve_config.control import lifecycle

    def refuse(*args, **kwargs):
        pytest.fail(f"{request.node.nodeid} starts TorchServe but is not marked integration")

    monkeypatch.setattr(lifecycle, "start", refuse)
    monkeypatch.setattr(control, "start", refuse)
