"""Handler settings: the `handler:` section of a model-config YAML (serve_config/<model>.yaml), typed and
checked when the worker starts, so a typo or a bad value fails the model's load with a message that says
what to write instead."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, TypeVar

SettingsT = TypeVar("SettingsT", bound="HandlerSettings")
PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class HandlerSettings:
    """What every handler of ours reads. Subclasses add their own fields (a dataclass each); every `int`
    field must be a positive integer and every `bool` a YAML true/false.

    `intra_op_threads`: the parallelism of one forward pass. `precision: fp16` runs the model in half
    precision on a GPU (ignored on a CPU, where it would be slower); `allow_tf32` lets CUDA matmuls and
    convolutions use TF32 (off: parity with the verified fp32 export depends on it). `response_cache_mb`: each
    worker keeps this many MiB of answers to requests it has answered (handlers.cache); 0, the default, keeps none.
    Setting it says the model's answer is a function of its request alone. `max_answer_bytes`: the largest answer
    the worker sends; a larger one is refused (413) for its request alone, since TorchServe's frontend drops the
    worker whose answer passes its max_response_size (serve_config/config.properties; keep this at most that)."""

    intra_op_threads: int = 1
    precision: str = "fp32"
    allow_tf32: bool = False
    response_cache_mb: int = 0
    max_answer_bytes: int = 8 << 20  # config.properties' max_response_size (tests/unit/test_settings.py)

    MAY_BE_ZERO = frozenset({"response_cache_mb"})  # int fields where 0 means off

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool)
                                    or value < (0 if f.name in self.MAY_BE_ZERO else 1)):
                least = "a whole number, 0 or more" if f.name in self.MAY_BE_ZERO else "a positive integer"
                raise ValueError(f"handler.{f.name} must be {least}, got {value!r}")
            if f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"handler.{f.name} must be true or false, got {value!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"handler.precision must be one of {PRECISIONS}, got {self.precision!r}")

    @property
    def rows_per_pass(self) -> int:
        """The most rows (images, texts, examples) one forward pass holds: at most the largest verified batch."""
        raise NotImplementedError(f"{type(self).__name__} does not say how many rows a forward pass holds")

    @classmethod
    def from_mapping(cls: type[SettingsT], values: Mapping[str, Any] | None) -> SettingsT:
        """Build from the YAML mapping; unknown keys are an error so a typo does not pass silently."""
        values = dict(values or {})
        known = sorted(f.name for f in fields(cls))
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown handler settings {unknown}; known: {known}")
        return cls(**values)
