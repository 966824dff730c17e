"""A scene model scored through the running server (`make evaluate MODEL=shapes-detector`), beside the same score
offline: the two must agree within a tolerance (0.005).

Each held-out scene (models/scenes.py, the split the model's training scored) goes to the server as a PNG, over
HTTP, at the native route; the answers (detections, or the PNG class mask) are scored by models/scene_metrics.py
(pycocotools' mAP through torchmetrics, or torchmetrics' mean IoU). Offline, the eager checkpoint answers the same
scenes and the kind's own post-processing applies the served settings (the score threshold and the most
detections per image from serve_config/<model>.yaml), so the two figures measure the same thing, and differ only
by what serving changes: the exported backend, batching, decoding and the way back to the image's pixels.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import requests
from PIL import Image

from models import kinds, registry
from models.paths import current, model_config_values


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def from_answer(kind: str, answer: Any):
    """A native answer -> what scene_metrics scores: (boxes, scores, labels) or a class mask (the kind's `parse`)."""
    return kinds.load(kind).parse(answer)


def served(url: str, model: str, headers: dict[str, str], scenes: Sequence, *, threads: int = 4) -> list:
    """Each scene's answer from the server, in order (a few requests in flight, so the server batches them)."""
    session = requests.Session()

    def ask(scene):
        response = session.post(f"{url}/predictions/{model}", data=png(scene.image), timeout=120,
                                headers={**headers, "Content-Type": "image/png"})
        if response.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {response.status_code}: {response.text[:500]}")
        return response.json()

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(ask, scenes))


def eager_pipeline(spec: registry.ModelSpec, checkpoint_dir: Path, handler: dict, *, max_batch: int = 1):
    """The kind's serving pipeline (handlers/kinds) in-process, with the eager checkpoint as its model and `handler`
    as its settings: the reference a served answer is held to."""
    from export.export import input_records
    from models import checkpoint
    from models.runtime import ModuleRunner

    model, meta = checkpoint.load(checkpoint_dir, spec)
    kind = kinds.load(spec.kind)
    # what an export's manifest tells the handler of the model (export.export writes the same three fields)
    manifest = {"preset": meta["preset"], "labels": meta["labels"], "inputs": input_records(spec)}

    return kind.build(None, manifest, ModuleRunner(model), kind.Settings.from_mapping(handler), served_as=(spec.name, "1"),
                      max_batch=max_batch)


def offline(spec: registry.ModelSpec, checkpoint_dir: Path, scenes: Sequence, handler: dict) -> list:
    """The eager checkpoint's predictions for the same scenes, through the served preset and the kind's own
    post-processing (eager_pipeline), as scene_metrics scores them."""
    pipeline, scored = eager_pipeline(spec, checkpoint_dir, handler), kinds.load(spec.kind).scored
    out = []
    for start in range(0, len(scenes), 50):
        chunk = scenes[start:start + 50]
        outputs = pipeline.runner([np.stack([pipeline.preset.from_array(s.image) for s in chunk])])
        answers = pipeline.answers(outputs, [(s.image.shape[1], s.image.shape[0]) for s in chunk])
        out.extend(scored(a) for a in answers)
    return out


def evaluate(spec: registry.ModelSpec, url: str, headers: dict[str, str], *, checkpoint_dir: Path,
             count: int | None = None, handler: dict | None = None) -> dict:
    """Both figures on `count` held-out scenes (default: the full recipe's test split). `handler`: the settings the
    server's archive was packed with (default: serve_config/<model>.yaml's)."""
    from models.scenes import cached

    recipe = spec.recipe("full")
    scenes = cached("test", count or recipe.dataset_kwargs["test"], seed=recipe.dataset_kwargs.get("seed", 0))
    handler = model_config_values(spec.name).get("handler") or {} if handler is None else handler
    classes = len(spec.labels)
    served_answers = served(url, spec.name, headers, scenes)
    offline_answers = offline(spec, checkpoint_dir, scenes, handler)
    kind = kinds.get(spec.kind)
    figures = {"served": kind.score([from_answer(spec.kind, a) for a in served_answers], scenes, classes),
               "offline": kind.score(offline_answers, scenes, classes)}
    headline = kind.headline
    return {"model": spec.name, "scenes": len(scenes), "headline": headline, **figures,
            "difference": abs(figures["served"][headline] - figures["offline"][headline])}


def main(argv: list[str] | None = None) -> int:
    from loadtest.predict import inference_key

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--run-dir", type=Path, default=Path("run"))
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--count", type=int, help="held-out scenes (default: the full recipe's test split)")
    parser.add_argument("--tolerance", type=float, default=0.005)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    spec = registry.get(args.model)
    if kinds.get(spec.kind).metric is None:
        print(f"error: {spec.name} is a {spec.kind}; make evaluate scores the kinds with a metric "
              f"{sorted(k.name for k in kinds.KINDS.values() if k.metric)} (models/kinds.py)", file=sys.stderr)
        return 2
    token = inference_key(args.run_dir)
    if token is None:
        return 1
    result = evaluate(spec, args.url, {"Authorization": f"Bearer {token}"},
                      checkpoint_dir=current().checkpoint(spec.name), count=args.count)
    headline = result["headline"]
    print(json.dumps(result, indent=1))
    print(f"{spec.name}: {headline} through the server {result['served'][headline]:.4f}, offline "
          f"{result['offline'][headline]:.4f}, difference {result['difference']:.4f} (at most {args.tolerance}) "
          f"over {result['scenes']} held-out scenes")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["difference"] <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
