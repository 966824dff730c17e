"""Model updates with no failed request: `make deploy`, `make rollback`, and the fleet's rolling update.

On one server (TorchServe's management API, the management key, archives from the local model store only):

1. the newly built `<store>/<model>.mar` is checked against the sha256 its build recorded, and kept in the run
   directory as `<model>-<version>.mar` with that version in its MANIFEST (version: the first 8 hex digits of the
   archive's sha256, so deploying the same archive twice changes nothing), and put into the store as well;
2. it is registered beside the running version, with as many workers, and waited for until it is ready (the one
   readiness, serve_config/control/probe.py) with every worker READY;
3. the history records it as the default (the commit point: serve_config/control/deploys.py);
4. it becomes the default version: new requests go to it from that moment;
5. the old version drains (its job queue empty, then a grace for the batch its workers hold) and is unregistered;
   the history keeps the last KEEP versions, and the older archives are deleted.

`make rollback` goes back one version by the same steps, and can be repeated; a restart serves the history's
version. One command at a time changes a model (a lock; a second one is refused). A command killed at any step
leaves the server on the old version or on the new one, and the next command first puts the server back on the
history's version (`reconcile`), then does its own work. Tests kill a command at each step: SERVE_FAULT_AT=<step>
makes it SIGKILL itself there (STEPS).

Fleet: `rolling_update` replaces the replicas one at a time: drain it at the balancer (no new request; wait until
it holds none), update it as above, wait until it is READY, put it back in the rotation. A rolling update killed
midway leaves some replicas updated and at most one drained; the next `make fleet-update` finishes it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import zipfile
from pathlib import Path

import requests
import yaml

from export.manifest import MAR_MANIFEST, ArchiveError, archive_model, check_archive, write_archive_digest
from models import durable
from models.paths import FULL, ROOT
from serve_config.control import Server, ServerError, deploys, model_workers, ready
from serve_config.control.lifecycle import register

FAULT_ENV = "SERVE_FAULT_AT"
# Where a command can be killed, in order: the archive kept, then in the store; the new version registered and
# ready; the history written; the new version the default; the old ones unregistered. A rolling update adds
# "drained" (a replica out of the balancer's rotation) before each replica's steps.
STEPS = ("kept", "in-store", "registered", "recorded", "default", "retired")


def step(name: str) -> None:
    """A step of a command is done: with SERVE_FAULT_AT=<name> the command is killed here (SIGKILL, as a crash or
    an operator's `kill -9` would), so tests show the next command recovers from every step."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def archive_version(mar: Path) -> str:
    with zipfile.ZipFile(mar) as archive:
        return str(archive_model(archive)["modelVersion"])


def versioned_copy(source: Path, dest: Path, version: str, *, handler: dict | None = None) -> Path:
    """`source`, an archive already checked (check_archive), rewritten to `dest` with `version` in its MANIFEST
    and (given `handler`) these settings in its model-config YAML's `handler:` section (every other member
    unchanged), with its own sha256 record."""
    with zipfile.ZipFile(source) as src:
        config_name = archive_model(src).get("configFile")
    if handler and not config_name:
        raise ArchiveError(f"{source}: no model-config YAML to change")
    with durable.replacing(dest) as tmp:
        with zipfile.ZipFile(source) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
            for info in src.infolist():
                data = src.read(info.filename)
                if info.filename == MAR_MANIFEST:
                    manifest = json.loads(data)
                    manifest["model"]["modelVersion"] = version
                    data = json.dumps(manifest, indent=2).encode()
                elif handler and info.filename == config_name:
                    config = yaml.safe_load(data) or {}
                    config["handler"] = {**(config.get("handler") or {}), **handler}
                    data = yaml.safe_dump(config, sort_keys=False).encode()
                out.writestr(info, data)
    write_archive_digest(dest)
    return dest


class Rollout:
    """Version changes of one model on one server."""

    def __init__(self, server: Server, model: str, model_store: Path, *, drain_grace: float = 2.0,
                 timeout: float = 240.0, keep: int = deploys.KEEP) -> None:
        self.server, self.model, self.store = server, model, model_store.resolve()
        self.drain_grace, self.timeout, self.keep = drain_grace, timeout, keep
        self.history_file = deploys.history_file(server.run_dir, model)

    # -- management API --
    def _api(self, method: str, path: str, **kwargs) -> requests.Response:
        with self.server.network():
            answer = requests.request(method, f"{self.server.management_url}{path}", timeout=self.timeout,
                                      headers=self.server.headers("management"), **kwargs)
        if not answer.ok:
            raise ServerError(f"{method} {path} answered {answer.status_code}: {answer.text.strip()[:300]}")
        return answer

    def versions(self) -> list[dict]:
        """Every registered version of the model, as the management API describes them."""
        return self._api("GET", f"/models/{self.model}/all").json()

    def registered(self) -> set[str]:
        return {str(v["modelVersion"]) for v in self.versions()}

    def default_version(self) -> str:
        return str(self._api("GET", f"/models/{self.model}").json()[0]["modelVersion"])

    # -- history --
    def history(self) -> list[dict]:
        if entries := deploys.read_history(self.server.run_dir, self.model):
            return entries
        # The version the server started with, from the copy it kept at start (the store's file may have been
        # rebuilt since).
        version = self.default_version()
        source = deploys.started_copy(self.server.run_dir, self.model)
        if not source.exists() or archive_version(source) != version:
            raise ServerError(f"{source} does not hold version {version}, which is serving: cannot keep it for "
                              "rollback (was the server started by serve_config.control?)")
        kept = deploys.kept_archive(self.server.run_dir, self.model, version)
        deploys.place(source, kept)
        entries = [{"version": version, "archive": str(kept)}]
        self._save(entries)
        return entries

    def _save(self, entries: list[dict]) -> None:
        deploys.write_history(self.server.run_dir, self.model, entries)

    def reconcile(self) -> dict | None:
        """Put the server back on its history after a command was killed midway: the history's last version the
        default, and the only one registered. What that took (as `_switch` says), or None when nothing was needed."""
        entries = deploys.read_history(self.server.run_dir, self.model)
        if not entries:
            return None
        target = entries[-1]
        if self.default_version() == target["version"] and self.registered() == {target["version"]}:
            return None
        return self._switch(Path(target["archive"]), target["version"], entries)

    # -- the steps --
    def _switch(self, archive: Path, version: str, entries: list[dict]) -> dict:
        """Make `version` (kept in `archive`) the only version served: register it beside the default and wait
        until it is ready, record `entries` as the history (the commit), make it the default, drain and unregister
        the others, drop what the history no longer keeps. Returns what happened, with each step's seconds."""
        old, registered = self.default_version(), self.registered()
        if old == version and registered == {version}:
            self._save(deploys.retain(self.server.run_dir, self.model, self.store, entries, self.keep))
            return {"model": self.model, "version": version, "changed": False}
        url = deploys.versioned_name(self.model, version)
        deploys.place(archive, self.store / url)
        step("in-store")
        workers = max(1, len(model_workers(self.server, self.model)[0]))
        steps, t0 = {}, time.monotonic()
        if version not in registered:  # not synchronously (register says why); _wait_ready polls
            register(self.server, url, workers, timeout=self.timeout)
        step("registered")
        self._wait_ready(version, workers)
        steps["register_ready_s"] = time.monotonic() - t0
        self._save(entries)
        step("recorded")
        t1 = time.monotonic()
        if old != version:
            self._api("PUT", f"/models/{self.model}/{version}/set-default")
        step("default")
        steps["set_default_s"] = time.monotonic() - t1
        t2 = time.monotonic()
        for other in sorted(registered - {version}):
            self._drain(other)
            self._api("DELETE", f"/models/{self.model}/{other}")
        steps["drain_unregister_s"] = time.monotonic() - t2
        step("retired")
        self._save(deploys.retain(self.server.run_dir, self.model, self.store, entries, self.keep))
        return {"model": self.model, "from": old, "version": version, "changed": True,
                **{k: round(v, 2) for k, v in steps.items()}}

    def _wait_ready(self, version: str, workers: int) -> None:
        """Until `version` is ready (the one readiness) with `workers` READY workers: the capacity it replaces."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if ready(self.server, [self.model], version=version)[0]:
                described = self._api("GET", f"/models/{self.model}/{version}").json()[0]
                if sum(w.get("status") == "READY" for w in described.get("workers", [])) >= workers:
                    return
            time.sleep(0.2)
        raise ServerError(f"{self.model} version {version} has no {workers} READY workers after {self.timeout:.0f}s")

    def _drain(self, version: str) -> None:
        """Wait until `version`'s job queue has stayed empty for the grace (its workers finish what they hold)."""
        deadline, empty_since = time.monotonic() + self.timeout, None
        while time.monotonic() < deadline:
            described = self._api("GET", f"/models/{self.model}/{version}").json()[0]
            pending = described.get("jobQueueStatus", {}).get("pendingRequests", 0)
            now = time.monotonic()
            empty_since = (empty_since or now) if pending == 0 else None
            if empty_since is not None and now - empty_since >= self.drain_grace:
                return
            time.sleep(0.1)
        raise ServerError(f"{self.model} version {version} did not drain in {self.timeout:.0f}s")

    def deploy(self, source: Path | None = None) -> dict:
        """Serve the store's newly built archive (or `source`) as the model's default version."""
        with deploys.lock(self.server.run_dir, self.model, "deploy"):
            recovered = self.reconcile()
            source = source or self.store / f"{self.model}.mar"
            entries = self.history()
            version = check_archive(source)[:8]
            archive = deploys.kept_archive(self.server.run_dir, self.model, version)
            try:
                check_archive(archive)
            except (ArchiveError, OSError):  # not kept yet, or a copy a killed command left half-written
                versioned_copy(source, archive, version)
            step("kept")
            entries = [e for e in entries if e["version"] != version] + [{"version": version, "archive": str(archive)}]
            return {**self._switch(archive, version, entries), "recovered": recovered}

    def recover(self) -> dict | None:
        """Only put the server back on its history (what deploy and rollback do first anyway)."""
        with deploys.lock(self.server.run_dir, self.model, "recover"):
            return self.reconcile()

    def rollback(self) -> dict:
        """Serve the version before the current one again; the current one leaves the history."""
        with deploys.lock(self.server.run_dir, self.model, "roll back"):
            recovered = self.reconcile()
            entries = self.history()
            if len(entries) < 2:
                raise ServerError(f"{self.model}: no earlier version to roll back to (history: "
                                  f"{[e['version'] for e in entries]})")
            earlier = entries[:-1]
            target = earlier[-1]
            return {**self._switch(Path(target["archive"]), target["version"], earlier), "recovered": recovered}


def rolling_update(fleet, model: str, source: Path | None = None, *, drain_timeout: float = 60.0,
                   keep: int = deploys.KEEP) -> list[dict]:
    """Update every replica of `fleet` (serve_config.fleet.Fleet) to the store's new archive of `model`, one at a
    time: drain it at the balancer, deploy, wait READY, back in the rotation. Each replica's result, in order."""
    from serve_config import fleet as fleets

    results = []
    with deploys.lock(Path(fleet.root), model, "update the fleet"):
        for replica in fleet.replicas:
            t0 = time.monotonic()
            drained = fleets.drain(fleet, replica.name, timeout=drain_timeout)
            step("drained")
            try:
                result = Rollout(replica.server, model, Path(fleet.model_store), keep=keep).deploy(source)
            finally:
                fleets.set_state(fleet, replica.name, "ready")
            back = fleets.wait_status(fleet, {replica.name: "UP"}, timeout=30)
            results.append({"replica": replica.name, "drain_s": round(drained, 2), "back_up_s": round(back, 2),
                            "total_s": round(time.monotonic() - t0, 2), **result})
    return results


def say(model: str, result: dict) -> str:
    """One line of what a deploy or rollback did (and what it recovered first)."""
    lines = []
    if recovered := result.get("recovered"):
        lines.append(f"{model}: an interrupted command was recovered first: back on version {recovered['version']}")
    if result["changed"]:
        lines.append(f"{model}: version {result['from']} -> {result['version']} (registered and READY in "
                     f"{result['register_ready_s']} s, old version drained and unregistered in "
                     f"{result['drain_unregister_s']} s)")
    else:
        lines.append(f"{model}: version {result['version']} is already the default; nothing to do")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("deploy", "rollback", "recover", "fleet-update"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True)
        p.add_argument("--model-store", type=Path, default=FULL.model_store)
        p.add_argument("--run-dir", type=Path, default=ROOT / "run")
        p.add_argument("--fleet", type=Path, default=ROOT / "run" / "fleet")
        p.add_argument("--keep", type=int, default=deploys.KEEP, help="versions each history keeps (retention)")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "fleet-update":
            from serve_config.fleet import Fleet

            for row in rolling_update(Fleet.load(args.fleet.resolve()), args.model, keep=args.keep):
                print(json.dumps(row))
            return 0
        rollout = Rollout(Server.from_run_dir(args.run_dir.resolve()), args.model, args.model_store, keep=args.keep)
        if args.cmd == "recover":
            done = rollout.recover()
            print(f"{args.model}: " + (f"back on version {done['version']}, as its history says" if done
                                       else "the server matches its history; nothing to do"))
        else:
            print(say(args.model, rollout.deploy() if args.cmd == "deploy" else rollout.rollback()))
    except (ServerError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
