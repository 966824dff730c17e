"""Export a generating model's decoder (models.llama) with torch.export and AOTInductor, and verify every artifact
greedy-token-identical to the eager decoder, each in a fresh process; exit non-zero on any difference.

    python -m export.decoder --checkpoint checkpoints/chat --out artifacts/chat

The forward pass is exported once with every size dynamic (batch, tokens, attended keys, cache slots and cache
length): the key/value cache is a static one, allocated once by the worker and passed in as one tensor per layer,
which the artifact writes in place. So one artifact serves prefill and decode steps of any mix of sequences, as
the eager decoder does, with the same arguments (models.llama.step_inputs).

Verification: VERIFY_PROMPTS (20 chat prompts of different lengths, through the model's chat template) prefilled
together, padded, then answered with VERIFY_TOKENS (32) greedy tokens each, end-of-turn tokens ignored, so every
prompt runs all 32 steps. The eager decoder's tokens and logits are computed here; each artifact runs in a new
interpreter (nothing the export or another artifact left in memory can hide a fault) and must give the same token
at every step of every prompt. The stamp verified.json records per artifact the tokens that agree and the largest
logit |diff|; the first differing prompt and step are named otherwise. A generator serves one artifact (its
model-config YAML's `handler.backend`); `make decoder-bench` says which one is fastest here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from export import manifest as mf
from export.verify import STAMP, ToleranceError
from models import chat
from models.llama import KVCache, LlamaConfig, step_inputs
from models.paths import ROOT

VERIFY_TOKENS = 32
VERIFY_PROMPTS = (
    "What is the capital of France?", "Hi", "Write a haiku about the sea.", "2+2=?", "Name three primary colors.",
    "Why is the sky blue? Explain it to a child.", "Translate 'good morning' into Spanish.",
    "List the planets of the solar system in order from the sun.", "What is a prime number?",
    "Give me a recipe for pancakes.", "Who wrote Romeo and Juliet?", "Summarise the water cycle in two sentences.",
    "What does a CPU do?", "Tell me a joke about cats.", "How many days are in a leap year?",
    "Write a Python function that reverses a string.", "What is the boiling point of water at sea level?",
    "Describe a rainbow to someone who has never seen one, in a few words.", "Say hello in French.",
    "Which is larger, the moon or the earth, and by how much, roughly?",
)
FORMATS = ("program", "aoti")  # what export writes, besides the eager decoder it is checked against


def dynamic_shapes(config: LlamaConfig) -> dict[str, Any]:
    """Every size of a forward pass is dynamic, up to what the config's positions allow."""
    Dim = torch.export.Dim
    batch, tokens = Dim("batch", min=1, max=1024), Dim("tokens", min=1, max=config.max_positions)
    keys = Dim("keys", min=1, max=config.max_positions + 1)
    slots, length = Dim("slots", min=1, max=1024), Dim("length", min=2, max=config.max_positions + 1)
    per_layer = [{0: slots, 2: length}] * config.num_layers
    return {"tokens": {0: batch, 1: tokens}, "positions": {0: batch, 1: tokens}, "slots": {0: batch},
            "last": {0: batch}, "keys": {0: keys}, "cache_k": per_layer, "cache_v": per_layer}


