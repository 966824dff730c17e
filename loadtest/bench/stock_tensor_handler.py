"""The peer for a tensor-kind model: TorchServe's stock BaseHandler, with the few lines a TorchServe user writes
for a model that takes named tensors, without us.

BaseHandler loads the TorchScript file onto the worker's device and runs it under torch.inference_mode; here
each request's JSON infer body is read with json and torch.tensor (no checks: a bad request fails its batch, as
such a handler's does), the rows of a batch are concatenated per input in the model's order, and each request
gets its own rows of every output back as JSON. No thread settings, no batching changes: TorchServe's defaults.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from ts.torch_handler.base_handler import BaseHandler


class StockTensorHandler(BaseHandler):
    def initialize(self, context) -> None:
        super().initialize(context)
        manifest = json.loads((Path(context.system_properties["model_dir"]) / "manifest.json").read_text())
        self.inputs = [(i["name"], getattr(torch, i["dtype"])) for i in manifest["inputs"]]
        self.outputs = manifest["outputs"]

    def preprocess(self, data):
        bodies = [row.get("body") or row.get("data") for row in data]
        bodies = [json.loads(b) if isinstance(b, (bytes, bytearray, str)) else b for b in bodies]
        given = [{i["name"]: i for i in body["inputs"]} for body in bodies]
        self.rows = [given_one[self.inputs[0][0]]["shape"][0] for given_one in given]
        return [torch.cat([torch.tensor(g[name]["data"], dtype=dtype).reshape(g[name]["shape"]) for g in given])
                for name, dtype in self.inputs]

    def inference(self, data, *args, **kwargs):
        with torch.inference_mode():
            out = self.model(*[t.to(self.device) for t in data])
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def postprocess(self, data):
        answers, start = [], 0
        for rows in self.rows:
            answers.append(json.dumps({"outputs": [
                {"name": name, "shape": list(o[start:start + rows].shape), "data": o[start:start + rows].cpu().reshape(-1).tolist()}
                for name, o in zip(self.outputs, data)]}))
            start += rows
        return answers
