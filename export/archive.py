"""Pack a verified export into a TorchServe archive with torch-model-archiver.

    python -m export.archive --model digits --artifacts artifacts/digits --out model_store

The .mar holds the artifact chosen by the registry's serve_backend, the handler and exactly the repository
modules it imports (models.sources follows its imports; nothing else of the tree: no training code, no
generators, no other model's code), the export manifest (preprocessing preset), the labels as
index_to_name.json and the model-config YAML from serve_config/. Refuses an export that has not passed
verification or whose files changed since. Writes <model>.mar.sha256 beside the archive.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from export import manifest as mf
from export.verify import STAMP
from models import durable, registry
from models.paths import ROOT, model_config
from models.sources import closure


def handler_modules(entry_points: list[Path]) -> list[Path]:
    """The repository files the entry points (a handler, and its kind's module) need, directly or not, but the
    handler itself (`entry_points[0]`, which goes in as the archive's entry point)."""
    return [path for path in closure(entry_points) if path != entry_points[0].resolve()]


SIGNATURE = "signature.json"  # read by the frontend's OIP endpoint (handlers/frontend) for model metadata
# The registry entry's example request, which the handler sends through its whole pipeline before the worker
# reports ready (handlers.adapter.warm_up_with_sample): its media type and body.
SAMPLE, SAMPLE_BODY = "sample.json", "sample.body"
# The OIP metadata's `platform`, by the served file's type.
PLATFORMS = {".onnx": "onnxruntime_onnx", ".pt": "pytorch_libtorch", ".pt2": "pytorch_aotinductor"}


def platform(serialized: Path) -> str:
    """The OIP metadata's platform for the served file, from its type."""
    return PLATFORMS.get(Path(serialized).suffix, "pytorch")


def signature(spec: registry.ModelSpec, manifest: dict, config: Path, serialized: Path) -> dict:
    """What the served model takes and gives over the OIP (its kind's `signature`, with the model-config YAML's
    handler settings), and its platform."""
    import yaml

    from models import kinds

    kind = kinds.load(spec.kind)
    settings = kind.Settings.from_mapping((yaml.safe_load(config.read_text()) or {}).get("handler"))
    return {"platform": platform(serialized), **kind.signature(manifest, settings)}


def stage_modules(staging: Path, entry_points: list[Path]) -> None:
    """A fresh staging folder holding the modules the handler imports, at their paths in this repository."""
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for module in handler_modules(entry_points):
        target = staging / module.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(module, target)


def stage(artifacts: Path, staging: Path, entry_points: list[Path], extra: tuple[Path, ...] = (),
          described: dict | None = None, sample: registry.ExampleRequest | None = None) -> Path:
    """Lay out the files beside the handler: the modules it needs, the export's assets (a tokenizer), the
    export manifest, the labels, the OIP signature (`described`), the example request (`sample`) and `extra`;
    torch-model-archiver copies the folder's contents."""
    stage_modules(staging, entry_points)
    manifest = mf.read(artifacts)
    shutil.copy2(artifacts / mf.MANIFEST, staging / mf.MANIFEST)
    for path in [*(artifacts / name for name in manifest.get("assets", {})), *extra]:
        shutil.copy2(path, staging / path.name)
    (staging / "index_to_name.json").write_text(json.dumps({str(i): label for i, label in enumerate(manifest["labels"])}))
    if described is not None:
        (staging / SIGNATURE).write_text(json.dumps(described, indent=1) + "\n")
    if sample is not None:
        (staging / SAMPLE_BODY).write_bytes(sample.body())
        (staging / SAMPLE).write_text(json.dumps({"content_type": sample.content_type, "body": SAMPLE_BODY}) + "\n")
    return staging


def pack(name: str, serialized: Path, handler: Path, staging: Path, config: Path, out: Path,
         *, version: str = "1.0") -> Path:
    """torch-model-archiver: one .mar named `name` in `out`, with its sha256 written beside it.

    The last good archive survives any failure: the new one is packed in a folder of its own inside `out` and
    moved over the old only once it is whole and on disk, its digest first. A pack that fails or is killed
    leaves `out/<name>.mar` and its digest as they were (and make, seeing the target unchanged, deletes
    nothing); one killed between the two moves leaves an archive older than its digest, which serving refuses
    and the next `make archive` replaces."""
    out.mkdir(parents=True, exist_ok=True)
    packing = Path(tempfile.mkdtemp(prefix=f".packing-{name}-", dir=out))
    try:
        subprocess.run(
            [str(Path(sys.executable).parent / "torch-model-archiver"), "--model-name", name, "--version", version,
             "--serialized-file", str(serialized), "--handler", str(handler), "--extra-files", str(staging),
             "--config-file", str(config), "--export-path", str(packing), "--force"],
            check=True,
        )
        new = packing / f"{name}.mar"
        digest = mf.write_archive_digest(new)
        mar = out / new.name
        durable.publish(digest, out / digest.name)
        durable.publish(new, mar)
    finally:
        shutil.rmtree(packing, ignore_errors=True)
    return mar


def verified_manifest(spec: registry.ModelSpec, artifacts: Path) -> dict:
    """The export manifest, once verification passed and no file changed since; else SystemExit."""
    manifest = mf.read(artifacts)
    stamp_path = artifacts / STAMP
    if not stamp_path.exists():
        raise SystemExit(f"{artifacts} is not verified: run `make verify MODEL={spec.name}` first")
    if json.loads(stamp_path.read_text())["manifest_sha256"] != mf.sha256(artifacts / mf.MANIFEST):
        raise SystemExit(f"{artifacts}/{mf.MANIFEST} changed after verification: verify again")
    mf.check_folder(artifacts, manifest)
    return manifest


def archive(spec: registry.ModelSpec, artifacts: Path, out: Path, *, config: Path, name: str | None = None,
            artifact: str | None = None, handler: str | None = None, staging: Path | None = None,
            serialized: Path | None = None, extra: tuple[Path, ...] = ()) -> Path:
    """Pack the verified export. By default: the registry's serve artifact and handler under the model's
    name; the bench and the sweep pass another name, artifact, handler or config to pack variants (or a
    `serialized` file of their own, with `extra` files, for a peer that loads the pretrained source)."""
    manifest = verified_manifest(spec, artifacts)
    serialized = serialized or artifacts / manifest["artifacts"][artifact or spec.serve_artifact]["file"]
    entry_points = registry.entry_points(spec, handler)
    staging = stage(artifacts, staging or ROOT / "build" / spec.name / "mar-extra", entry_points, extra,
                    signature(spec, manifest, config, serialized), spec.example)
    mar = pack(name or spec.name, serialized, entry_points[0], staging, config, out)
    print(f"{mar.stem}: {mar} ({mar.stat().st_size / 1e3:.0f} kB, {serialized.name}, handler {handler or spec.handler})")
    return mar


def archive_generator(checkpoint: Path, out: Path, *, config: Path, name: str, artifacts: Path | None = None,
                      kind: str = "generate", handler: str = "handlers/handler.py") -> Path:
    """Pack a generating model as `name`: the decoder its model-config YAML's `handler.backend` names as the
    serialized file (eager: the checkpoint's weights, the GGUF file or a state dict; program or aoti: that artifact
    of the verified decoder export in `artifacts`, export/decoder.py), its config, tokenizer and chat template beside
    the handler and the modules it needs, and a manifest naming the kind and the file. The YAML must turn on
    TorchServe's continuous batching, which the kind's scheduler needs."""
    import yaml

    from models import kinds
    from models.chat import FOLDER_FILES, weights_file

    values = yaml.safe_load(config.read_text()) or {}
    if values.get("continuousBatching") is not True:
        raise SystemExit(f"{config}: a generating model is served with `continuousBatching: true` (its scheduler "
                         "takes one decode step per call)")
    settings = kinds.load(kind).Settings.from_mapping(values.get("handler"))
    if settings.backend == "eager":
        weights = weights_file(checkpoint)
        served = {"checkpoint": {"file": weights.name, "sha256": mf.sha256(weights)}}
    else:
        if artifacts is None:
            raise SystemExit(f"{config} serves the {settings.backend} decoder: pass --artifacts, its verified export")
        entry = verified_decoder(artifacts, settings.backend)
        weights, served = artifacts / entry["file"], {settings.backend: entry}
    entry_points = [ROOT / handler, ROOT / kinds.module_file(kind)]
    staging = ROOT / "build" / name / "mar-extra"
    stage_modules(staging, entry_points)
    for file in FOLDER_FILES:
        shutil.copy2(checkpoint / file, staging / file)
    mf.write(staging, {"model": name, "kind": kind, "source": json.loads((checkpoint / "model.json").read_text()),
                       "artifacts": served, "assets": {file: mf.sha256(checkpoint / file) for file in FOLDER_FILES}})
    (staging / SIGNATURE).write_text(json.dumps({"platform": "pytorch", **kinds.load(kind).signature({}, settings)},
                                                indent=1) + "\n")
    mar = pack(name, weights, entry_points[0], staging, config, out)
    print(f"{mar.stem}: {mar} ({mar.stat().st_size / 1e6:.0f} MB, {kind}, {settings.backend} decoder, "
          f"handler {handler})")
    return mar


def verified_decoder(artifacts: Path, backend: str) -> dict:
    """The manifest entry of a decoder export's `backend` artifact, once export/decoder.py verified it and its
    files are still the ones it verified."""
    stamp_path = artifacts / STAMP
    if not stamp_path.exists():
        raise SystemExit(f"{artifacts} was not verified: run `python -m export.decoder` (make does)")
    manifest, stamp = mf.read(artifacts), json.loads(stamp_path.read_text())
    if stamp.get("manifest_sha256") != mf.sha256(artifacts / mf.MANIFEST) or backend not in stamp["artifacts"]:
        raise SystemExit(f"{artifacts}: its {backend} decoder is not the one verified: re-run `python -m export.decoder`")
    mf.check_folder(artifacts, manifest)
    return manifest["artifacts"][backend]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--artifacts", type=Path, required=True,
                        help="the model's verified export folder (a generator's: its decoder's)")
    parser.add_argument("--checkpoint", type=Path, help="a generator's checkpoint folder (registry.GENERATORS)")
    parser.add_argument("--config", type=Path,
                        help="model-config YAML (default serve_config/<model>.yaml, a generator's its entry's)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    spec = registry.entry(args.model)
    if isinstance(spec, registry.GeneratorSpec):
        if args.checkpoint is None:
            parser.error(f"{spec.name} is a generator: --checkpoint (its checkpoint folder) is required")
        archive_generator(args.checkpoint, args.out, config=args.config or model_config(spec.config), name=spec.name,
                          artifacts=args.artifacts, kind=spec.kind, handler=spec.handler)
        return 0
    archive(spec, args.artifacts, args.out, config=args.config or model_config(spec.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
