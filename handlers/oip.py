"""The Open Inference Protocol (KServe v2) inside our pipelines. Nothing here knows about TorchServe.

Our frontend plugin (handlers/frontend, OpenInferenceEndpoint) queues `POST /v2/models/<model>/infer` as the same
job TorchServe makes of a prediction, so an infer request reaches the pipeline beside native ones, in the same batch; it is told apart by its body, a
JSON object with `inputs`. This module turns such a body into named tensors (`parse`), with the binary
tensor extension (a JSON header of `Inference-Header-Content-Length` bytes, then each binary input's raw
bytes), and writes the infer response (`response`): JSON tensors, or, for the outputs a request asks so of (an
output's `binary_data`, or the request's `binary_data_output`, as Triton's clients send them), the same extension
the other way (`BinaryAnswer`). Problems are RequestErrors whose body is `{"error": "..."}`, the protocol's error
form, with a 4xx status.

Tensor data arrives flattened in row-major order (nested lists are accepted too); BYTES elements are JSON
strings, or raw bytes in the binary extension (each a 4-byte little-endian length, then the bytes).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from handlers.requests import RequestError, parse_json_body

HEADER_LENGTH = "inference-header-content-length"  # the binary tensor extension's header, lower case
RESPONSE_HEADER_LENGTH = "Inference-Header-Content-Length"  # the same header, as an answer spells it
NUMERIC = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
           "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
           "FP32": np.float32, "FP64": np.float64}
DATATYPES = (*NUMERIC, "BYTES")


def invalid(message: str, status: int = 400) -> RequestError:
    return RequestError(status, "InvalidInferRequest", message, oip=True)


@dataclass(frozen=True)
class Tensor:
    """One named tensor. Parsed from a request: numeric data as a NumPy array of `shape`, BYTES as a flat list of
    str (JSON) or bytes. For a response: row-major data as a flat list or a NumPy array of any layout."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1


@dataclass(frozen=True)
class InferRequest:
    """A parsed infer request: its id (echoed), its input tensors, the outputs asked for (None: all), and which of
    them to answer as raw bytes: the request's `binary_data_output` for all, an output's own `binary_data` first."""

    id: str | None
    inputs: tuple[Tensor, ...]
    outputs: tuple[str, ...] | None
    binary_default: bool = False
    binary: tuple[tuple[str, bool], ...] = ()  # (output name, binary_data) where an output says so itself
    parameters: Mapping[str, Any] = field(default_factory=dict)  # the request's own `parameters` (a kind's knobs)

    def wants_binary(self, output: str) -> bool:
        return dict(self.binary).get(output, self.binary_default)

    def only_input(self, model_input: str) -> Tensor:
        """The one input a single-input model takes (its name is not checked: clients name it freely)."""
        if len(self.inputs) != 1:
            raise invalid(f"this model takes one input ({model_input!r}); the request has {len(self.inputs)}")
        return self.inputs[0]

    def check_outputs(self, available: Sequence[str]) -> None:
        unknown = [name for name in self.outputs or () if name not in available]
        if unknown:
            raise invalid(f"unknown output {unknown[0]!r}; this model's outputs are {list(available)}")


def is_infer_request(body: Any) -> bool:
    """Whether a request body (as TorchServe hands it over) is an OIP infer request rather than a native one."""
    return isinstance(body, dict) and "inputs" in body


