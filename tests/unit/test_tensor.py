"""The tensor kind (handlers.kinds.tensor): any model's named tensors in and out, batched across requests, each
bad request answered with its own 4xx, against the multi-input multi-output model of the registry (`pair`,
eager, fixed seed) and a model over every datatype the protocol names."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from handlers.kinds import tensor
from models.kinds import DATATYPES
from handlers.requests import RequestError
from export.export import input_records
from models import checkpoint, registry
from models.runtime import ModuleRunner
from tests.kinds.tensor import binary

SPEC = registry.get("pair")


def manifest_of(spec) -> dict:
    """The export manifest's part the kind reads, as export.export writes it."""
    return {"inputs": input_records(spec), "outputs": list(spec.outputs)}


class Counting:
    """The eager model as a runner, counting forward passes and the rows of each."""

    def __init__(self, model) -> None:
        self.model, self.passes = ModuleRunner(model), []

    def __call__(self, inputs):
        self.passes.append([tuple(t.shape) for t in inputs])
        return self.model(inputs)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return checkpoint.build_model(SPEC.builder, SPEC.builder_kwargs).eval()


def pipeline(model, **settings):
    runner = Counting(model)
    return tensor.build(None, manifest_of(SPEC), runner, tensor.Settings(**settings), served_as=("pair", "2.0"),
                        max_batch=16), runner


def request(rows: int, length: int, seed: int, **extra) -> dict:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(rows, 8)).astype(np.float32)
    tokens = rng.integers(0, 100, size=(rows, length))
    return {"inputs": [{"name": "features", "datatype": "FP32", "shape": [rows, 8], "data": features.ravel().tolist()},
                       {"name": "tokens", "datatype": "INT64", "shape": [rows, length], "data": tokens.ravel().tolist()}],
            **extra}


def alone(model, body: dict) -> list[np.ndarray]:
    """What the model gives for this request's rows on their own."""
    arrays = [torch.tensor(np.asarray(i["data"]).reshape(i["shape"]), dtype=torch.float32 if i["datatype"] == "FP32"
                           else torch.int64) for i in body["inputs"]]
    with torch.inference_mode():
        return [o.numpy() for o in model(*arrays)]


def test_rows_of_every_request_share_passes_grouped_by_length_and_each_answer_is_its_own(model):
    pipe, runner = pipeline(model)
    bodies = [request(2, 4, 0), request(1, 9, 1), request(3, 4, 2), request(1, 9, 3, id="x"), request(5, 1, 4)]
    raw, header = binary(bodies[2])
    requests = [{"body": bodies[0]}, {"body": json.dumps(bodies[1]).encode()}, {"body": raw},
                {"body": bodies[3]}, {"body": bodies[4]}]
    types = ["application/json", "application/json", "application/octet-stream", "", "application/json"]
    batch = pipe.preprocess(requests, types, [None, None, header, None, None])
    answers = pipe.postprocess(batch, pipe.run(batch))
    # three shapes of `tokens` (4, 9, 1): three passes, one per group, each holding all its requests' rows
    assert sorted(p[0][0] for p in runner.passes) == [1 + 1, 2 + 3, 5]
    for body, answer in zip(bodies, answers, strict=True):
        assert isinstance(answer, str), answer.body()
        got = json.loads(answer)
        assert (got["model_name"], got["model_version"]) == ("pair", "2.0")
        assert got.get("id") == body.get("id")
        scores, strongest = alone(model, body)
        out = {o["name"]: o for o in got["outputs"]}
        assert out["scores"]["datatype"] == "FP32" and out["scores"]["shape"] == list(scores.shape)
        assert np.allclose(np.asarray(out["scores"]["data"]).reshape(scores.shape), scores, atol=1e-6)
        assert out["strongest"]["datatype"] == "INT64" and out["strongest"]["data"] == strongest.tolist()


def test_outputs_in_the_request_pick_and_order_the_answer(model):
    pipe, _ = pipeline(model)
    answers = pipe.process([{"body": request(2, 3, 5, outputs=[{"name": "strongest"}])},
                            {"body": request(2, 3, 6, outputs=[{"name": "strongest"}, {"name": "scores"}])}],
                           ["application/json"] * 2)
    assert [o["name"] for o in json.loads(answers[0])["outputs"]] == ["strongest"]
    assert [o["name"] for o in json.loads(answers[1])["outputs"]] == ["strongest", "scores"]


