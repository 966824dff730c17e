"""Model kinds: what a model does with a request, one module per kind.

A registry entry (models.registry) names its kind; everything specific to that kind lives in the kind's
module, and the generic code (the TorchServe adapter, export, verification, archiving, the control plane,
the test tiers) asks the kind instead of branching on its name. A kind module defines:

- `Settings`: its handler settings (a handlers.settings.HandlerSettings dataclass), the `handler:` section of
  the model-config YAML: limits per request and per batch, threads;
- `build(model_dir, export_manifest, runner, settings, *, served_as, max_batch) -> Pipeline`: the pure
  request pipeline (handlers.requests.Pipeline) that reads requests in the kind's native forms and as Open
  Inference Protocol infer requests, runs batches and writes answers and OIP outputs;
- `signature(export_manifest, settings) -> {"inputs", "outputs"}`: what an infer request takes and gives, each
  tensor's name, datatype and shape (-1: any size): the model metadata `GET /v2/models/<m>` answers, packed
  into the archive as `signature.json` (handlers/frontend serves it).

The one list of kinds, and what each declares besides its module (bench workload, comparison, metric, whether it
generates or lowers to a device), is models/kinds.py: below both the registry and these modules.

A kind may also define `compare(expected, got) -> figures`: how export verification compares an export's outputs
with eager's when elementwise differences say nothing useful (detections that may change order, class masks); the
registry entry's Tolerance bounds the figures. A kind with a metric (models/kinds.py) defines `scored(row)`: one
answer of its pipeline as its metric scores it, and `parse(answer)`: a native answer read back the same way.
"""
