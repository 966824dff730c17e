"""The tensor kind: named tensors in, named tensors out, for any exported model. Nothing here knows about
TorchServe, and nothing here knows about one model: the export manifest says what the model takes and gives.

Requests are Open Inference Protocol infer requests (handlers.oip), at `/v2/models/<m>/infer` or, with the same
body, at the native `/predictions/<m>`: JSON, or the binary tensor extension. Each request names every input of
the model once, in the model's datatype, batch first, every input with the same number of rows; `outputs` in
the request picks and orders the outputs of the answer (default: all, in the model's order). The answer is the
protocol's infer response with each output's rows of that request.

Batching: the rows of every request of a batch go through the model together, in passes of at most
`max_rows_per_pass` rows. Requests whose non-batch axes differ (a dynamic axis such as a sequence length) are
grouped by shape, one group per distinct shape, never padded: a padded row would change what a model that
reads that axis (a mean over it, an attention) computes, so grouping is what keeps every answer exactly what
the model gives for that request alone. Rows are independent in a model with a batch axis, so cutting a batch
into passes changes no answer.

Every problem is that request's own 4xx, in the protocol's `{"error": ...}` form: an unknown, missing or
repeated input, a datatype other than the model's, a shape that does not fit (wrong rank, a fixed axis of
another size, rows that differ between inputs), values that are NaN or infinite (`require_finite`), integers
outside the range the registry entry declares for that input (token ids past the vocabulary), more rows or values
than the settings allow (413). Neighbours in the batch are served as if it had come alone; and where the model
itself fails on a batch, the adapter runs its requests again one by one (handlers.requests.Pipeline.isolate).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from handlers import oip
from models.kinds import DATATYPES
from handlers.requests import Pipeline, RequestError, json_value, per_request, request_body
from handlers.settings import HandlerSettings

FLOATING = ("FP16", "FP32", "FP64")


@dataclass(frozen=True)
class TensorConfig(HandlerSettings):
    """A tensor model's settings (the `handler:` section of its model-config YAML): the budget of one request
    (rows, values over all its inputs, the largest size of a dynamic axis) and of one forward pass (rows)."""

    max_rows_per_request: int = 256
    max_values_per_request: int = 1_000_000
    max_dynamic_axis: int = 4096  # the export's dynamic axes go up to 4096
    max_rows_per_pass: int = 256  # at most the largest verified batch
    require_finite: bool = True  # refuse NaN and infinities in floating inputs

    @property
    def rows_per_pass(self) -> int:
        return self.max_rows_per_pass


@dataclass(frozen=True)
class Port:
    """One input or output of the model: its name, protocol datatype and shape (-1 for a dynamic axis)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    value_range: tuple[int, int] | None = None  # [low, high) of an integer input, where the entry declares it


def model_inputs(export_manifest: Mapping[str, Any]) -> list[Port]:
    """The model's inputs from its export manifest (dtype, example shape, dynamic axes)."""
    ports = []
    for item in export_manifest["inputs"]:
        dynamic = {int(axis) for axis in item.get("dynamic_axes", {"0": "batch"})}
        shape = tuple(-1 if axis in dynamic else size for axis, size in enumerate(item["example_shape"]))
        value_range = tuple(item["value_range"]) if item.get("value_range") is not None else None
        ports.append(Port(item["name"], DATATYPES[item["dtype"]], shape, value_range))
    return ports


@dataclass
class Parsed:
    """One request's input arrays in the model's order, its row count and the parsed infer request."""

    arrays: list[np.ndarray]
    rows: int
    request: oip.InferRequest

    @property
    def group(self) -> tuple:
        return tuple(a.shape[1:] for a in self.arrays)


@dataclass
class TensorBatch:
    results: list  # per request: a RequestError, or None until answered
    parsed: dict[int, Parsed] = field(default_factory=dict)


