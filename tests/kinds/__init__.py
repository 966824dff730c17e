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
  `native_errors`: the form of errors at the native route, "native" ({"code", "type", "message"}) or "oip".
"""

from __future__ import annotations

import importlib

from models import kinds


def checks(spec):
    """The `Checks` of the kind of registry entry `spec`."""
    module = importlib.import_module("tests.kinds." + kinds.get(spec.kind).module.rpartition(".")[2])
    return module.Checks(spec)
