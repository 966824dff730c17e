"""Verify exported artifacts against the eager model; exit non-zero on any failure.

    python -m export.verify --model digits --checkpoint checkpoints/digits --artifacts artifacts/digits

Each artifact is loaded in a fresh Python process (so nothing cached by the export or by another
artifact can hide a problem) with the backend that serves it: ONNX Runtime for .onnx, torch.jit.load
for TorchScript. What it must give is computed once, in this process, before any artifact runs: the eager
model's outputs (or the model's reference library's), saved to a scratch file every worker reads. Each artifact
is compared with them on every batch size in the registry, with real held-out images and with random inputs:
max |diff| per output against the registry's tolerance. Top-1 agreement is measured over the whole held-out
split. A kind whose outputs are not compared element by element (handlers.kinds: `compare`; detections, class
masks) is checked on held-out images only, at every verified batch size and, through the preset, at each of the
registry's `verify_image_sizes`; its figures (matched detections, pixel agreement) are judged against the
tolerance. All failures are collected and reported together; on success a stamp (verified.json) records the
figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export import manifest as mf
from models import kinds
from models import checkpoint, registry
from models.paths import ROOT


class ToleranceError(RuntimeError):
    """An artifact differs from eager beyond the registry's tolerance."""


STAMP = "verified.json"
HELD_OUT_CHUNK = 64  # held-out images per forward pass


def reference_inputs(spec: registry.ModelSpec, batch: int, source: str, real: torch.Tensor | None,
                     length: int | None = None) -> list[torch.Tensor]:
    """Inputs for one check: `batch` held-out rows (cycled) or seeded random tensors of the input spec (with its
    dynamic non-batch axes at `length`)."""
    from export.export import random_inputs

    if source == "real":
        idx = torch.arange(batch) % real.shape[0]
        return [real[idx]]
    return random_inputs(spec, batch, torch.Generator().manual_seed(1000 + batch + 7 * (length or 0)), length)


def shape_grid(spec: registry.ModelSpec, source: str) -> list[tuple[int, int | None]]:
    """(batch, dynamic length) cases: every verified batch size; for random inputs also the registry's
    `check_shapes` (batch, length) pairs, which set every dynamic non-batch axis."""
    grid: list[tuple[int, int | None]] = [(batch, None) for batch in spec.verify_batch_sizes]
    return grid + [tuple(pair) for pair in spec.check_shapes] if source == "random" else grid


