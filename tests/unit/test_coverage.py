"""Every model `make test` builds is covered by each tier that checks it end to end: parity (export),
the handler in-process, and real serving. A model of a new kind that no tier's parametrization picks up
fails here, by name."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import BUILT, ROOT

TIERS = {"parity": "tests/export/test_parity.py", "handler": "tests/handler", "serving": "tests/integration"}


@pytest.fixture(scope="module")
def collected() -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           *TIERS.values()], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [line for line in proc.stdout.splitlines() if "::" in line]


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("spec", BUILT, ids=lambda s: s.name)
def test_each_built_model_is_covered_by_each_tier(collected, tier, spec):
    ids = [line for line in collected if line.startswith(TIERS[tier])]
    assert ids, f"no test collected in {TIERS[tier]}"
    mine = [line for line in ids if f"[{spec.name}]" in line or f"-{spec.name}]" in line or f"[{spec.name}-" in line]
    assert mine, f"{spec.name} is in the registry but no {tier} test ({TIERS[tier]}) is parametrized with it"
