"""AOTInductor as a serving backend: the digits export's AOTInductor package, packed as an archive of its own, served
by a real TorchServe in batches and answering as the eager model does; and the same package moved to a host it was
not compiled for (another torch, a CPU without its instruction-set extensions) refused by the handler, saying what
to rebuild."""

from __future__ import annotations

import json
import zipfile

import pytest
import requests

from export.archive import archive
from loadtest.payloads import payloads
from models import registry
from models.paths import model_config
from models.runtime import HostMismatch, aoti_build_host
from tests.conftest import TREE, ClassifierReference, built, post_together

pytestmark = pytest.mark.integration

NAME = "digits_aoti"


@pytest.fixture(scope="module")
def aoti_store(tmp_path_factory):
    """A model store holding digits packed with its AOTInductor package (the registry's `aoti` backend)."""
    import torch

    spec = registry.get("digits")
    work = tmp_path_factory.mktemp("aoti")
    artifacts = built(TREE.artifacts(spec.name))
    recorded = json.loads((artifacts / "manifest.json").read_text())["artifacts"]["aoti"]["built_for"]
    assert recorded == aoti_build_host(torch.device("cpu"))
    archive(spec, artifacts, work / "store", config=model_config("digits"), name=NAME, artifact="aoti",
            staging=work / "staging")
    return work / "store"


def test_the_aoti_package_is_served_in_batches_and_answers_as_eager(aoti_store, tmp_path):
    from serve_config.control import Ports, start, stop

    samples = payloads("digits", 12)
    server = start(tmp_path / "run", [NAME], ports=Ports.free(), model_store=aoti_store)
    try:
        answers = post_together(server, [(NAME, s.body, {"Content-Type": s.content_type}) for s in samples])
        metadata = requests.get(f"{server.inference_url}/v2/models/{NAME}", headers=server.headers(), timeout=30)
        model_log = (server.run_dir / "logs" / "model_log.log").read_text(errors="replace")
    finally:
        stop(tmp_path / "run")
    assert [a.status_code for a in answers] == [200] * len(samples), [a.text for a in answers]
    reference = ClassifierReference("digits")
    for answer, sample in zip(answers, samples):
        reference.assert_matches(answer.json(), sample.body)
    assert metadata.status_code == 200 and metadata.json()["platform"] == "pytorch_aotinductor"
    assert f"{NAME} (image-classifier) ready on cpu with AotiRunner" in model_log


@pytest.mark.parametrize("moved", [{"torch": "2.13.0"}, {"isa": ["avx512_fp16", "amx_tile", "no_such_extension"]}],
                         ids=["other-torch", "other-cpu"])
def test_a_package_compiled_for_another_host_is_refused_with_what_to_rebuild(aoti_store, tmp_path, moved):
    """The archive unpacked as TorchServe's loader does, its build record changed as a package built elsewhere would
    carry: the handler's initialize() refuses it before loading any native code."""
    from tests.handler.test_handler_inprocess import initialize

    model_dir = tmp_path / NAME
    with zipfile.ZipFile(aoti_store / f"{NAME}.mar") as mar:
        mar.extractall(model_dir)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest["artifacts"]["aoti"]["built_for"].update(moved)
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HostMismatch) as info:
        initialize(NAME, model_dir)
    message = str(info.value)
    assert message.startswith("model.aoti.pt2 cannot run on this host: it was compiled ")
    assert "`make export verify archive MODEL=digits`" in message
