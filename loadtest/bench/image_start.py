"""Pull to ready: what a node that has never seen the serving image pays before a replica answers, for each image
given, side by side in one run.

    python -m loadtest.bench.image_start --images localhost/torchserve-models:latest localhost/torchserve-models:latest-cpu-torch
    # `make image-bench` (the images `make image` built for VARIANT=cpu and VARIANT=cpu-torch)

Per image: `podman save` to a docker archive (what a registry would send, uncompressed), then, into a podman
storage of its own that holds nothing yet (a fresh node), `podman load` of that archive and `podman run` of the
image, with its ports moved to free loopback ones, until its readiness probe (the image's HEALTHCHECK command)
passes. Prints the archive's size, the load, the start to ready, and the sum; the storage is removed after.
A registry pull adds the transfer, which scales with the archive's size (compressed on the wire).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serve_config.cluster import image as im
from serve_config.control import Ports

PROBE = ["/opt/venv/bin/python", "/opt/serve/probe.py", "ready"]


def podman(base: list[str], *args: str, timeout: float = 1200, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*base, *args], capture_output=True, text=True, timeout=timeout, check=check,
                          env=im.podman_env())


def measure(tag: str, podman_cmd: list[str], work: Path, *, timeout: float = 600) -> dict:
    archive = work / "image.tar"
    podman(podman_cmd, "save", "--format", "docker-archive", "--output", str(archive), tag)
    fresh = [*podman_cmd, "--root", str(work / "root"), "--runroot", str(work / "runroot")]
    started = time.monotonic()
    podman(fresh, "load", "--input", str(archive))
    loaded = time.monotonic()
    ports = Ports.free()
    env = {"TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{ports.inference}",
           "TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{ports.management}",
           "TS_METRICS_ADDRESS": f"http://127.0.0.1:{ports.metrics}",
           "TS_GRPC_INFERENCE_PORT": str(ports.grpc_inference), "TS_GRPC_MANAGEMENT_PORT": str(ports.grpc_management)}
    name = f"pull-to-ready-{ports.inference}"
    podman(fresh, "run", "--detach", "--name", name, "--network", "host", "--tmpfs", "/tmp:rw,mode=1777",
           *(flag for key, value in env.items() for flag in ("--env", f"{key}={value}")), tag)
    try:
        while podman(fresh, "exec", name, *PROBE, check=False, timeout=60).returncode != 0:
            running = podman(fresh, "inspect", "--format", "{{.State.Running}}", name).stdout.strip()
            if running != "true" or time.monotonic() - loaded > timeout:
                logs = podman(fresh, "logs", name, check=False)
                raise RuntimeError(f"{tag} did not become ready: {(logs.stdout + logs.stderr)[-2000:]}")
            time.sleep(0.5)
        ready = time.monotonic()
    finally:
        podman(fresh, "rm", "--force", "--time", "5", name, check=False)
        podman(fresh, "rmi", "--all", "--force", check=False)
    return {"image": tag, "archive_bytes": archive.stat().st_size, "load_s": round(loaded - started, 1),
            "start_to_ready_s": round(ready - loaded, 1), "pull_to_ready_s": round(ready - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="+", required=True)
    parser.add_argument("--podman", default=im.PODMAN)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the archive and the fresh storage go (a file system podman's overlay driver can "
                             "use; the repository's may not be)")
    args = parser.parse_args(argv)
    rows = []
    for tag in args.images:
        args.work.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="pull-to-ready-", dir=args.work))
        try:
            rows.append(measure(tag, shlex.split(args.podman), work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        row = rows[-1]
        print(f"{tag}: archive {row['archive_bytes'] / 1e9:.2f} GB, load {row['load_s']} s, start to ready "
              f"{row['start_to_ready_s']} s, pull to ready {row['pull_to_ready_s']} s", flush=True)
    if len(rows) > 1:
        base = rows[0]
        for row in rows[1:]:
            print(f"{row['image']} over {base['image']}: archive x{row['archive_bytes'] / base['archive_bytes']:.2f}, "
                  f"pull to ready x{row['pull_to_ready_s'] / base['pull_to_ready_s']:.2f}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
