"""Text preprocessing shared by export, verification, the handler and the benchmarks: one tokenizer path.

`TextPreset` wraps the model's fast tokenizer (tokenizer.json, loaded by the `tokenizers` library, no
transformers needed in the worker). It tokenizes a whole batch of texts in one call, truncated to the
model's maximum length but not padded, and only the head of each text that can reach that length (`head`): the
tokenizer reads a text to its end before it truncates, and its WordPiece step costs about the square of each
word's length (`work`); `length_groups` orders the texts by token count and cuts them
into groups under a token budget; `collate` pads one group to its own longest text (never to the
maximum length) and builds the attention mask.

Real English text for requests and verification comes from the dataset descriptions scikit-learn ships
and the language reference CPython ships in `pydoc_data` (`corpus_sentences`), so nothing is downloaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class Encoded:
    """One tokenized text: ids (with [CLS] and [SEP]), and whether truncation cut it."""

    ids: list[int]
    truncated: bool

    @property
    def tokens(self) -> int:
        return len(self.ids)


# What a BERT-style tokenizer splits words at: its whitespace (space, tab, newline, carriage return, Unicode Zs)
# separates runs; within a run, ASCII punctuation and CJK characters stand alone. A run holding a word character
# (Python's \w: letters, digits, underscore, CJK) gives at least one token; control characters give none.
_RUN = re.compile(r"[^ \t\n\r\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
_WORD = re.compile(r"[^\s!-/:-@\[-`{-~\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
WORDPIECE_MAX_CHARS = 100  # WordPiece gives a longer word one [UNK] without searching its pieces


def word_work(length: int) -> int:
    """What tokenizing one word of `length` characters costs, in character comparisons: WordPiece tries each
    prefix of what is left, longest first (a square), up to its limit; a longer word is one [UNK] (linear)."""
    return length * length if length <= WORDPIECE_MAX_CHARS else length


class TextPreset:
    """Tokenizer settings from the registry's preset: {"name": "text", "max_length": 256, "tokenizer": file}."""

    def __init__(self, tokenizer_file: Path, *, max_length: int, pad_id: int = 0) -> None:
        from tokenizers import Tokenizer

        if max_length < 2:
            raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
        self.max_length, self.pad_id = max_length, pad_id
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_length)

    @classmethod
    def from_description(cls, description: dict[str, Any], directory: Path) -> "TextPreset":
        """The preset of an export manifest; the tokenizer file lies in `directory` (artifacts or .mar)."""
        if description.get("name") != "text":
            raise ValueError(f"not a text preset: {description!r}")
        return cls(Path(directory) / description["tokenizer"], max_length=int(description["max_length"]))

    def head(self, text: str) -> str:
        """The part of `text` that tokenizing reads: up to the end of its `max_length`-th run of non-blanks that
        holds a word character. Each such run gives at least one token, so a longer text overflows `max_length`
        from its head alone, and its ids and `truncated` come out exactly as from the whole text (the cut falls on
        whitespace, where the tokenizer splits anyway)."""
        counted = 0
        for run in _RUN.finditer(text):
            if re.search(r"\w", run.group()):
                counted += 1
                if counted == self.max_length:
                    return text[:run.end()]
        return text

    @staticmethod
    def work(text: str) -> tuple[int, int]:
        """(work, longest word): what tokenizing `text` costs (word_work summed over its words) and its longest
        word in characters, for bounding a request before it is tokenized."""
        lengths = [len(word) for word in _WORD.findall(text)]
        return sum(word_work(n) for n in lengths), max(lengths, default=0)

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        """Tokenize the head of every text in one call (the fast tokenizer parallelises a batch internally)."""
        heads = [self.head(t) for t in texts]
        return [Encoded(e.ids, bool(e.overflowing)) for e in self.tokenizer.encode_batch(heads)]

    def collate(self, encoded: Sequence[Encoded]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), int64, padded to the longest text in `encoded`."""
        width = max(e.tokens for e in encoded)
        ids = np.full((len(encoded), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encoded), width), dtype=np.int64)
        for row, e in enumerate(encoded):
            ids[row, : e.tokens] = e.ids
            mask[row, : e.tokens] = 1
        return ids, mask


def length_groups(lengths: Sequence[int], *, max_tokens: int, max_texts: int, pass_cost: int = 8) -> list[list[int]]:
    """Indices of `lengths` sorted by length and cut into groups, one forward pass each, so that the
    padded positions computed (texts x the group's longest) plus `pass_cost` token-equivalents per pass
    are least (a pass's fixed cost is about 8 tokens' worth on a CPU for MiniLM): an exact partition of the sorted lengths by dynamic programming. A group holds at most
    `max_texts` texts and `max_tokens` padded positions (memory bounds). Short texts batched with a long
    one would be padded to its length; here they go in their own pass when that costs less."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sizes = [lengths[i] for i in order]
    n = len(sizes)
    best = [0] + [0] * n  # best[j]: least cost of the first j sorted texts
    cut = [0] * (n + 1)
    for j in range(1, n + 1):  # group = sorted[i:j], whose longest is sizes[j - 1]
        best[j], cut[j] = min((best[i] + pass_cost + (j - i) * sizes[j - 1], i)
                              for i in range(max(0, j - max_texts), j)
                              if i == j - 1 or (j - i) * sizes[j - 1] <= max_tokens)
    groups = []
    j = n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def padding_fraction(lengths: Sequence[int], groups: Sequence[Sequence[int]]) -> float:
    """Share of the computed token positions that are padding, for a grouping of `lengths`."""
    real = sum(lengths)
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    return 1.0 - real / padded if padded else 0.0


# --- real English text, offline --------------------------------------------------------------------

_MARKUP = re.compile(r"^\s*([=\-~*:|+.]{2,}|:\w|\.\. |\|)")


def _prose_sentences(document: str) -> list[str]:
    """The sentences of one document's prose paragraphs: indented code, markup and tables dropped."""
    lines = [line.strip() for line in document.splitlines()
             if line.strip() and not line.startswith((" ", "\t")) and not _MARKUP.match(line)]
    prose = re.sub(r"`[^`]*`_?|\[[^\]]*\]|https?://\S+", " ", " ".join(lines))
    sentences = []
    for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", prose):
        sentence = " ".join(sentence.split())
        if 3 <= len(sentence.split()) <= 80 and sentence[-1] in ".!?" and sentence[0].isalpha():
            sentences.append(sentence)
    return sentences


def corpus_sentences() -> list[str]:
    """Sentences of real English prose, in a fixed order: the dataset descriptions scikit-learn ships and
    CPython's language reference (pydoc_data.topics), with code, markup, tables and links dropped."""
    from importlib import resources

    from pydoc_data.topics import topics

    sentences: list[str] = []
    folder = resources.files("sklearn.datasets") / "descr"
    for name in sorted(p.name for p in folder.iterdir() if p.name.endswith(".rst")):
        sentences += _prose_sentences((folder / name).read_text(encoding="utf-8"))
    for name in sorted(topics):
        sentences += _prose_sentences(topics[name])
    if len(sentences) < 100:
        raise RuntimeError(f"only {len(sentences)} sentences found in scikit-learn's dataset descriptions")
    return sentences


def mixed_texts(count: int, *, seed: int = 0) -> list[str]:
    """Request texts with a documented length mix, from the real sentences:
    60 % one sentence (about 10-40 tokens), 30 % a passage of 2-5 sentences (about 40-150 tokens),
    10 % a long document of 12-30 sentences (past the 256-token limit, so truncated)."""
    sentences = corpus_sentences()
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(count):
        draw = rng.random()
        n = 1 if draw < 0.6 else int(rng.integers(2, 6)) if draw < 0.9 else int(rng.integers(12, 31))
        start = int(rng.integers(0, len(sentences)))
        texts.append(" ".join(sentences[(start + k) % len(sentences)] for k in range(n)))
    return texts

