"""Build the serving image with podman: `make image`.

    python -m serve_config.cluster.image build --tag torchserve-models:latest --models digits shapes minilm \
        --model-store model_store [--base localhost/debian:bookworm-slim]

1. Stage a small build context under build/image/context: the Containerfile, the variant's runtime lock (and uv's;
   VARIANTS: the CPU image's has no torch, and TorchServe's worker is patched by torch_free.py to start without it),
   the container's own files (entrypoint, probe, log4j2.xml, config.properties rendered by bundle.py) and the
   archives to bake in (checked against their recorded sha256; none with --models and nothing after it).
2. Make sure the base exists. `--base` names a local image; where podman has none by that name, it is built
   with `debootstrap --variant=minbase bookworm` from Debian's mirror and imported (no image registry needs
   to be reachable). Without --base the Containerfile's default, the public debian:bookworm-slim, is pulled.
3. `podman build`, with this machine's package indexes and CA bundle mounted read-only for pip where pip's
   own configuration names them (a local mirror, a proxy's CA); elsewhere pip uses PyPI.

podman runs with runc and the cgroupfs manager, and a containers.conf of ours (CONTAINERS_CONF) that sets no
default ulimits: crun and systemd cgroups are refused on hosts with hybrid cgroups, and the default nofile
limit cannot be raised inside an unprivileged sandbox. All of it is overridable by --podman.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from export.manifest import IntegrityError
from models.durable import write_atomic
from models.paths import ROOT
from serve_config.control import PLUGIN_JAR, PLUGINS_DIR
from serve_config.cluster.bundle import container_config, copy_archives

HERE = Path(__file__).resolve().parent / "image"
# Each variant's Containerfile target and runtime lock: `cpu` serves the models that run on ONNX Runtime, without
# torch (a seventh of the image with torch: docs/results.md); `cpu-torch` any model on CPU nodes; `cuda` any model on
# GPU nodes.
VARIANTS = {"cpu": ("cpu", "runtime-cpu.txt"), "cpu-torch": ("cpu", "runtime.txt"), "cuda": ("cuda", "runtime.txt")}
TORCH_FREE = ROOT / "serve_config" / "torch_free.py"
# The container's own files, as /opt/serve holds them: the entrypoint, the readiness probe (the control plane's one
# readiness, run as a script) and log4j2.xml.
OPT_SERVE = {"entrypoint.py": HERE / "entrypoint.py", "probe.py": ROOT / "serve_config" / "control" / "probe.py",
             "log4j2.xml": HERE / "log4j2.xml"}
CONTEXT = ROOT / "build" / "image" / "context"
CONTAINERS_CONF = ROOT / "build" / "image" / "containers.conf"
SECRETS = ROOT / "build" / "image" / "secrets"  # what a build mounts as secrets (mode 600), outside its context
PODMAN = "podman --runtime runc --cgroup-manager cgroupfs"
STORE_IN_IMAGE = Path("/home/model-server/model-store")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # Debian's, as the base image sets it
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"  # Debian's bundle of the host, a proxy's CA included where added


def podman_env() -> dict[str, str]:
    """The environment podman runs in: our containers.conf unless the caller chose one."""
    if "CONTAINERS_CONF" in os.environ:
        return dict(os.environ)
    CONTAINERS_CONF.parent.mkdir(parents=True, exist_ok=True)
    CONTAINERS_CONF.write_text("# Written by serve_config/cluster/image.py\n[containers]\ndefault_ulimits = []\n")
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def run(command: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", shlex.join(command), flush=True)
    return subprocess.run(command, check=True, env=podman_env(), **kwargs)


def containerfile_env(path: Path = HERE / "Containerfile", base_path: str = BASE_PATH) -> dict[str, str]:
    """The environment the Containerfile's ENV instructions give a container (later ones over earlier ones,
    $VAR expanded from what is set so far), for starting its command the same way outside the image."""
    env, text = {"PATH": base_path}, path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                key, value = pair.split("=", 1)
                env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)
    return env


def needing_torch(models: Sequence[str]) -> list[str]:
    """The models of `models` whose worker needs torch: a generating kind, or an archive served by a backend other
    than ONNX Runtime (TorchScript, AOTInductor)."""
    from models import kinds, registry

    return [name for name in models
            if kinds.get((entry := registry.entry(name)).kind).generates
            or not getattr(entry, "serve_artifact", "onnx").startswith("onnx")]


def stage(context: Path, models: Sequence[str], model_store: Path, lock: str = "runtime-cpu.txt") -> Path:
    """Lay out the build context: only what the image is made of."""
    if context.exists():
        shutil.rmtree(context)
    (context / "image").mkdir(parents=True)
    (context / "requirements").mkdir()
    (context / "model-store").mkdir()
    shutil.copy2(HERE / "Containerfile", context / "Containerfile")
    for name, source in OPT_SERVE.items():
        shutil.copy2(source, context / "image" / name)
    (context / "image" / "config.properties").write_text(container_config(STORE_IN_IMAGE))
    (context / "image" / "plugins").mkdir()  # the frontend's endpoint plugins (plugins_path in the config)
    shutil.copy2(PLUGINS_DIR / PLUGIN_JAR, context / "image" / "plugins" / PLUGIN_JAR)
    for name in ("uv.txt", lock):
        shutil.copy2(ROOT / "requirements" / name, context / "requirements" / name)
    shutil.copy2(TORCH_FREE, context / TORCH_FREE.name)
    copy_archives(model_store, models, context / "model-store")
    return context


def ensure_base(podman: list[str], name: str, mirror: str = DEBIAN_MIRROR) -> None:
    """Make sure podman has the image `name`: built with debootstrap and imported where it has not."""
    if subprocess.run([*podman, "image", "exists", name], env=podman_env()).returncode == 0:
        print(f"base image {name} is present")
        return
    if shutil.which("debootstrap") is None and not Path("/usr/sbin/debootstrap").exists():
        raise RuntimeError("debootstrap not found: apt-get install debootstrap (make prereqs-image)")
    with tempfile.TemporaryDirectory(prefix="bookworm-", dir=ROOT / "build" / "image") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), mirror], stdout=subprocess.DEVNULL)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        run([*podman, "import", "--change", "CMD /bin/bash", "-", name], stdin=tar.stdout, stdout=subprocess.DEVNULL)
        if tar.wait() != 0:
            raise RuntimeError("tar of the debootstrap root failed")


def pip_setting(key: str) -> list[str]:
    """A pip configuration value of this machine (index URLs, find-links, cert) as a list; [] where unset."""
    answer = subprocess.run([sys.executable, "-m", "pip", "config", "get", key], capture_output=True, text=True)
    return answer.stdout.split() if answer.returncode == 0 else []


def build_arguments(secrets_dir: Path = SECRETS) -> tuple[list[str], list[str]]:
    """(--build-arg / --secret ..., --volume ...): this machine's pip indexes and find-links, as the build secret
    `pip_indexes` (an index URL may hold credentials: a secret stays out of the image and its history, where a
    build argument would be kept), file indexes mounted read-only at the same paths, so the build installs the
    lock from the same files the venv did; and its CA bundle (pip's, else the system's), so pip trusts what the
    host trusts."""
    args, volumes = [], []
    indexes = pip_setting("global.extra-index-url")
    links = pip_setting("global.find-links")
    for url in indexes:
        if url.startswith("file://"):
            volumes.append(url[len("file://"):].rstrip("/").rsplit("/", 1)[0])  # the index's root, files included
    volumes.extend(links)
    lines = [f"index {url}" for url in indexes] + [f"links {path}" for path in links]
    secret = secrets_dir / "pip_indexes"
    secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(secret, "".join(f"{line}\n" for line in lines), mode=0o600)
    args += ["--secret", f"id=pip_indexes,src={secret}"]
    certs = [os.environ.get("PIP_CERT"), *pip_setting("global.cert"), os.environ.get("SSL_CERT_FILE"), HOST_CA]
    cert = next((c for c in certs if c and Path(c).is_file()), None)
    mounts = [f"{cert}:/run/host-ca.crt:ro"] if cert else []
    if cert:
        args += ["--build-arg", "PIP_CERT=/run/host-ca.crt"]
    mounts += [f"{path}:{path}:ro" for path in dict.fromkeys(volumes) if Path(path).is_dir()]
    return args, [flag for mount in mounts for flag in ("--volume", mount)]


def build(tag: str, models: Sequence[str], model_store: Path, *, base: str | None, podman: list[str],
          variant: str = "cpu") -> None:
    target, lock = VARIANTS[variant]
    if lock == VARIANTS["cpu"][1] and (torch := needing_torch(models)):
        raise RuntimeError(f"{', '.join(torch)} need torch, which the {variant} image leaves out: build "
                           "VARIANT=cpu-torch (or cuda), or leave them out of IMAGE_MODELS")
    context = stage(CONTEXT, models, model_store, lock)
    args, volumes = build_arguments()
    args += ["--build-arg", f"LOCK={lock}"]
    if base:
        ensure_base(podman, base)
        args += ["--build-arg", f"BASE_IMAGE={base}"]
    # docker format: OCI images have no HEALTHCHECK.
    run([*podman, "build", "--network", "host", "--format", "docker", "--target", target, "--tag", tag, *args,
         *volumes, "--file", str(context / "Containerfile"), str(context)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_build = sub.add_parser("build", help="stage the context and build the image")
    p_build.add_argument("--tag", required=True)
    p_build.add_argument("--models", nargs="*", default=[], help="archives to bake in (none: mount a store)")
    p_build.add_argument("--model-store", type=Path, required=True)
    p_build.add_argument("--base", help="a local base image, made with debootstrap when podman lacks it")
    p_build.add_argument("--variant", choices=tuple(VARIANTS), default="cpu",
                         help="cpu (ONNX Runtime models, no torch), cpu-torch (any model) or cuda (GPU nodes; "
                              "docs/deploy.md)")
    p_build.add_argument("--podman", default=PODMAN, help=f"the podman command line (default: {PODMAN})")
    args = parser.parse_args(argv)
    try:
        build(args.tag, args.models, args.model_store, base=args.base, podman=shlex.split(args.podman),
              variant=args.variant)
    except (IntegrityError, RuntimeError, OSError, subprocess.CalledProcessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"built {args.tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
