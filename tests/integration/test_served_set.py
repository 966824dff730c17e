"""The generic tiers hold for any kind served by default, not only for the kinds of today's defaults: every test
parametrized over the served models (tests/conftest.py's SERVED, each asking its kind's Checks in tests/kinds) runs
in a pytest of its own with the scene models (the object-detector and image-segmenter kinds, opt-in today) served
as default ones beside the defaults ($TEST_SERVED), and passes for each of them; none skips."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from models import registry
from tests.conftest import ROOT, SERVED, TREE, built
from tests.kinds import models_of

pytestmark = [pytest.mark.integration, pytest.mark.proof]

ADDED = [spec for module in ("detect", "segment") for spec in models_of(module, registry.REGISTRY.values())]


def test_every_generic_tier_passes_with_the_scene_models_served_by_default(tmp_path):
    assert ADDED and not {s.name for s in ADDED} & {s.name for s in SERVED}, "the scene models are defaults already"
    for spec in [*SERVED, *ADDED]:
        built(TREE.archive(spec.name))
    report = tmp_path / "report.xml"
    names = " or ".join(spec.name for spec in ADDED)
    # the tests whose parameters name an added model, but for the scene kinds' own tests (run by the main tiers);
    # the proofs stay out (this is one), and so does the image's tier
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests", "--ignore=tests/container", "-p", "no:cacheprovider", "-q",
         "-m", "not proof", "-k", f"({names}) and not scene", f"--junitxml={report}"],
        cwd=ROOT, env={**os.environ, "TEST_SERVED": " ".join(s.name for s in [*SERVED, *ADDED])},
        capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    cases = ET.parse(report).getroot().iter("testcase")
    ran: dict[str, set[str]] = {}
    for case in cases:
        assert case.find("skipped") is None, (case.get("name"), case.find("skipped").get("message"))
        model = next(spec.name for spec in ADDED if f"[{spec.name}" in case.get("name") or f"-{spec.name}" in case.get("name"))
        ran.setdefault(case.get("classname"), set()).add(model)  # module-level tests: the module
    print("\n" + "\n".join(f"{module}: {sorted(models)}" for module, models in sorted(ran.items())))
    # the generic tiers: native, OIP, gRPC, metadata, bad input, Locust, the C++ runner, the registry's sources
    for module in ("tests.integration.test_oip", "tests.integration.test_grpc", "tests.integration.test_oip_metadata",
                   "tests.ops.test_bad_input", "tests.load.test_locust_smoke", "tests.export.test_native",
                   "tests.unit.test_registry", "tests.unit.test_sources"):
        assert ran.get(module) == {spec.name for spec in ADDED}, (module, ran.get(module))