def held_out_inputs(spec: registry.ModelSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The test split through the model's preset, or None for a model without a dataset."""
    if spec.dataset is None:
        return None
    from models.preprocessing import build_preset

    split = registry.resolve(spec.dataset)(test_only=True)
    preset = build_preset(spec.preset)
    return torch.from_numpy(np.stack([preset.from_array(x) for x in split.test_images])), torch.as_tensor(split.test_labels)


def image_cases(spec: registry.ModelSpec) -> list[tuple[dict[str, Any], torch.Tensor]]:
    """(where, inputs) of a kind compared its own way: held-out images through the preset at every verified batch
    size, then three at a time scaled to each of `verify_image_sizes` (width, height) first."""
    import numpy as np
    from PIL import Image

    from models.preprocessing import build_preset

    images = registry.resolve(spec.dataset)(test_only=True).test_images
    preset = build_preset(spec.preset)
    cases = [({"inputs": "real", "batch": batch},
              torch.from_numpy(np.stack([preset.from_array(images[i % len(images)]) for i in range(batch)])))
             for batch in spec.verify_batch_sizes]
    for n, (width, height) in enumerate(spec.verify_image_sizes):
        picks = [images[(7 * n + i) % len(images)] for i in range(3)]
        rows = [preset.from_array(np.asarray(Image.fromarray(x).resize((width, height), Image.Resampling.BILINEAR)))
                for x in picks]
        cases.append(({"inputs": f"real {width}x{height}", "batch": 3}, torch.from_numpy(np.stack(rows))))
    return cases


def combined_figures(checks: list[dict[str, Any]]) -> dict[str, float] | None:
    """The kind's figures over every case: the least of a `min_` figure or an agreement, the most of a `max_`
    figure, the sum of a count."""
    figures = [c["figures"] for c in checks if c.get("figures")]
    if not figures:
        return None
    out = {}
    for key in figures[0]:
        values = [f[key] for f in figures]
        out[key] = min(values) if key.startswith("min_") or key.endswith("agreement") else \
            max(values) if key.startswith("max_") else sum(values)
    return out


def compare(name: str, expected: torch.Tensor, got: torch.Tensor, *, rtol: float = 0.0, **where: Any) -> dict[str, Any]:
    """One output's figures: max |diff|; its largest excess over `rtol` x |expected| (what the output's atol must
    cover: max |diff| itself when rtol is 0); and, for 2-D outputs, the lowest row-wise cosine similarity."""
    shape_ok = tuple(expected.shape) == tuple(got.shape)
    e, g = expected.double(), got.double()
    gap = (e - g).abs()
    diff = gap.max().item() if shape_ok and gap.numel() else 0.0 if shape_ok else float("inf")
    excess = (gap - rtol * e.abs()).max().item() if shape_ok and gap.numel() else diff
    cosines = torch.nn.functional.cosine_similarity(e, g, dim=1) if shape_ok and e.dim() == 2 else None
    return {**where, "output": name, "max_abs_diff": diff, "max_excess": excess,
            "min_cosine": None if cosines is None else cosines.min().item(),
            "cosines": None if cosines is None else cosines.tolist(),
            "shape": list(got.shape), "expected_shape": list(expected.shape)}


def held_out_top1(forward, images: torch.Tensor) -> torch.Tensor:
    """The top-1 class `forward` gives each held-out image, HELD_OUT_CHUNK images per pass."""
    return torch.cat([forward(images[start : start + HELD_OUT_CHUNK]).argmax(dim=1)
                      for start in range(0, len(images), HELD_OUT_CHUNK)])


def eager_reference(spec: registry.ModelSpec, checkpoint_dir: Path | None) -> dict[str, Any]:
    """What every artifact is compared with, computed once in the parent process: each case's inputs with the
    outputs they must give (the model's reference library's when the registry names one, else the eager
    checkpoint's), whether the kind compares them its own way, and eager's top-1 over the held-out split."""
    if spec.reference is not None:
        cases = [{"where": {"inputs": "reference", "batch": case["batch"],
                            "max_tokens": max(case.get("tokens") or [0])},
                  "inputs": case["inputs"], "expected": list(case["expected"])}
                 for case in registry.resolve(spec.reference)(spec, spec.verify_batch_sizes)]
        return {"cases": cases, "by_kind": False, "held_out": None}
    torch.manual_seed(0)
    model, _ = checkpoint.load(checkpoint_dir, spec)
    by_kind = getattr(kinds.load(spec.kind), "compare", None) is not None
    held_out = None if by_kind else held_out_inputs(spec)
    if by_kind:
        pairs = [(where, [inputs]) for where, inputs in image_cases(spec)]
    else:
        pairs = [({"inputs": source, "batch": batch, **({"length": length} if length is not None else {})},
                  reference_inputs(spec, batch, source, held_out[0] if held_out else None, length))
                 for source in (("real", "random") if held_out is not None else ("random",))
                 for batch, length in shape_grid(spec, source)]
    cases = []
    with torch.inference_mode():
        for where, inputs in pairs:
            expected = model(*inputs)
            cases.append({"where": where, "inputs": inputs,
                          "expected": list(expected) if isinstance(expected, (tuple, list)) else [expected]})
        top1 = None
        if held_out is not None:
            images, labels = held_out
            top1 = {"labels": labels, "eager": held_out_top1(model, images)}
    return {"cases": cases, "by_kind": by_kind, "held_out": top1}


def check_cases(spec: registry.ModelSpec, reference: dict[str, Any], runner,
                tolerance: registry.Tolerance | None = None) -> dict[str, Any]:
    """Run every case of `reference` (eager_reference) through `runner` and return the figures (no judgement);
    `tolerance` gives each output's rtol (its excess over rtol x |reference| is what judge holds to its atol)."""
    compare_outputs = kinds.load(spec.kind).compare if reference["by_kind"] else None
    rtol = {name: bound.rtol for name in spec.outputs
            if tolerance is not None and (bound := tolerance.bound(name)) is not None}
    checks = []
    for case in reference["cases"]:
        got, expected = runner(case["inputs"]), case["expected"]
        if compare_outputs is None:
            checks += [compare(name, e, g, rtol=rtol.get(name, 0.0), **case["where"])
                       for name, e, g in zip(spec.outputs, expected, got)]
            continue
        shapes_ok = [tuple(e.shape) for e in expected] == [tuple(g.shape) for g in got]
        checks.append({**case["where"], "output": ",".join(spec.outputs), "max_abs_diff": None, "max_excess": None,
                       "min_cosine": None,
                       "cosines": None, "shape": [list(g.shape) for g in got],
                       "expected_shape": [list(e.shape) for e in expected],
                       "figures": compare_outputs(expected, got) if shapes_ok else None})
    agreement = accuracy = None
    if reference["held_out"] is not None:
        images, _ = held_out_inputs(spec)
        labels, eager_top1 = reference["held_out"]["labels"], reference["held_out"]["eager"]
        top1 = held_out_top1(lambda chunk: runner([chunk])[0], images)
        agreement = (top1 == eager_top1).sum().item() / len(labels)
        accuracy = {"eager": (eager_top1 == labels).sum().item() / len(labels),
                    "artifact": (top1 == labels).sum().item() / len(labels)}
    return {"checks": checks, "top1_agreement": agreement, "accuracy": accuracy}


def check_artifact(spec: registry.ModelSpec, artifact: Path, reference: dict[str, Any]) -> dict[str, Any]:
    """Run in the fresh process: load one artifact with its serving backend and check it on every case."""
    from models.runtime import ThreadBudget, load_runner

    torch.manual_seed(0)
    serving = load_runner(artifact, torch.device("cpu"), ThreadBudget(intra_op=torch.get_num_threads()))

    def runner(inputs):  # the serving backend's NumPy outputs, as tensors beside eager's
        return [torch.from_numpy(o) for o in serving(inputs)]

    fmt = next((f for f, e in mf.read(artifact.parent)["artifacts"].items() if e["file"] == artifact.name), None)
    tolerance = spec.tolerance if fmt is None else spec.tolerance_for(fmt)
    return {"artifact": artifact.name, **check_cases(spec, reference, runner, tolerance)}


def mean_cosine(checks: list[dict[str, Any]]) -> float | None:
    rows = [c for check in checks for c in (check.get("cosines") or [])]
    return sum(rows) / len(rows) if rows else None


def judge(spec: registry.ModelSpec, fmt: str, report: dict[str, Any]) -> list[str]:
    """Every way `report` misses the registry's tolerance for `fmt`, as named, actionable messages."""
    tol = spec.tolerance_for(fmt)
    failures = []
    for c in report["checks"]:
        where = f"at batch {c['batch']} ({c['inputs']} inputs)"
        if c["shape"] != c["expected_shape"]:
            failures.append(f"{report['artifact']} ({fmt}) output {c['output']!r} shape {c['shape']} != reference "
                            f"{c['expected_shape']} {where}")
            continue
        figures = c.get("figures") or {}
        if tol.min_box_iou is not None and (figures.get("unmatched") or figures.get("extra")):
            failures.append(f"{report['artifact']} ({fmt}) detections differ from eager's {where}: "
                            f"{figures['unmatched']} of {figures['detections']} have no partner of the same label, "
                            f"{figures['extra']} extra")
        for key, bound in (("min_box_iou", tol.min_box_iou), ("pixel_agreement", tol.min_pixel_agreement)):
            value = figures.get(key)
            if bound is not None and not (value is not None and value >= bound):
                failures.append(f"{report['artifact']} ({fmt}) {key.removeprefix('min_').replace('_', ' ')} {value} "
                                f"< {bound} {where}")
        if tol.max_score_diff is not None and not (figures.get("max_score_diff") is not None
                                                   and figures["max_score_diff"] <= tol.max_score_diff):
            failures.append(f"{report['artifact']} ({fmt}) score difference {figures.get('max_score_diff')} > "
                            f"{tol.max_score_diff} {where}")
        bound = tol.bound(c["output"]) if c["max_abs_diff"] is not None else None
        if bound is not None and not c.get("max_excess", c["max_abs_diff"]) <= bound.atol:  # `not <=`: NaN too
            rule = f"atol {bound.atol:g}" + (f" + rtol {bound.rtol:g} x |reference| (worst excess "
                                              f"{c['max_excess']:.3g})" if bound.rtol else "")
            failures.append(f"{report['artifact']} ({fmt}) output {c['output']!r} max abs diff {c['max_abs_diff']:.3g} > "
                            f"{rule} {where}")
        if tol.min_cosine is not None and not (c["min_cosine"] is not None and c["min_cosine"] >= tol.min_cosine):
            failures.append(f"{report['artifact']} ({fmt}) output {c['output']!r} cosine similarity {c['min_cosine']} < "
                            f"{tol.min_cosine} {where}")
    checked = [c["figures"].get("detections") for c in report["checks"] if c.get("figures")]
    if tol.min_box_iou is not None and checked and not sum(v or 0 for v in checked):
        failures.append(f"{report['artifact']} ({fmt}) no detection clearly scored over the verification floor and the "
                        "ties at the k-th place: nothing could be compared (a model this untrained cannot be verified)")
    if tol.min_mean_cosine is not None:
        mean = mean_cosine(report["checks"])
        if not (mean is not None and mean >= tol.min_mean_cosine):
            failures.append(f"{report['artifact']} ({fmt}) mean cosine similarity {mean} < {tol.min_mean_cosine}")
    accuracy = report.get("accuracy")
    if tol.max_accuracy_drop is not None and accuracy is not None and \
            not accuracy["eager"] - accuracy["artifact"] <= tol.max_accuracy_drop:
        failures.append(f"{report['artifact']} ({fmt}) held-out accuracy {accuracy['artifact']:.4f} is "
                        f"{100 * (accuracy['eager'] - accuracy['artifact']):.2f} points below eager's "
                        f"{accuracy['eager']:.4f} (at most {100 * tol.max_accuracy_drop:g})")
    agreement = report["top1_agreement"]
    if agreement is not None and agreement < tol.min_top1_agreement:
        failures.append(f"{report['artifact']} ({fmt}) top-1 agreement with eager {agreement:.4f} < "
                        f"{tol.min_top1_agreement} on the held-out split")
    return failures


def summary(spec: registry.ModelSpec, fmt: str, result: dict[str, Any]) -> str:
    """One printed line of a verified artifact's figures against its tolerance."""
    tol = spec.tolerance_for(fmt)
    worst = result["worst_at"]
    if result.get("figures") is not None:
        figures = "  ".join(f"{key.replace('_', ' ')} {value:.6g}" for key, value in result["figures"].items())
        return f"{fmt:9s} {figures}  [{result['checks']} checks, batches {list(spec.verify_batch_sizes)}, images " \
               f"{['x'.join(map(str, size)) for size in spec.verify_image_sizes]}]"
    parts = [f"{fmt:9s} max abs diff {result['max_abs_diff']:.3g} (atol {'unchecked' if tol.atol is None else f'{tol.atol:g}'},"
             f" worst at batch {worst['batch']} {worst['inputs']})"]
    if result["min_cosine"] is not None and tol.min_cosine is not None:
        parts.append(f"min cosine {result['min_cosine']:.6f} (>= {tol.min_cosine:g})")
    if result["mean_cosine"] is not None and tol.min_mean_cosine is not None:
        parts.append(f"mean cosine {result['mean_cosine']:.6f} (>= {tol.min_mean_cosine:g})")
    if result["top1_agreement"] is not None:
        parts.append(f"top-1 agreement {result['top1_agreement']:.4f}")
    if result.get("accuracy") is not None and tol.max_accuracy_drop is not None:
        parts.append(f"held-out accuracy {result['accuracy']['artifact']:.4f} (eager {result['accuracy']['eager']:.4f})")
    return "  ".join(parts) + f"  [{result['checks']} checks, batches {list(spec.verify_batch_sizes)}]"


def run_fresh(spec: registry.ModelSpec, artifact: Path, reference_file: Path) -> dict[str, Any]:
    """check_artifact() in a new interpreter, on the cases saved in `reference_file`; its JSON report is the last
    line of its stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", "export.verify", "--model", spec.name, "--artifacts", str(artifact.parent),
         "--worker", artifact.name, "--reference", str(reference_file), "--spec-json", json.dumps(spec.to_json())],
        capture_output=True, text=True, cwd=ROOT,
    )
    if proc.returncode != 0:
        raise ToleranceError(f"{artifact} could not be loaded or run in a fresh process:\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def verify(spec: registry.ModelSpec, checkpoint_dir: Path, artifacts_dir: Path) -> dict[str, Any]:
    """Verify every artifact in the manifest; raise ToleranceError listing all failures, else return the stamp."""
    manifest = mf.read(artifacts_dir)
    mf.check_folder(artifacts_dir, manifest)
    results, failures = {}, []
    with tempfile.TemporaryDirectory(prefix="verify-") as scratch:
        reference_file = Path(scratch) / "reference.pt"
        torch.save(eager_reference(spec, checkpoint_dir), reference_file)
        for fmt, entry in manifest["artifacts"].items():
            try:
                report = run_fresh(spec, artifacts_dir / entry["file"], reference_file)
            except ToleranceError as err:
                failures.append(str(err))
                continue
            failures += judge(spec, fmt, report)
            worst = max(report["checks"], key=lambda c: c["max_abs_diff"] or 0.0)
            cosines = [c["min_cosine"] for c in report["checks"] if c["min_cosine"] is not None]
            results[fmt] = {"file": entry["file"], "sha256": entry["sha256"], "max_abs_diff": worst["max_abs_diff"],
                            "worst_at": {k: worst[k] for k in ("batch", "inputs", "output")},
                            "min_cosine": min(cosines) if cosines else None,
                            "mean_cosine": mean_cosine(report["checks"]),
                            "top1_agreement": report["top1_agreement"], "accuracy": report.get("accuracy"),
                            "figures": combined_figures(report["checks"]), "checks": len(report["checks"])}
            print(f"{spec.name}: {summary(spec, fmt, results[fmt])}", flush=True)
    for fmt, reason in manifest.get("not_applicable", {}).items():
        results[fmt] = {"not_applicable": reason}
        print(f"{spec.name}: {fmt:9s} not applicable (not verified): {reason}", flush=True)
    if failures:
        raise ToleranceError(f"{len(failures)} verification failure(s) for {spec.name}:\n  " + "\n  ".join(failures))
    stamp = {"model": spec.name, "manifest_sha256": mf.sha256(artifacts_dir / mf.MANIFEST),
             "reference": spec.reference or "eager checkpoint",
             "tolerance": {fmt: dataclasses.asdict(spec.tolerance_for(fmt)) for fmt in manifest["artifacts"]},
             "artifacts": results}
    # Rewritten only when it changes: a re-verification that finds the same (the parity tier re-verifies the
    # build tree) must not make the archives built from it look stale to make.
    text, path = json.dumps(stamp, indent=2) + "\n", artifacts_dir / STAMP
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return stamp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--worker", metavar="FILE", help=argparse.SUPPRESS)  # internal: the fresh-process side
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)  # internal: the parent's eager_reference
    parser.add_argument("--spec-json", help=argparse.SUPPRESS)  # internal: the parent's spec, registered or not
    args = parser.parse_args(argv)
    spec = registry.ModelSpec.from_json(json.loads(args.spec_json)) if args.spec_json else registry.get(args.model)
    if args.worker:
        reference = torch.load(args.reference, weights_only=True)
        print(json.dumps(check_artifact(spec, args.artifacts / args.worker, reference)))
        return 0
    if args.checkpoint is None:
        parser.error("--checkpoint is required")
    stamp_path = args.artifacts / STAMP
    stamp_path.unlink(missing_ok=True)
    try:
        verify(spec, args.checkpoint, args.artifacts)
    except (ToleranceError, mf.IntegrityError) as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"{spec.name}: all artifacts verified; stamp {stamp_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