def _flatten(values: Any) -> list:
    if not isinstance(values, list):
        return [values]
    flat: list = []
    stack = [iter(values)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _shape(item: Mapping[str, Any], where: str) -> tuple[int, ...]:
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise invalid(f"{where}: 'shape' must be a list of non-negative integers, got {shape!r}")
    return tuple(shape)


def _split_bytes(raw: bytes, where: str) -> list[bytes]:
    """BYTES elements of the binary extension: each a 4-byte little-endian length, then that many bytes."""
    out, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise invalid(f"{where}: binary BYTES data ends inside an element's length prefix")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise invalid(f"{where}: binary BYTES element of {size} bytes runs past the data")
        out.append(raw[offset:offset + size])
        offset += size
    return out


def _tensor(item: Any, index: int, binary: memoryview, offset: int) -> tuple[Tensor, int]:
    """One input of the request, and the offset in the binary blob after it."""
    if not isinstance(item, dict):
        raise invalid(f"inputs[{index}] must be an object with name, shape, datatype and data")
    name = item.get("name")
    where = f"input {name!r}" if isinstance(name, str) else f"inputs[{index}]"
    if not isinstance(name, str) or not name:
        raise invalid(f"{where}: 'name' must be a non-empty string")
    datatype = item.get("datatype")
    if datatype not in DATATYPES:
        raise invalid(f"{where}: datatype {datatype!r} is not one of {list(DATATYPES)}")
    shape = _shape(item, where)
    count = math.prod(shape)
    parameters = item.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise invalid(f"{where}: 'parameters' must be an object")
    size = parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            raise invalid(f"{where}: binary_data_size {size!r} does not fit the {len(binary) - offset} bytes left "
                          "after the JSON header")
        raw = bytes(binary[offset:offset + size])
        offset += size
        if datatype == "BYTES":
            data: Any = _split_bytes(raw, where)
        else:
            dtype = np.dtype(NUMERIC[datatype]).newbyteorder("<")
            if size != count * dtype.itemsize:
                raise invalid(f"{where}: shape {list(shape)} of {datatype} needs {count * dtype.itemsize} bytes, "
                              f"binary_data_size is {size}")
            data = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))
    elif "data" in item:
        data = _flatten(item["data"])
        if datatype == "BYTES":
            if not all(isinstance(v, str) for v in data):
                raise invalid(f"{where}: BYTES data must be strings")
        else:
            if any(isinstance(v, (str, dict)) or v is None for v in data) or \
                    (datatype != "BOOL" and any(isinstance(v, bool) for v in data)):
                raise invalid(f"{where}: {datatype} data must be numbers")
            try:
                data = np.asarray(data, dtype=NUMERIC[datatype])
            except (ValueError, TypeError, OverflowError) as err:
                raise invalid(f"{where}: data is not {datatype}: {err}") from None
    else:
        raise invalid(f"{where}: no 'data' (and no binary_data_size)")
    if len(data) != count:
        raise invalid(f"{where}: shape {list(shape)} holds {count} values, data has {len(data)}")
    if datatype != "BYTES":
        data = data.reshape(shape)
    return Tensor(name, datatype, shape, data), offset


def parse(body: Any, binary: bytes = b"") -> InferRequest:
    """An infer request's JSON object (and, with the binary extension, the bytes after its header)."""
    if not isinstance(body, dict):
        raise invalid(f"an infer request is a JSON object, got {type(body).__name__}")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise invalid("'inputs' must be a non-empty list of tensors")
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise invalid(f"'id' must be a string, got {type(request_id).__name__}")
    request_id = request_id or None  # an empty id is none: over gRPC (proto3) an unset id arrives as ""
    binary_default = _flag(body.get("parameters"), "binary_data_output", "the request's parameters")
    outputs, flags = body.get("outputs"), []
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
            raise invalid("'outputs' must be a list of objects with a 'name'")
        for o in outputs:
            flag = _flag(o.get("parameters"), "binary_data", f"output {o['name']!r}'s parameters")
            if flag is not None:
                flags.append((o["name"], flag))
        outputs = tuple(o["name"] for o in outputs)
    tensors, offset, view = [], 0, memoryview(binary)
    for index, item in enumerate(inputs):
        tensor, offset = _tensor(item, index, view, offset)
        tensors.append(tensor)
    if offset != len(binary):
        raise invalid(f"{len(binary) - offset} bytes after the JSON header belong to no input")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise invalid(f"input names repeat: {names}")
    return InferRequest(request_id, tuple(tensors), outputs, bool(binary_default), tuple(flags),
                        dict(body.get("parameters") or {}))


def _flag(parameters: Any, key: str, where: str) -> bool | None:
    """A boolean parameter (None when absent) from a `parameters` object; other parameters are left alone."""
    if parameters is None:
        return None
    if not isinstance(parameters, dict):
        raise invalid(f"{where} must be an object")
    value = parameters.get(key)
    if value is not None and not isinstance(value, bool):
        raise invalid(f"{where}: {key} must be true or false, got {value!r}")
    return value


