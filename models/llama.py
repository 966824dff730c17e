"""A Llama decoder (SmolLM2's architecture) whose key/value cache has a slot per sequence, so one forward pass
serves sequences of different lengths: the prefill of one prompt, or one decode step of every running sequence.

Only modules and the config live here (no I/O): models/chat.py makes a checkpoint from the GGUF weights, and the
generate kind (handlers/kinds/generate.py) schedules sequences over the slots. The layout follows Hugging Face's
LlamaForCausalLM (rotate-half rotary embeddings, RMSNorm, SwiGLU, grouped-query attention, tied embeddings), so its
state dict loads as it is (models.chat checks it tensor for tensor against transformers' reading).

The forward pass takes tensors only and writes the cache in place: that is what torch.export and AOTInductor
compile (export/decoder.py), and the eager module, the exported program and the compiled package are called the
same way, with `step_inputs`. The cache is one tensor per layer: a compiled package then writes each pass's keys
into it in place (as one (layers, ...) tensor, AOTInductor copied the whole cache on every step).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_positions: int = 2048
    tie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_json(self) -> dict:
        return asdict(self)


class KVCache:
    """Keys and values of every layer for `slots` sequences of up to `length` positions: per layer, a
    (slots, kv_heads, length, head_dim) tensor each. A sequence owns one slot from its prefill to its end."""

    def __init__(self, config: LlamaConfig, slots: int, length: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        shape = (slots, config.num_kv_heads, length, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.slots, self.length = slots, length


def step_inputs(tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cache: KVCache,
                last: torch.Tensor | None = None) -> tuple:
    """The arguments of one forward pass, whichever backend runs it: tokens (B, T) at positions (B, T) of the
    sequences in cache slots (B,); `last` (B,), the index along T of each row's last real token (default T - 1).
    The keys attended to are positions 0 .. the largest position of the pass (an arange, so that a compiled
    decoder sees their count as a size, not as a value)."""
    b, t = tokens.shape
    if last is None:
        last = torch.full((b,), t - 1, dtype=torch.long, device=tokens.device)
    keys = torch.arange(int(positions.max()) + 1, device=tokens.device)
    return tokens, positions, slots, last, keys, cache.k, cache.v


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_k: torch.Tensor,
                cache_v: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, kvH, T, hd)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # this pass's keys and values into each sequence's slot, at its positions
        rows = slots[:, None].expand(b, t)  # (B, T)
        cache_k[rows, :, positions] = k.transpose(1, 2)
        cache_v[rows, :, positions] = v.transpose(1, 2)
        span = mask.shape[-1]
        keys = cache_k[slots, :, :span]  # (B, kvH, L, hd)
        values = cache_v[slots, :, :span]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)  # (B, H, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache_k, cache_v, slots, positions, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache_k, cache_v, slots, positions, mask)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nn.Module):
    """tokens (B, T) at positions (B, T) of the sequences in cache slots (B,) -> logits of each row's last real
    position (B, vocab). Rows are padded on the right with position -1 where a pass mixes lengths; a padded
    position writes nowhere that is read and is never attended to."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32)
                                                / config.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, last: torch.Tensor,
                keys: torch.Tensor, cache_k: list[torch.Tensor], cache_v: list[torch.Tensor]) -> torch.Tensor:
        """See step_inputs for the arguments; the cache's tensors are written in place."""
        b, t = tokens.shape
        freqs = positions.clamp(min=0).float()[..., None] * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
        x = self.embed_tokens(tokens)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = keys[None, None, None, :] <= positions[:, None, :, None]  # (B, 1, T, L)
        mask = mask | (positions[:, None, :, None] < 0)  # padded rows attend anywhere: their output is dropped
        write_pos = positions.clamp(min=0)
        # padded positions must not overwrite real keys: send them to the last cache position, never attended
        write_pos = torch.where(positions < 0, torch.full_like(write_pos, cache_k[0].shape[2] - 1), write_pos)
        for layer, k, v in zip(self.layers, cache_k, cache_v):
            x = layer(x, cos, sin, k, v, slots, write_pos, mask)
        x = x[torch.arange(b, device=tokens.device), last]
        return self.lm_head(self.norm(x))
