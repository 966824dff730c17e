"""Model updates with no failed request: `make deploy`, `make rollback`, and the fleet's rolling update.

On one server (TorchServe's management API, the management key, archives from the local model store only):

1. the newly built `<store>/<model>.mar` is checked against the sha256 its build recorded, and copied into the
   store as `<model>-<version>.mar` with that version in its MANIFEST (version: the first 8 hex digits of the
   archive's sha256, so deploying the same archive twice changes nothing);
2. it is registered beside the running version, with as many workers, and waited for until every worker is READY;
3. it becomes the default version: new requests go to it from that moment;
4. the old version drains (its job queue empty, then a grace for the batch its workers hold) and is unregistered.

Every version served is recorded in `<run dir>/deploys/<model>.json` (serve_config.control.deploys), each with an
archive holding exactly what was registered (the version `make serve` started with is copied into
`<run dir>/deploys/` on the first deploy), so `make rollback` goes back one version by the same four steps, and can
be repeated, and a restart serves the version that was the default before it.

Fleet: `rolling_update` replaces the replicas one at a time: drain it at the balancer (no new request; wait until
it holds none), update it as above, wait until it is READY, put it back in the rotation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zipfile
from pathlib import Path

import requests

from export.manifest import MAR_MANIFEST, archive_model, check_archive, copy_archive, write_archive_digest
from models.paths import FULL, ROOT
from serve_config.control import Server, ServerError, deploys
from serve_config.control.access import model_workers
from serve_config.control.lifecycle import SERVED_DIR

def archive_version(mar: Path) -> str:
    with zipfile.ZipFile(mar) as archive:
        return str(archive_model(archive)["modelVersion"])


def versioned_copy(source: Path, dest: Path, version: str) -> Path:
    """`source`, an archive already checked (check_archive), rewritten to `dest` with `version` in its MANIFEST
    (every other member unchanged), with its own sha256 record."""
    tmp = dest.with_name(dest.name + ".part")
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == MAR_MANIFEST:
                manifest = json.loads(data)
                manifest["model"]["modelVersion"] = version
                data = json.dumps(manifest, indent=2).encode()
            out.writestr(info, data)
    tmp.replace(dest)
    write_archive_digest(dest)
    return dest


class Rollout:
    """Version changes of one model on one server."""

    def __init__(self, server: Server, model: str, model_store: Path, *, drain_grace: float = 2.0,
                 timeout: float = 240.0) -> None:
        self.server, self.model, self.store = server, model, model_store.resolve()
        self.drain_grace, self.timeout = drain_grace, timeout
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

    def default_version(self) -> str:
        return str(self._api("GET", f"/models/{self.model}").json()[0]["modelVersion"])

    # -- history --
    def history(self) -> list[dict]:
        if entries := deploys.read_history(self.server.run_dir, self.model):
            return entries
        # The version the server started with, from the copy it kept at start (the store's file may have been
        # rebuilt since).
        version = self.default_version()
        url = next(v["modelUrl"] for v in self.versions() if str(v["modelVersion"]) == version)
        source = self.server.run_dir / SERVED_DIR / url
        if not source.exists() or archive_version(source) != version:
            raise ServerError(f"{source} does not hold version {version}, which is serving: cannot keep it for "
                              "rollback (was the server started by serve_config.control?)")
        kept = self.history_file.parent / f"{self.model}-{version}.mar"
        kept.parent.mkdir(parents=True, exist_ok=True)
        copy_archive(source, kept)
        entries = [{"version": version, "archive": str(kept)}]
        self._save(entries)
        return entries

    def _save(self, entries: list[dict]) -> None:
        deploys.write_history(self.server.run_dir, self.model, entries)

    # -- the steps --
    def _switch(self, archive: Path, version: str) -> dict:
        """Register `archive` (version `version`) beside the default, make it the default, drain and unregister
        the others. Returns what happened, with each step's seconds."""
        old = self.default_version()
        if old == version:
            return {"model": self.model, "version": version, "changed": False}
        url = deploys.versioned_name(self.model, version)
        in_store = self.store / url
        if in_store.exists():
            check_archive(in_store)
        else:
            copy_archive(archive, in_store)
        workers = max(1, len(model_workers(self.server, self.model)[0]))
        steps, t0 = {}, time.monotonic()
        registered = {str(v["modelVersion"]) for v in self.versions()}
        if version not in registered:
            self._api("POST", "/models", params={"url": url, "initial_workers": workers, "synchronous": "true"})
        self._wait_ready(version, workers)
        steps["register_ready_s"] = time.monotonic() - t0
        t1 = time.monotonic()
        self._api("PUT", f"/models/{self.model}/{version}/set-default")
        steps["set_default_s"] = time.monotonic() - t1
        t2 = time.monotonic()
        for other in sorted(registered - {version}):
            self._drain(other)
            self._api("DELETE", f"/models/{self.model}/{other}")
        steps["drain_unregister_s"] = time.monotonic() - t2
        return {"model": self.model, "from": old, "version": version, "changed": True,
                **{k: round(v, 2) for k, v in steps.items()}}

    def _wait_ready(self, version: str, workers: int) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
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
        source = source or self.store / f"{self.model}.mar"
        entries = self.history()
        version = check_archive(source)[:8]
        archive = self.history_file.parent / f"{self.model}-{version}.mar"
        if not archive.exists():
            versioned_copy(source, archive, version)
        result = self._switch(archive, version)
        if result["changed"]:
            self._save([e for e in entries if e["version"] != version] + [{"version": version, "archive": str(archive)}])
        return result

    def rollback(self) -> dict:
        """Serve the version before the current one again; the current one leaves the history."""
        entries = self.history()
        current = self.default_version()
        earlier = [e for e in entries if e["version"] != current]
        if not earlier:
            raise ServerError(f"{self.model}: no earlier version to roll back to (history: "
                              f"{[e['version'] for e in entries]})")
        target = earlier[-1]
        result = self._switch(Path(target["archive"]), target["version"])
        self._save(earlier)
        return result


