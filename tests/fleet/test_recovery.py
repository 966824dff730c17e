"""No deploy is lost: `make deploy`, `make rollback` and the rolling update killed at every step (SIGKILL, sent by
the command itself at SERVE_FAULT_AT=<step>: serve_config.rollout.STEPS), then the next command. Each ends with
the server on exactly one version, the one its history records, serving it; the lock refuses a second command;
retention keeps the last versions. A slow proof: `make proofs`, after `make test`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from export.manifest import check_archive, copy_archive
from loadtest.payloads import payloads
from models.paths import ROOT
from serve_config import control as ts
from serve_config import fleet as fleets
from serve_config.control import deploys
from serve_config.rollout import FAULT_ENV, STEPS, Rollout, versioned_copy
from tests.ops.servers import serving, store_with

pytestmark = [pytest.mark.fleet, pytest.mark.integration, pytest.mark.slow, pytest.mark.proof]
MODEL = "digits"
COMMITTED = STEPS.index("recorded")  # killed at this step or later, the command has happened


def rebuild(store: Path, tag: str) -> str:
    """A new build of the store's archive (other bytes: `tag` in its MANIFEST), as `make archive` leaves it; the
    version a deploy of it gets."""
    fresh = versioned_copy(store / f"{MODEL}.mar", store / "next" / f"{MODEL}.mar", tag)
    copy_archive(fresh, store / f"{MODEL}.mar")
    return check_archive(store / f"{MODEL}.mar")[:8]


def command(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV} | ({FAULT_ENV: fault} if fault else {})
    return subprocess.run([sys.executable, "-m", "serve_config.rollout", *args, "--model", MODEL], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def assert_serves_only(server: ts.Server, store: Path, version: str) -> None:
    """The server's default and only version is `version`, as its history's last entry; the store holds that
    archive whole; requests are answered by it."""
    rollout = Rollout(server, MODEL, store)
    assert rollout.default_version() == version
    assert rollout.registered() == {version}
    assert deploys.read_history(server.run_dir, MODEL)[-1]["version"] == version
    if version != "1.0":
        check_archive(store / deploys.versioned_name(MODEL, version))
    payload = payloads(MODEL, 1)[0]
    answer = requests.post(f"{server.inference_url}/predictions/{MODEL}", data=payload.body, timeout=60,
                           headers={"Content-Type": payload.content_type, **server.headers()})
    assert answer.status_code == 200 and answer.headers["X-Model-Version"] == version, answer.text


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("recovery"), MODEL) as instance:
        yield instance


def on(server: ts.Server, store: Path) -> list[str]:
    return ["--run-dir", str(server.run_dir), "--model-store", str(store)]


@pytest.mark.parametrize("step", STEPS)
def test_a_deploy_killed_at_each_step_is_recovered_by_the_next_command(served, step):
    """Killed, then `make recover`: back on the old version before the commit, on the new one after it."""
    server, store = served
    before = Rollout(server, MODEL, store).default_version()
    new = rebuild(store, f"deploy-{step}")
    killed = command("deploy", *on(server, store), fault=step)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    recovered = command("recover", *on(server, store))
    assert recovered.returncode == 0, recovered.stderr
    print(f"\ndeploy killed at {step}: {recovered.stdout.strip()}")
    assert_serves_only(server, store, new if STEPS.index(step) >= COMMITTED else before)
    done = command("deploy", *on(server, store))
    assert done.returncode == 0, done.stderr
    assert_serves_only(server, store, new)


# Killed at these steps, a rollback leaves the server unlike its history (two versions registered, or the default
# not the history's); at the others the server matches one history or the other.
UNLIKE_HISTORY = {"registered", "recorded", "default"}


@pytest.mark.parametrize("step", [s for s in STEPS if s != "kept"])
def test_a_rollback_killed_at_each_step_is_recovered_by_the_next_command(served, step):
    """Killed, then the next deploy (no `recover` first): it puts the server back on its history and says so, then
    deploys. Before its commit the rollback did not happen, after it it did; either way the deploy of the version
    rolled back from ends on that version, with the same history as before."""
    server, store = served
    if len(deploys.read_history(server.run_dir, MODEL)) < 2:
        rebuild(store, f"before-rollback-{step}")
        assert command("deploy", *on(server, store)).returncode == 0
    history = deploys.read_history(server.run_dir, MODEL)
    killed = command("rollback", *on(server, store), fault=step)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    after = [e["version"] for e in deploys.read_history(server.run_dir, MODEL)]
    committed = [e["version"] for e in history[:-1]]
    assert after == (committed if STEPS.index(step) >= COMMITTED else [e["version"] for e in history])
    again = command("deploy", *on(server, store))
    assert again.returncode == 0, again.stderr
    print(f"\nrollback killed at {step}, then deploy: {again.stdout.strip()}")
    assert ("an interrupted command was recovered first" in again.stdout) == (step in UNLIKE_HISTORY), again.stdout
    assert_serves_only(server, store, history[-1]["version"])
    assert deploys.read_history(server.run_dir, MODEL) == history


def test_a_second_command_is_refused_while_a_deploy_holds_the_model(served):
    server, store = served
    with deploys.lock(server.run_dir, MODEL, "deploy"):
        refused = command("rollback", *on(server, store))
    assert refused.returncode == 1 and "DeployInProgress" not in refused.stdout
    assert f"cannot roll back while another command changes its versions (deploy by PID {os.getpid()}" in refused.stderr


def test_retention_keeps_the_last_versions_in_the_history_the_run_directory_and_the_store(served):
    server, store = served
    for i in range(3):
        rebuild(store, f"retention-{i}")
        assert command("deploy", *on(server, store), "--keep", "2").returncode == 0
    history = deploys.read_history(server.run_dir, MODEL)
    assert len(history) == 2
    kept = {f"{MODEL}-{e['version']}.mar" for e in history}
    assert {p.name for p in (server.run_dir / deploys.DEPLOYS_DIR).glob("*.mar")} == kept
    assert {p.name for p in store.glob(f"{MODEL}-*.mar")} == kept
    rolled = command("rollback", *on(server, store), "--keep", "2")
    assert rolled.returncode == 0 and f"-> {history[0]['version']}" in rolled.stdout, rolled.stdout + rolled.stderr
    assert "no earlier version" in command("rollback", *on(server, store)).stderr


@pytest.mark.parametrize("step", ["drained", "registered", "default"])
def test_a_rolling_update_killed_midway_is_finished_by_the_next_one(tmp_path, step):
    store = store_with(tmp_path, MODEL)
    fleet = fleets.launch(tmp_path / "fleet", 2, [MODEL], model_store=store, isolation="loopback")
    try:
        new = rebuild(store, f"rolling-{step}")
        args = ["--fleet", str(tmp_path / "fleet"), "--model-store", str(store)]
        killed = command("fleet-update", *args, fault=step)
        assert killed.returncode == -9, killed.stdout + killed.stderr
        done = command("fleet-update", *args)
        assert done.returncode == 0, done.stderr
        fleets.wait_status(fleet, {r.name: "UP" for r in fleet.replicas}, timeout=60)
        for replica in fleet.replicas:
            assert_serves_only(replica.server, store, new)
    finally:
        fleets.shutdown(tmp_path / "fleet")
