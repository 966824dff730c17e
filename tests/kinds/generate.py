"""Test checks of the generate kind (handlers/kinds/generate.py): a served greedy answer against the eager decoder's
own greedy continuation of the same chat prompt, computed here from the model's checkpoint (models.llama, each
prompt alone), and the bad requests of its routes with the status each must get."""

from __future__ import annotations

import json
from functools import cache

import torch

from tests.conftest import TREE, built


@cache
def eager(name: str):
    """(the eager decoder, its chat format) of generator `name`, from its built checkpoint."""
    from handlers.kinds.generate import ChatFormat
    from models import chat

    directory = built(TREE.checkpoint(name) / "model.json").parent
    model, _ = chat.load(directory)
    return model, ChatFormat(directory)


class Checks:
    native_errors = "native"  # {"code", "type", "message"} at the native route

    def __init__(self, spec) -> None:
        self.spec = spec

    @staticmethod
    def ask(prompt: str, max_tokens: int) -> dict:
        """A greedy native request for one user message."""
        return {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}

    def expected(self, ask: dict) -> dict:
        """What a whole native answer to greedy `ask` must be: the eager decoder's greedy tokens up to the first
        token that ends a turn (finish_reason "stop", that token counted) or to max_tokens ("length"), as text."""
        from export.decoder import greedy

        model, form = eager(self.spec.name)
        prompt = form.chat_ids(ask["messages"])
        with torch.no_grad():
            tokens = greedy(model, model.config, [prompt], ask["max_tokens"], torch.device("cpu"))[0][0]
        end = next((i for i, t in enumerate(tokens) if t in form.stop_token_ids), None)
        made = tokens if end is None else tokens[:end + 1]  # the ending token is generated, and counted, not shown
        return {"text": form.decode(made if end is None else made[:-1]),
                "finish_reason": "length" if end is None else "stop",
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(made),
                          "total_tokens": len(prompt) + len(made)}}

    def assert_native(self, asks: list[dict], answers: list[dict]) -> None:
        """Served whole native answers to greedy `asks` equal the eager decoder's, text, end and token counts."""
        assert len(asks) == len(answers)
        for ask, answer in zip(asks, answers):
            assert answer == self.expected(ask), (ask, answer)

    @staticmethod
    def same(a: list[dict], b: list[dict]) -> None:
        """Two streamed native answers to one greedy request (lists of JSON lines) agree: text, end and usage."""
        assert "".join(line["text"] for line in a) == "".join(line["text"] for line in b)
        assert (a[-1]["finish_reason"], a[-1]["usage"]) == (b[-1]["finish_reason"], b[-1]["usage"])

    def bad_matrix(self) -> list[tuple[bytes, int]]:
        """Bodies of an OpenAI chat completion (sent with `Content-Type: application/json`) the kind must refuse,
        each with its status: too many messages, content that is not text, an unknown role, too many stop strings,
        a prompt that is not UTF-8."""
        name = self.spec.name
        hostile = [{"model": name, "messages": [{"role": "user", "content": "x"}] * 10_000},
                   {"model": name, "messages": [{"role": "user", "content": 7}]},
                   {"model": name, "messages": [{"role": "wizard", "content": "x"}]},
                   {"model": name, "messages": [{"role": "user", "content": "x"}], "stop": ["s"] * 10_000}]
        return [(json.dumps(b).encode(), 400) for b in hostile] + [
            (b'{"model": "' + name.encode() + b'", "prompt": "\xff\xfe"}', 400)]