def mutate(body: dict, name: str, **changes) -> dict:
    body = json.loads(json.dumps(body))
    for item in body["inputs"]:
        if item["name"] == name:
            item.update(changes)
    return body


GOOD = request(2, 4, 7)
BAD = [
    ("unknown input", {"inputs": GOOD["inputs"] + [{"name": "extra", "datatype": "FP32", "shape": [2], "data": [1, 2]}]},
     400, "unknown input 'extra'"),
    ("missing input", {"inputs": GOOD["inputs"][:1]}, 400, "missing input 'tokens'"),
    ("wrong datatype", mutate(GOOD, "tokens", datatype="INT32"), 400, "is INT32; this model takes INT64"),
    ("floats for ids", mutate(GOOD, "tokens", datatype="FP32"), 400, "this model takes INT64"),
    ("wrong rank", mutate(GOOD, "features", shape=[16]), 400, "has shape [16]"),
    ("fixed axis of another size", mutate(GOOD, "features", shape=[4, 4]), 400, "this model takes [-1, 8]"),
    ("rows differ", mutate(GOOD, "tokens", shape=[1, 8]), 400, "has 1 rows"),
    ("NaN", mutate(GOOD, "features", data=[float("nan")] + GOOD["inputs"][0]["data"][1:]), 400, "NaN or infinite"),
    ("too many rows", request(33, 1, 8), 413, "at most 32 per request"),
    ("too many values", request(32, 400, 9), 413, "at most 12000"),
    ("dynamic axis too long", request(1, 513, 10), 413, "at most 512"),
    ("zero rows", request(0, 4, 11), 400, "no rows"),
    ("unknown output", request(1, 2, 12, outputs=[{"name": "logits"}]), 400, "unknown output 'logits'"),
    ("not an infer request", {"features": [1, 2]}, 400, "send an Open Inference Protocol infer request"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_each_bad_request_gets_its_own_4xx_and_its_neighbours_are_served(model, case):
    _, body, status, message = case
    pipe, _ = pipeline(model, max_rows_per_request=32, max_values_per_request=12000, max_dynamic_axis=512)
    answers = pipe.process([{"body": GOOD}, {"body": body}, {"body": GOOD}], ["application/json"] * 3)
    assert isinstance(answers[1], RequestError) and answers[1].status == status, answers[1]
    assert message in answers[1].message and list(json.loads(answers[1].body())) == ["error"]
    for answer in (answers[0], answers[2]):
        assert isinstance(answer, str) and json.loads(answer)["outputs"][1]["data"] == alone(model, GOOD)[1].tolist()


def test_bodies_that_are_not_json_are_refused_for_themselves(model):
    pipe, _ = pipeline(model)
    answers = pipe.process([{"body": b"{oops"}, {"body": b"\x89PNG"}, {"body": b"[1, 2]"}, {"body": GOOD}],
                           ["application/json", "image/png", "application/json", "application/json"])
    assert [getattr(a, "status", 200) for a in answers] == [400, 415, 400, 200]


def test_every_datatype_goes_in_and_comes_out_as_itself():
    """FP16, FP32, FP64, INT8..INT64, UINT8 and BOOL inputs reach the model in their own dtype; outputs keep theirs."""
    dtypes = ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"]
    manifest = {"inputs": [{"name": d, "dtype": d, "example_shape": [2, 2], "dynamic_axes": {"0": "batch"}}
                           for d in dtypes], "outputs": dtypes}
    seen = []

    def identity(inputs):
        seen.append([t.dtype for t in inputs])
        return [t.copy() for t in inputs]

    pipe = tensor.build(None, manifest, identity, tensor.Settings(), served_as=("m", "1"), max_batch=1)
    values = {"float16": [0.5, -1.5], "float32": [1.25, 2], "float64": [1e-300, 3], "int8": [-128, 127],
              "int16": [-3, 4], "int32": [2**31 - 1, -5], "int64": [2**62, -7], "uint8": [0, 255], "bool": [True, False]}
    body = {"inputs": [{"name": d, "datatype": DATATYPES[d], "shape": [1, 2], "data": values[d]}
                       for d in dtypes]}
    (answer,) = pipe.process([{"body": body}], ["application/json"])
    assert seen == [[np.dtype(d) for d in dtypes]]
    out = {o["name"]: o for o in json.loads(answer)["outputs"]}
    for d in dtypes:
        assert out[d]["datatype"] == DATATYPES[d] and out[d]["shape"] == [1, 2]
        assert out[d]["data"] == values[d], d


def test_binary_requests_with_a_short_blob_are_refused():
    pipe = tensor.build(None, manifest_of(SPEC), lambda inputs: [], tensor.Settings(), served_as=("pair", "1"),
                        max_batch=1)
    raw, header = binary(GOOD)
    batch = pipe.preprocess([{"body": raw[:-3]}], ["application/octet-stream"], [header])
    assert batch.results[0].status == 400 and "binary_data_size" in batch.results[0].message


@pytest.mark.parametrize("bad", [100, 1000, -1, -1000])
def test_token_ids_outside_the_declared_range_are_refused_up_front(model, bad):
    """`pair` declares its token ids as [0, 100) (the rows of its embedding): an id outside is that request's 400,
    naming the input, before it reaches the model; its neighbours are answered."""
    pipe, runner = pipeline(model)
    body = request(2, 4, seed=3)
    body["inputs"][1]["data"][5] = bad
    good = request(1, 4, seed=4)
    answers = pipe.process([{"body": good}, {"body": body}, {"body": good}], ["application/json"] * 3)
    refused = answers[1]
    assert isinstance(refused, RequestError) and refused.status == 400 and refused.oip
    assert "'tokens'" in refused.message and str(bad) in refused.message and "0 to 99" in refused.message
    for answer in (answers[0], answers[2]):
        assert not isinstance(answer, RequestError)
    assert sum(shape[0][0] for shape in runner.passes) == 2  # the good rows only


class FailsOn:
    """A runner that raises, as a model does on input it cannot run, whenever a pass holds a marked row."""

    def __init__(self, model, marker: float) -> None:
        self.inner, self.marker, self.calls = Counting(model), marker, 0

    def __call__(self, inputs):
        self.calls += 1
        if (inputs[0] == self.marker).any():
            raise RuntimeError("index out of range in self\nstack trace the client never sees")
        return self.inner(inputs)


def test_a_failing_pass_costs_only_the_requests_that_fail_alone(model):
    """When the model raises on a batch, its requests are run again one by one (Pipeline.isolate): the one that
    fails alone gets 422 with the model's first line, in the protocol's form; its neighbours get the answers they
    get alone."""
    from handlers.requests import Pipeline

    marker = 12345.0
    runner = FailsOn(model, marker)
    pipe = tensor.build(None, manifest_of(SPEC), runner, tensor.Settings(), served_as=("pair", "2.0"), max_batch=16)
    bad = request(1, 4, seed=5)
    bad["inputs"][0]["data"][0] = marker
    goods = [request(1, 4, seed=s) for s in (6, 7)]
    requests = [{"body": goods[0]}, {"body": bad}, {"body": goods[1]}]
    with pytest.raises(RuntimeError):
        pipe.process(requests, ["application/json"] * 3)
    answers = Pipeline.isolate(pipe, requests, ["application/json"] * 3)
    assert isinstance(answers[1], RequestError) and answers[1].status == 422 and answers[1].oip
    assert "index out of range in self" in answers[1].message and "stack trace" not in answers[1].message
    for good, answer in zip(goods, (answers[0], answers[2])):
        assert json.loads(answer) == json.loads(pipeline(model)[0].process([{"body": good}], ["application/json"])[0])


def test_a_broken_model_is_a_500_not_the_clients_fault(model):
    """A model that fails on its own stand-in input too is broken: the requests get 500, not a 4xx."""

    class Broken:
        def __call__(self, inputs):
            raise RuntimeError("the runtime lost its device")

    pipe = tensor.build(None, manifest_of(SPEC), Broken(), tensor.Settings(), served_as=("pair", "2.0"), max_batch=16)
    answers = pipe.isolate([{"body": request(1, 3, seed=8)}], ["application/json"])
    assert isinstance(answers[0], RequestError) and answers[0].status == 500 and answers[0].oip