def example_inputs(config: LlamaConfig, device: torch.device) -> tuple:
    """A prefill of two prompts of different lengths (one padded) into a 4-slot cache: no size is 0, 1 or equal to
    another, so none is specialised."""
    tokens = torch.randint(0, config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(5).repeat(2, 1)
    positions[1, 3:] = -1
    cache = KVCache(config, 4, 64, device=device)
    return step_inputs(tokens.to(device), positions.to(device), torch.tensor([2, 0], device=device), cache,
                       torch.tensor([4, 2], device=device))


def build_device() -> torch.device:
    """Where the decoder is exported, compiled and verified: the first GPU when the host has one (its package is a
    CUDA one, checked against the eager decoder on the same GPU), else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def export(checkpoint: Path, out: Path) -> dict[str, Any]:
    """model.program.pt2 and model.aoti.pt2 of the checkpoint's decoder in `out`, beside its config, tokenizer and
    chat template and the manifest (each file's sha256; the package's build host)."""
    from torch._inductor import aoti_compile_and_package

    from models.runtime import aoti_build_host, quiet_cpp_extension

    device = build_device()
    model, meta = chat.load(checkpoint, device)
    out.mkdir(parents=True, exist_ok=True)
    (out / STAMP).unlink(missing_ok=True)
    with torch.no_grad():
        program = torch.export.export(model, example_inputs(model.config, device),
                                      dynamic_shapes=dynamic_shapes(model.config), strict=False)
    program_path, aoti_path = out / mf.ARTIFACT_FILES["program"], out / mf.ARTIFACT_FILES["aoti"]
    torch.export.save(program, str(program_path))
    with quiet_cpp_extension():
        aoti_compile_and_package(program, package_path=str(aoti_path))
    for name in chat.FOLDER_FILES:  # so the folder is a whole model folder (models.chat.load_decoder)
        shutil.copy2(checkpoint / name, out / name)
    manifest = {"model": checkpoint.name, "kind": "generate", "source": meta,
                "artifacts": {
                    "program": {"file": program_path.name, "sha256": mf.sha256(program_path),
                                "exporter": "torch.export.export(strict=False), every size dynamic"},
                    "aoti": {"file": aoti_path.name, "sha256": mf.sha256(aoti_path),
                             "exporter": "torch._inductor.aoti_compile_and_package", "from": program_path.name,
                             "built_for": aoti_build_host(device)}},
                "assets": {name: mf.sha256(out / name) for name in chat.FOLDER_FILES}}
    mf.write(out, manifest)
    return manifest


def prompt_ids(directory: Path) -> list[list[int]]:
    from handlers.kinds.generate import ChatFormat

    form = ChatFormat(directory)
    return [form.chat_ids([{"role": "user", "content": prompt}]) for prompt in VERIFY_PROMPTS]


def greedy(decoder, config: LlamaConfig, prompts: list[list[int]], new_tokens: int,
           device: torch.device) -> tuple[list[list[int]], torch.Tensor]:
    """Every prompt's `new_tokens` greedy tokens, the prompts prefilled together (padded on the right) and then
    decoded together, one step each; and the logits of every step (prompts, steps, vocab)."""
    longest = max(len(p) for p in prompts)
    cache = KVCache(config, len(prompts), longest + new_tokens + 1, device=device)
    tokens = torch.zeros((len(prompts), longest), dtype=torch.long)
    positions = torch.full((len(prompts), longest), -1, dtype=torch.long)
    for row, ids in enumerate(prompts):
        tokens[row, :len(ids)], positions[row, :len(ids)] = torch.tensor(ids), torch.arange(len(ids))
    slots = torch.arange(len(prompts), device=device)
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    steps = []
    with torch.inference_mode():
        logits = decoder(*step_inputs(tokens.to(device), positions.to(device), slots, cache, last))
        for step in range(new_tokens):
            steps.append(logits.float().cpu())
            if step == new_tokens - 1:
                break
            after = torch.tensor([[len(p) + step] for p in prompts], device=device)
            logits = decoder(*step_inputs(logits.argmax(-1)[:, None], after, slots, cache))
    every = torch.stack(steps, dim=1)
    return every.argmax(-1).tolist(), every


def run_fresh(fmt: str, artifacts: Path, prompts_file: Path) -> dict[str, Any]:
    """The artifact's greedy tokens and logits, computed in a new interpreter (saved beside `prompts_file`)."""
    result = prompts_file.with_name(f"{fmt}.pt")
    proc = subprocess.run([sys.executable, "-m", "export.decoder", "--worker", fmt, "--out", str(artifacts),
                           "--prompts", str(prompts_file), "--result", str(result)],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise ToleranceError(f"{artifacts}/{fmt} could not be loaded or run in a fresh process:\n"
                             f"{proc.stderr.strip()[-2000:]}")
    return torch.load(result, weights_only=True)


def compare(fmt: str, expected: dict[str, Any], got: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Figures of one artifact against eager, and its failures (the first differing step of each prompt)."""
    failures = []
    for row, (want, have) in enumerate(zip(expected["tokens"], got["tokens"], strict=True)):
        step = next((i for i, (a, b) in enumerate(zip(want, have, strict=True)) if a != b), None)
        if step is not None:
            failures.append(f"{fmt}: prompt {row} ({VERIFY_PROMPTS[row]!r}) differs from eager at step {step}: "
                            f"token {have[step]} instead of {want[step]}")
    same = sum(a == b for want, have in zip(expected["tokens"], got["tokens"]) for a, b in zip(want, have))
    total = sum(len(want) for want in expected["tokens"])
    diff = (expected["logits"] - got["logits"]).abs().max().item()
    return {"tokens_identical": same, "tokens": total, "max_abs_logit_diff": diff}, failures


def verify(checkpoint: Path, artifacts: Path) -> dict[str, Any]:
    """Every artifact of the manifest against the eager decoder; raise ToleranceError listing every failure, else
    write and return the stamp."""
    manifest = mf.read(artifacts)
    mf.check_folder(artifacts, manifest)
    device = build_device()
    model, _ = chat.load(checkpoint, device)
    prompts = prompt_ids(checkpoint)
    tokens, logits = greedy(model, model.config, prompts, VERIFY_TOKENS, device)
    expected = {"tokens": tokens, "logits": logits}
    results, failures = {}, []
    with tempfile.TemporaryDirectory(prefix="verify-decoder-") as scratch:
        prompts_file = Path(scratch) / "prompts.json"
        prompts_file.write_text(json.dumps(prompts))
        for fmt, entry in manifest["artifacts"].items():
            try:
                got = run_fresh(fmt, artifacts, prompts_file)
            except ToleranceError as err:
                failures.append(str(err))
                continue
            figures, wrong = compare(fmt, expected, got)
            failures += wrong
            results[fmt] = {"file": entry["file"], "sha256": entry["sha256"], **figures}
            print(f"{manifest['model']}: {fmt:8s} {figures['tokens_identical']}/{figures['tokens']} greedy tokens "
                  f"identical to eager ({len(prompts)} prompts x {VERIFY_TOKENS}), max |logit diff| "
                  f"{figures['max_abs_logit_diff']:.2e}", flush=True)
    if failures:
        raise ToleranceError(f"{len(failures)} verification failure(s) for {manifest['model']}:\n  "
                             + "\n  ".join(failures))
    stamp = {"model": manifest["model"], "manifest_sha256": mf.sha256(artifacts / mf.MANIFEST),
             "reference": "eager decoder (models.llama) of the checkpoint", "prompts": len(prompts),
             "tokens_per_prompt": VERIFY_TOKENS, "artifacts": results}
    text, path = json.dumps(stamp, indent=2) + "\n", artifacts / STAMP
    if not path.exists() or path.read_text() != text:  # as export.verify: the same finding leaves archives current
        path.write_text(text)
    return stamp


def worker(fmt: str, artifacts: Path, prompts_file: Path, result: Path) -> None:
    decoder, config, device = chat.load_decoder(artifacts, fmt, build_device())
    tokens, logits = greedy(decoder, config, json.loads(prompts_file.read_text()), VERIFY_TOKENS, device)
    torch.save({"tokens": tokens, "logits": logits}, result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.decoder", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a generating model's checkpoint folder (models.chat)")
    parser.add_argument("--out", type=Path, required=True, help="the artifacts' folder")
    parser.add_argument("--verify-only", action="store_true", help="verify what --out holds, export nothing")
    parser.add_argument("--worker", choices=FORMATS, help=argparse.SUPPRESS)  # internal: the fresh-process side
    parser.add_argument("--prompts", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.out, args.prompts, args.result)
        return 0
    if args.checkpoint is None:
        parser.error("--checkpoint is required")
    if not args.verify_only:
        export(args.checkpoint, args.out)
    try:
        verify(args.checkpoint, args.out)
    except ToleranceError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
