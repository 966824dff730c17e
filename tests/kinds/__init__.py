"""What the test tiers check of a served model, per kind: one module per kind, named as the kind's own module
(handlers/kinds/<name>.py -> tests/kinds/<name>.py), each with a `Checks` class. A tier parametrized over every
served model asks `checks(spec)` and never branches on the kind.

`Checks(spec)` answers:
- `assert_native(payloads, answers)`: served native answers equal the model's offline reference;
- `same(a, b)`: two answers to one request agree (gRPC against REST);
- `oip_inputs(payloads, binary=)`: the payloads as OIP input tensors, (name, datatype, array) each;
- `assert_oip(outputs, native)`: a client's decoded infer outputs equal the native answers to the same rows;
- `some_outputs`: a subset of the outputs, in an order other than the model's, to ask for;
- `good_infer(payload)`: an infer request of two rows; `json_forms(payload)`: the JSON bodies a client with no
  media type (gRPC) may send: a native one (None for a kind whose native form is the infer request) and an infer one;
- `bad_matrix(handler, max_request)`, `oip_matrix(handler)`: bad requests and the status each must get;
  `native_errors`: the form of errors at the native route, "native" ({"code", "type", "message"}) or "oip";
- optionally `handler`: handler settings the test tiers serve the kind's models with, over their model config's
  (`handler_settings`, `model_store`); `infer_samples(count)`: payloads whose answers in OIP's JSON form stay
  within the answer bound (`infer_samples`; by default the model's payloads); and `assert_verified(figures,
  tolerance)` for a kind verified by its own figures (its handlers/kinds module's `compare`).

A test of what one kind does picks its models with `models_of(kind module)`, never with the kind's name.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from models import kinds
from models.paths import model_config_values


def module_of(kind: str) -> str:
    """The last part of the name of a kind's module ("classify" for handlers/kinds/classify.py)."""
    return kinds.get(kind).module.rpartition(".")[2]


def models_of(module: str, among) -> list:
    """The entries of `among` whose kind lives in handlers/kinds/<module>.py."""
    if module not in {module_of(kind) for kind in kinds.KINDS}:
        raise KeyError(f"no kind lives in handlers/kinds/{module}.py")
    return [spec for spec in among if module_of(spec.kind) == module]


def _checks_class(spec):
    return importlib.import_module("tests.kinds." + module_of(spec.kind)).Checks


def checks(spec):
    """The `Checks` of the kind of registry entry `spec`."""
    return _checks_class(spec)(spec)


def infer_samples(spec, count: int) -> list:
    """`count` payloads of `spec` to send as OIP infer requests answered in JSON (tests/kinds' `infer_samples`)."""
    from loadtest.payloads import payloads

    own = getattr(_checks_class(spec), "infer_samples", None)
    return own(checks(spec), count) if own is not None else payloads(spec.name, count)


def handler_settings(spec) -> dict:
    """The handler settings the test tiers serve `spec` with: its model-config YAML's, with its kind Checks'
    `handler` changes."""
    return {**model_config_values(spec.name)["handler"], **getattr(_checks_class(spec), "handler", {})}


def model_store(specs, work: Path, tree) -> Path:
    """A model store serving `specs` as the test tiers do: the build tree's own when no kind of theirs changes a
    handler setting, else one in `work` with those archives packed again with the changed settings (the others
    copied as built)."""
    changed = [spec for spec in specs if handler_settings(spec) != model_config_values(spec.name)["handler"]]
    if not changed:
        return tree.model_store
    from export.archive import archive
    from export.manifest import copy_archive

    store = work / "store"
    store.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        if spec in changed:
            config = work / f"{spec.name}.yaml"
            config.write_text(yaml.safe_dump({**model_config_values(spec.name), "handler": handler_settings(spec)}))
            archive(spec, tree.artifacts(spec.name), store, config=config, staging=work / f"{spec.name}-staging")
        else:
            copy_archive(tree.archive(spec.name), store / tree.archive(spec.name).name)
    return store
