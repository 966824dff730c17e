"""TorchServe's configuration inside a container, and the model bundle KServe downloads.

    python -m serve_config.cluster.bundle --models digits --model-store model_store --out build/bundle/digits

A bundle is the storageUri layout KServe's TorchServe runtimes read:

    <out>/config/config.properties    addresses and ports the runtime expects, model_snapshot
    <out>/model-store/<model>.mar     the archives, checked against the sha256 their build recorded

model_snapshot registers each model at start-up with the workers, batch size, batch delay and response timeout
of the model-config YAML packed in its own archive, and the archive's version, so the snapshot cannot
disagree with the model it starts. The same config (without the snapshot, with load_models=all) is the image's
default (serve_config/cluster/image.py). Both derive from serve_config/config.properties: capacity, metrics and
request limits are the same as `make serve`'s; what differs is listed in CONTAINER below.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Sequence

import yaml

from export.manifest import ARCHIVE_DIGEST, IntegrityError, archive_model, copy_archive
from serve_config.control import TEMPLATE, Ports, render_config

PORTS = Ports(inference=8080, management=8081, metrics=8082, grpc_inference=7070, grpc_management=7071)
IMAGE_DIR = Path("/opt/serve")  # the image's own files: entrypoint, probe, log4j2.xml, config.properties
MOUNT = Path("/mnt/models")  # where KServe's storage initializer puts the storageUri's contents
CONFIG, STORE = Path("config/config.properties"), Path("model-store")
SNAPSHOT_KEYS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout")

# Container settings over the template's. Inference, its gRPC port and metrics listen on every address (the
# Service, the gateway and Prometheus reach them, fenced by the NetworkPolicy); management listens on the
# pod's loopback, where only the probes reach it. Token authorization is off: clients authenticate at the
# gateway in front of the replicas, since TorchServe draws its keys at random in each process and replicas
# cannot share them (docs/deploy.md). TS_DISABLE_TOKEN_AUTHORIZATION=false turns it back on; the probes
# follow. Registration over the API is off: a pod serves what it started with, a new version is a rollout.
CONTAINER = {
    "management_address": f"http://127.0.0.1:{PORTS.management}",
    "grpc_inference_address": "0.0.0.0",
    "disable_token_authorization": "true",
    "enable_model_api": "false",
    "vmargs": f"-Xmx1g -XX:+UseG1GC -XX:+ExitOnOutOfMemoryError -Djava.io.tmpdir=/tmp "
              f"-Dlog4j.configurationFile=file://{IMAGE_DIR}/log4j2.xml",
}


def archive_settings(mar: Path) -> tuple[str, dict]:
    """(version, model-config YAML) as packed in the archive: what TorchServe itself reads from it."""
    with zipfile.ZipFile(mar) as archive:
        model = archive_model(archive)
        config = yaml.safe_load(archive.read(model["configFile"])) if model.get("configFile") else {}
    return model.get("modelVersion", "1.0"), config or {}


def model_snapshot(model_store: Path, models: Sequence[str]) -> dict:
    """TorchServe's model_snapshot registering `models` from their archives, with each archive's own settings."""
    entries = {}
    for name in models:
        version, config = archive_settings(model_store / f"{name}.mar")
        missing = [key for key in SNAPSHOT_KEYS if key not in config]
        if missing:
            raise IntegrityError(f"{name}.mar's model-config YAML does not set {missing}")
        entries[name] = {version: {"defaultVersion": True, "marName": f"{name}.mar",
                                   **{key: config[key] for key in SNAPSHOT_KEYS}}}
    return {"name": "startup.cfg", "modelCount": len(entries), "models": entries}


def container_config(model_store: Path, *, snapshot: dict | None = None) -> str:
    """config.properties for a container whose archives are in `model_store`: every model there (load_models=all),
    or those of `snapshot`. Settings from the environment (TS_<KEY>) take precedence (enable_envvars_config)."""
    text = render_config(TEMPLATE, PORTS, model_store, host="0.0.0.0", overrides=CONTAINER, plugins=IMAGE_DIR / "plugins")
    header = ("# Rendered by serve_config/cluster/bundle.py from serve_config/config.properties for a container "
              "(docs/deploy.md).\n")
    extra = ["", "# Container: TS_<KEY> variables override these settings; what to load at start-up.",
             "enable_envvars_config=true"]
    extra.append(f"model_snapshot={json.dumps(snapshot, separators=(',', ':'))}" if snapshot else "load_models=all")
    return header + text + "\n".join(extra) + "\n"


def copy_archives(model_store: Path, models: Sequence[str], dest: Path) -> None:
    """Copy each model's archive into `dest` once it matches the sha256 its build recorded (the record itself
    stays behind: a bundle or an image holds the archives alone)."""
    for name in models:
        source = model_store / f"{name}.mar"
        if not source.exists():
            raise IntegrityError(f"{source} is missing: run `make archive MODEL={name}`")
        copy_archive(source, dest / source.name)
        (dest / f"{source.name}{ARCHIVE_DIGEST}").unlink()


def write_bundle(out: Path, models: Sequence[str], model_store: Path) -> Path:
    """Write the bundle of `models` (archives checked) to `out`, replacing what was there."""
    if out.exists():
        shutil.rmtree(out)
    (out / STORE).mkdir(parents=True)
    (out / CONFIG).parent.mkdir(parents=True)
    copy_archives(model_store, models, out / STORE)
    (out / CONFIG).write_text(container_config(MOUNT / STORE, snapshot=model_snapshot(out / STORE, models)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--model-store", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        write_bundle(args.out, args.models, args.model_store)
    except (IntegrityError, OSError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {CONFIG} and {STORE}/ with {', '.join(args.models)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