class TensorModel(Pipeline[TensorBatch, dict]):
    """preprocess (parse, check against the model's inputs) -> run (grouped forward passes) -> postprocess."""

    def __init__(self, runner: Callable[[Sequence[np.ndarray]], list[np.ndarray]], inputs: Sequence[Port],
                 outputs: Sequence[str], config: TensorConfig, *, served_as: tuple[str, str] = ("model", "1")) -> None:
        self.runner, self.inputs, self.outputs, self.config = runner, list(inputs), list(outputs), config
        self.served_as = served_as

    # -- one request -------------------------------------------------------------------------------------------

    def parse(self, request: Mapping[str, Any], content_type: str, header_length: int | None) -> Parsed:
        if header_length is not None:
            body = request_body(request, content_type)
            infer = oip.parse_binary(bytes(body) if isinstance(body, (bytes, bytearray)) else b"", header_length)
        else:
            body = request_body(request, content_type)
            try:
                value = body if isinstance(body, dict) else json_value(request, content_type)  # dict: parsed already
            except RequestError as err:
                raise err.as_oip() from None
            if not oip.is_infer_request(value):
                raise oip.invalid("send an Open Inference Protocol infer request: a JSON object with \"inputs\" "
                                  f"{[{'name': p.name, 'datatype': p.datatype, 'shape': list(p.shape)} for p in self.inputs]}"
                                  " (to /v2/models/<model>/infer or /predictions/<model>), or its binary form",
                                  status=415 if content_type and content_type != "application/json" else 400)
            infer = oip.parse(value)
        infer.check_outputs(self.outputs)
        return self.check(infer)

    def check(self, infer: oip.InferRequest) -> Parsed:
        """The request's tensors against the model's inputs; RequestError (OIP form) for the first misfit."""
        given = {t.name: t for t in infer.inputs}
        unknown = [name for name in given if name not in {p.name for p in self.inputs}]
        if unknown:
            raise oip.invalid(f"unknown input {unknown[0]!r}; this model's inputs are {[p.name for p in self.inputs]}")
        missing = [p.name for p in self.inputs if p.name not in given]
        if missing:
            raise oip.invalid(f"missing input {missing[0]!r}; this model takes {[p.name for p in self.inputs]}")
        arrays, rows, values = [], None, 0
        for port in self.inputs:
            tensor = given[port.name]
            if tensor.datatype != port.datatype:
                raise oip.invalid(f"input {port.name!r} is {tensor.datatype}; this model takes {port.datatype}")
            shape = tensor.shape
            if len(shape) != len(port.shape) or any(want not in (-1, got) for want, got in zip(port.shape, shape)):
                raise oip.invalid(f"input {port.name!r} has shape {list(shape)}; this model takes {list(port.shape)} "
                                  "(-1: any size)")
            if rows is None:
                rows = shape[0]
            elif shape[0] != rows:
                raise oip.invalid(f"input {port.name!r} has {shape[0]} rows, input {self.inputs[0].name!r} has {rows}; "
                                  "every input has one row per example")
            dynamic = [got for want, got in zip(port.shape[1:], shape[1:]) if want == -1]
            if any(size < 1 for size in dynamic):
                raise oip.invalid(f"input {port.name!r} has shape {list(shape)}: a dynamic axis of size 0")
            if any(size > self.config.max_dynamic_axis for size in dynamic):
                raise oip.invalid(f"input {port.name!r} has shape {list(shape)}; dynamic axes take at most "
                                  f"{self.config.max_dynamic_axis}", status=413)
            values += math.prod(shape)
            if port.datatype in FLOATING and self.config.require_finite and not np.isfinite(tensor.data).all():
                raise oip.invalid(f"input {port.name!r} holds NaN or infinite values; this model takes finite values")
            if port.value_range is not None and tensor.data.size:
                low, high = port.value_range
                least, most = int(tensor.data.min()), int(tensor.data.max())
                if least < low or most >= high:
                    raise oip.invalid(f"input {port.name!r} holds {least if least < low else most}; this model takes "
                                      f"values from {low} to {high - 1}")
            arrays.append(tensor.data)
        if not rows:
            raise oip.invalid("the request has no rows")
        if rows > self.config.max_rows_per_request:
            raise oip.invalid(f"the request has {rows} rows; at most {self.config.max_rows_per_request} per request",
                              status=413)
        if values > self.config.max_values_per_request:
            raise oip.invalid(f"the request holds {values} values; at most {self.config.max_values_per_request} per "
                              "request", status=413)
        return Parsed(arrays, rows, infer)

    # -- a batch -----------------------------------------------------------------------------------------------

    def preprocess(self, requests: Sequence[Mapping[str, Any]], content_types: Sequence[str],
                   header_lengths: Sequence[int | None] | None = None) -> TensorBatch:
        lengths = list(header_lengths) if header_lengths is not None else [None] * len(requests)
        batch = TensorBatch([None] * len(requests))
        for idx, (request, content_type, length) in enumerate(zip(requests, content_types, lengths, strict=True)):
            parsed = per_request(idx, "parsing", self.parse, request, content_type, length)
            if isinstance(parsed, RequestError):
                batch.results[idx] = parsed if parsed.oip else parsed.as_oip()
            else:
                batch.parsed[idx] = parsed
        return batch

    def forward(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One group's rows, in passes of at most `max_rows_per_pass`; the outputs' rows in order."""
        rows, step = arrays[0].shape[0], self.config.max_rows_per_pass
        passes = [self.runner([np.ascontiguousarray(a[i:i + step]) for a in arrays]) for i in range(0, rows, step)]
        return [np.concatenate([p[o] for p in passes]) for o in range(len(self.outputs))]

    def run(self, batch: TensorBatch) -> dict:
        """Per request index, its outputs: each group of same-shaped requests in one set of passes."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for idx, parsed in batch.parsed.items():
            groups[parsed.group].append(idx)
        answers: dict[int, list[np.ndarray]] = {}
        for members in groups.values():
            stacked = [np.concatenate([batch.parsed[i].arrays[k] for i in members]) for k in range(len(self.inputs))]
            outputs, start = self.forward(stacked), 0
            for i in members:
                rows = batch.parsed[i].rows
                answers[i] = [o[start:start + rows] for o in outputs]
                start += rows
        return answers

    def postprocess(self, batch: TensorBatch, outputs: dict) -> list[str | oip.BinaryAnswer | RequestError]:
        results = list(batch.results)
        for idx, parsed in batch.parsed.items():
            results[idx] = per_request(idx, "answering", self.answer, parsed.request, outputs[idx])
            if isinstance(results[idx], RequestError):
                results[idx] = results[idx].as_oip()
        return results

    def refusal(self, batch: TensorBatch, error: RequestError) -> RequestError:
        """Every answer of this kind is in the protocol's form."""
        return error.as_oip()

    def answer(self, request: oip.InferRequest, arrays: Sequence[np.ndarray]) -> str | oip.BinaryAnswer:
        named = [oip.Tensor(name, DATATYPES[a.dtype.name], tuple(a.shape), a)
                 for name, a in zip(self.outputs, arrays, strict=True)]
        return oip.response(*self.served_as, request, named)

    def warm_up(self) -> None:
        """One pass of one example row (dynamic axes at size 1)."""
        self.runner([np.zeros([1 if size == -1 else size for size in p.shape], dtype=oip.NUMERIC[p.datatype])
                     for p in self.inputs])


Settings = TensorConfig


def signature(export_manifest: dict, settings: TensorConfig) -> dict:
    """The model's own inputs and outputs, as OIP model metadata lists them (-1: a dynamic axis)."""
    return {"inputs": [{"name": p.name, "datatype": p.datatype, "shape": list(p.shape)}
                       for p in model_inputs(export_manifest)],
            "outputs": [{"name": o["name"], "datatype": DATATYPES[o["dtype"]], "shape": o["shape"]}
                        for o in export_manifest["output_specs"]]}


def build(model_dir, export_manifest: dict, runner: Callable[[Sequence[np.ndarray]], list[np.ndarray]],
          settings: TensorConfig, *, served_as: tuple[str, str], max_batch: int) -> TensorModel:
    """The kind's pipeline: inputs and outputs from the export manifest, nothing from the model's own code."""
    return TensorModel(runner, model_inputs(export_manifest), export_manifest["outputs"], settings,
                       served_as=served_as)
