"""A version switch is smooth as well as failure-free: wrk (8 connections, its 2 s timeout) through one deploy and
one rollback of digits, beside a steady run of the same server in the same test. No error, no request without an
answer within 2 s, and the slowest request while switching at most 1 s slower than the slowest of the steady run
(loadtest/switch.py, `make switch-bench`). A slow proof: `make proofs`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from models.paths import ROOT
from tests.conftest import TREE, built

pytestmark = [pytest.mark.load, pytest.mark.integration, pytest.mark.slow, pytest.mark.proof]


def test_a_deploy_and_a_rollback_under_wrk_keep_every_request_within_a_second_of_usual(tmp_path):
    built(TREE.model_store / "digits.mar")
    run = subprocess.run([sys.executable, "-m", "loadtest.switch", "--model", "digits", "--model-store",
                          str(TREE.model_store), "--seconds", "15", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    print(run.stdout + run.stderr)
    figures = json.loads((tmp_path / "switch.json").read_text())
    switching = figures["switching"]
    assert switching["requests"] > 0 and figures["steady"]["requests"] > 0
    assert switching["errors"] == 0 and switching["timeout"] == 0, run.stdout
    assert figures["added_max_ms"] <= 1000, run.stdout
    assert run.returncode == 0, run.stdout + run.stderr