def parse_binary(raw: bytes, header_length: int) -> InferRequest:
    """A request in the binary tensor extension: `header_length` bytes of JSON, then the binary tensors."""
    if not 0 < header_length <= len(raw):
        raise invalid(f"Inference-Header-Content-Length {header_length} does not fit a body of {len(raw)} bytes")
    try:
        header = raw[:header_length].decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("the JSON header of the binary tensor request is not UTF-8") from None
    try:
        body = parse_json_body(header)
    except RequestError as err:
        raise invalid(err.message) from None
    return parse(body, raw[header_length:])


def header_length(headers: Mapping[str, Any] | None) -> int | None:
    """The binary extension's JSON header length from a request's headers, or None when it is not used."""
    for key, value in (headers or {}).items():
        if str(key).lower() == HEADER_LENGTH:
            try:
                return int(value)
            except (TypeError, ValueError):
                raise invalid(f"Inference-Header-Content-Length must be an integer, got {value!r}") from None
    return None


@dataclass(frozen=True)
class BinaryAnswer:
    """An infer response in the binary tensor extension: `header_length` bytes of JSON, then each binary output's
    raw bytes in the order the header lists them. It goes out as application/octet-stream with the
    Inference-Header-Content-Length header (RESPONSE_HEADER_LENGTH) set to `header_length`."""

    body: bytes
    header_length: int


def _flat_values(tensor: Tensor) -> list:
    """A response tensor's data as a flat row-major list (it is one already, or a NumPy array)."""
    return tensor.data.ravel().tolist() if isinstance(tensor.data, np.ndarray) else tensor.data


def raw_bytes(tensor: Tensor) -> bytes:
    """A tensor's data as the binary extension carries it: numeric values little-endian in row-major order;
    BYTES elements each as a 4-byte little-endian length, then the bytes (text as UTF-8)."""
    if tensor.datatype == "BYTES":
        items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in _flat_values(tensor)]
        return b"".join(struct.pack("<I", len(v)) + v for v in items)
    return np.ascontiguousarray(tensor.data, dtype=np.dtype(NUMERIC[tensor.datatype]).newbyteorder("<")).tobytes()


ANSWER_HEAD = '{"model_name": '  # how every infer response of response() begins
OUTPUTS_KEY = ', "outputs": ['


def with_id(answer: Any, request_id: str) -> Any:
    """An infer response (response()'s form) that has no id, given `request_id` as its id, as KServe's servers do
    when the request names none; any other answer unchanged. Only the answer's JSON head is read: its keys come in
    response()'s order (model_name, model_version, id, outputs)."""
    binary = isinstance(answer, BinaryAnswer)
    text = answer.body[:answer.header_length].decode("utf-8") if binary else answer
    if not isinstance(text, str) or not text.startswith(ANSWER_HEAD) or (cut := text.find(OUTPUTS_KEY)) < 0:
        return answer
    try:
        head = json.loads(text[:cut] + "}")
    except ValueError:
        return answer
    if "id" in head:
        return answer
    text = f"{text[:cut]}, \"id\": {json.dumps(request_id)}{text[cut:]}"
    if not binary:
        return text
    header = text.encode("utf-8")
    return BinaryAnswer(header + answer.body[answer.header_length:], len(header))


def response(model_name: str, model_version: str, request: InferRequest, outputs: Sequence[Tensor]) -> str | BinaryAnswer:
    """The infer response: the model, the request's id echoed, and the outputs asked for, in order; JSON, or a
    BinaryAnswer when the request asked for any output in binary."""
    chosen = {o.name: o for o in outputs}
    names = request.outputs if request.outputs is not None else [o.name for o in outputs]
    body: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        body["id"] = request.id
    entries, blobs = [], []
    for tensor in (chosen[n] for n in names):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if request.wants_binary(tensor.name):
            blobs.append(raw_bytes(tensor))
            entry["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            entry["data"] = _flat_values(tensor)
        entries.append(entry)
    body["outputs"] = entries
    if not blobs:
        return json.dumps(body)
    header = json.dumps(body).encode("utf-8")
    return BinaryAnswer(header + b"".join(blobs), len(header))
