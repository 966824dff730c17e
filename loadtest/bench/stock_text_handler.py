"""The text peer: a stock-style TorchServe handler for a Hugging Face encoder, as TorchServe's own
transformers example (examples/Huggingface_Transformers, Transformer_handler_generalized.py) writes it.

The eager model is loaded with `AutoModel.from_pretrained` from the archive; each request is encoded on
its own with the tokenizer (the example's `encode_plus`, which transformers 5 folds into `tokenizer(...)`),
padded to max_length, and the batch is stacked,
run once in eager PyTorch, then mean-pooled and normalised the way the model card shows. No length
grouping, no export, TorchServe's default threads. It answers the same JSON shape for a single text.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from ts.torch_handler.base_handler import BaseHandler


class StockTextEmbedder(BaseHandler):
    def initialize(self, context) -> None:
        from transformers import AutoModel, AutoTokenizer

        model_dir = Path(context.system_properties["model_dir"])
        gpu_id = context.system_properties.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu_id}" if torch.cuda.is_available() and gpu_id is not None else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModel.from_pretrained(str(model_dir)).to(self.device).eval()
        self.max_length = json.loads((model_dir / "manifest.json").read_text())["preset"]["max_length"]
        self.initialized = True

    def preprocess(self, requests):
        ids, masks = [], []
        for request in requests:
            text = request.get("data") or request.get("body")
            if isinstance(text, (bytes, bytearray)):
                text = text.decode("utf-8")
            if isinstance(text, dict):
                text = text["text"]
            encoded = self.tokenizer(text, max_length=self.max_length, padding="max_length", truncation=True,
                                     add_special_tokens=True, return_tensors="pt")
            ids.append(encoded["input_ids"])
            masks.append(encoded["attention_mask"])
        return torch.cat(ids).to(self.device), torch.cat(masks).to(self.device)

    def inference(self, data, *args, **kwargs):
        input_ids, attention_mask = data
        with torch.no_grad():
            hidden = self.model(input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1), attention_mask.sum(1)

    def postprocess(self, data):
        embeddings, tokens = data
        return [json.dumps({"embedding": e, "tokens": t}) for e, t in zip(embeddings.tolist(), tokens.tolist())]
