"""Model updates on one server: deploy and roll back under Locust load, with no failed request and every answer
from exactly one version; registration from the local store only, with the management key."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile

import pytest
import requests

from loadtest.run import Run, by_name
from models.paths import ROOT
from serve_config import control as ts
from serve_config.rollout import Rollout, archive_version, versioned_copy
from tests.ops.servers import serving, store_with

pytestmark = [pytest.mark.fleet, pytest.mark.integration, pytest.mark.slow]
MODEL = "digits"


@pytest.fixture
def served(tmp_path):
    with serving(tmp_path, MODEL) as instance:
        yield instance


def test_a_versioned_copy_changes_only_the_manifest_version(tmp_path):
    store = store_with(tmp_path, MODEL)
    copy = versioned_copy(store / f"{MODEL}.mar", tmp_path / "copy.mar", "abc123")
    assert archive_version(copy) == "abc123" and archive_version(store / f"{MODEL}.mar") == "1.0"
    with zipfile.ZipFile(store / f"{MODEL}.mar") as a, zipfile.ZipFile(copy) as b:
        assert a.namelist() == b.namelist()
        assert all(a.read(n) == b.read(n) for n in a.namelist() if n != "MAR-INF/MANIFEST.json")
    ts.check_archive(copy)


def test_deploy_and_rollback_under_load_fail_no_request(served, tmp_path):
    """The load runs from before the deploy until after the rollback (stopped then, not timed beforehand)."""
    server, store = served
    rollout = Rollout(server, MODEL, store)
    locust = Run(MODEL, server.inference_url, server.keys()["inference"], users=6, duration=None, out=tmp_path,
                 by_version=True)
    try:
        locust.wait_flowing(50)
        deployed = rollout.deploy()
        assert rollout.default_version() == deployed["version"] != "1.0"
        locust.wait_flowing(50)  # answers from the deployed version
        again = rollout.deploy()  # the same archive: nothing to do
        rolled = rollout.rollback()
        locust.wait_flowing(20)
    finally:
        summary = locust.stop()
    names = by_name(locust.stats_csv)
    print(f"\ndeploy {deployed}\nrollback {rolled}\nunder load: {summary.line()}; per version: {names}")
    assert not again["changed"]
    assert rolled["changed"] and rolled["version"] == "1.0" and rolled["from"] == deployed["version"]
    assert summary.failures == 0, summary.line()
    assert {name.rsplit("version=", 1)[1] for name in names} == {"1.0", deployed["version"]}, names
    assert [str(v["modelVersion"]) for v in rollout.versions()] == ["1.0"]
    with pytest.raises(ts.ServerError, match="no earlier version"):
        rollout.rollback()


def test_deploy_after_the_store_archive_was_rebuilt_keeps_what_was_served_for_rollback(served):
    """`make archive` rewrites <store>/<model>.mar under a running server; the version it started with is kept
    from the server's own copy, so rollback returns exactly those bytes."""
    server, store = served
    original = ts.check_archive(store / f"{MODEL}.mar")
    rebuilt = versioned_copy(store / f"{MODEL}.mar", store / "rebuilt.mar", "1.0")  # other bytes, same version
    shutil.move(rebuilt, store / f"{MODEL}.mar")
    shutil.move(store / "rebuilt.mar.sha256", store / f"{MODEL}.mar.sha256")
    (store / f"{MODEL}.mar.sha256").write_text((store / f"{MODEL}.mar.sha256").read_text().replace("rebuilt", MODEL))
    rollout = Rollout(server, MODEL, store)
    rollout.deploy()
    rollout.rollback()
    kept = json.loads(rollout.history_file.read_text())[0]
    assert kept["version"] == "1.0" and ts.check_archive(store / f"{MODEL}-1.0.mar") == original


def test_make_deploy_needs_the_management_key(served):
    """The CLI behind `make deploy`; with the inference key in place of the management key it is refused."""
    server, store = served
    keys = json.loads((server.run_dir / ts.KEY_FILE).read_text())
    keys["management"]["key"] = keys["inference"]["key"]
    (server.run_dir / ts.KEY_FILE).write_text(json.dumps(keys))
    done = subprocess.run([sys.executable, "-m", "serve_config.rollout", "deploy", "--model", MODEL, "--run-dir",
                           str(server.run_dir), "--model-store", str(store)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and "401" in done.stderr, done.stderr
    answer = requests.get(f"{server.management_url}/models/{MODEL}/all",
                          headers={"Authorization": f"Bearer {keys['inference']['key']}"}, timeout=10)
    assert answer.status_code == 401