def rolling_update(fleet, model: str, source: Path | None = None, *, drain_timeout: float = 60.0) -> list[dict]:
    """Update every replica of `fleet` (serve_config.fleet.Fleet) to the store's new archive of `model`, one at a
    time: drain it at the balancer, deploy, wait READY, back in the rotation. Each replica's result, in order."""
    from serve_config import fleet as fleets

    results = []
    for replica in fleet.replicas:
        t0 = time.monotonic()
        drained = fleets.drain(fleet, replica.name, timeout=drain_timeout)
        try:
            result = Rollout(replica.server, model, Path(fleet.model_store)).deploy(source)
        finally:
            fleets.set_state(fleet, replica.name, "ready")
        back = fleets.wait_status(fleet, {replica.name: "UP"}, timeout=30)
        results.append({"replica": replica.name, "drain_s": round(drained, 2), "back_up_s": round(back, 2),
                        "total_s": round(time.monotonic() - t0, 2), **result})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("deploy", "rollback", "fleet-update"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True)
        p.add_argument("--model-store", type=Path, default=FULL.model_store)
        p.add_argument("--run-dir", type=Path, default=ROOT / "run")
        p.add_argument("--fleet", type=Path, default=ROOT / "run" / "fleet")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "fleet-update":
            from serve_config.fleet import Fleet

            for row in rolling_update(Fleet.load(args.fleet.resolve()), args.model):
                print(json.dumps(row))
            return 0
        rollout = Rollout(Server.from_run_dir(args.run_dir.resolve()), args.model, args.model_store)
        result = rollout.deploy() if args.cmd == "deploy" else rollout.rollback()
        if result["changed"]:
            print(f"{args.model}: version {result['from']} -> {result['version']} (registered and READY in "
                  f"{result['register_ready_s']} s, old version drained and unregistered in "
                  f"{result['drain_unregister_s']} s)")
        else:
            print(f"{args.model}: version {result['version']} is already the default; nothing to do")
    except (ServerError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
